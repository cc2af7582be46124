"""Run independent jobs (the fine-tunes of ``llmft repro pi``) side by side, the machine's cores split between them.

A tiny model trains faster per core in several single-threaded processes than in one process using every core: its
matrices (hidden 256) are too small to keep two threads busy. On 2 cores, two 1-thread fine-tunes of the repro side
by side give 1.16x the tokens per second of one 2-thread fine-tune after the other in fp32, and 1.55x in bf16
autocast, which alone gives 1.11x (bench/RESULTS.md, side_by_side: 100 steps at 1024 tokens, each fine-tune's data
build and model load included; AMD EPYC with avx512_bf16). Each job runs in a spawned process
with its share of the threads, its output going to its own log file; the parent prints each running job's last
stage and step line every ``progress_every`` seconds. With one job, or one core, the jobs run one after the other in
this process, printing as they go.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import torch


def split_cores(jobs: int, threads: int) -> tuple[int, int]:
    """(processes, threads per process) for ``jobs`` jobs on ``threads`` threads: as many processes as there are
    jobs and threads, the threads split evenly between them."""
    workers = max(1, min(jobs, threads))
    return workers, max(1, threads // workers)


def _end_with_parent(parent: int) -> None:
    """Linux: this process gets SIGTERM when its parent dies (killed, however), so that a job stops as an interrupted
    run does (the training loop checkpoints on SIGTERM and exits) instead of training on, orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGTERM)


def _job(fn: Callable, args: tuple, threads: int, log: Path | None, parent: int = 0) -> tuple[object, float]:
    """Run ``fn(*args)`` with ``threads`` torch threads, its stdout and stderr appended to ``log`` (when given);
    returns its result and its seconds."""
    torch.set_num_threads(threads)
    t0 = time.time()
    if log is None:
        return fn(*args), time.time() - t0
    _end_with_parent(parent)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)  # also what C++ (and any subprocess) writes
        os.dup2(f.fileno(), 2)
        try:
            result = fn(*args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return result, time.time() - t0


def _last(log: Path, markers: tuple[str, ...]) -> str:
    """The last line of ``log`` containing each marker, joined with "; " (what a running job is at)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    found = [next((ln.strip() for ln in reversed(lines) if m in ln), "") for m in markers]
    return "; ".join(f for f in found if f)


def run_side_by_side(jobs: dict[str, tuple[Callable, tuple]], logs: dict[str, Path], threads: int | None = None,
                     progress_every: float = 60.0, say: Callable[[str], None] = print,
                     markers: tuple[str, ...] = ("stage ", "] step ")) -> dict[str, tuple[object, float]]:
    """Run every ``name: (fn, args)`` of ``jobs``; returns ``name: (fn's result, its seconds)``.

    Args:
        jobs: the jobs, in the order to start them; ``fn`` must be importable (a module-level function).
        logs: where each job's output goes when it runs in its own process.
        threads: the threads to split (default: torch's current number).
        progress_every: seconds between progress lines.
        say: where progress lines go.
        markers: a progress line shows each running job's last log line containing each of these.

    Raises:
        Exception: the first failing job's exception (raised once the jobs already running have ended; the
            jobs not started yet are not run).
    """
    threads = threads or torch.get_num_threads()
    workers, each = split_cores(len(jobs), threads)
    if workers == 1:
        return {name: _job(fn, args, threads, None) for name, (fn, args) in jobs.items()}
    say(f"{len(jobs)} jobs, {workers} at a time with {each} thread(s) each; their output: "
        + ", ".join(str(logs[n]) for n in jobs))
    results: dict[str, tuple[object, float]] = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        me = os.getpid()
        started = {pool.submit(_job, fn, args, each, logs[name], me): name for name, (fn, args) in jobs.items()}
        pending = set(started)
        while pending:
            done, pending = wait(pending, timeout=progress_every, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:
                    pool.shutdown(cancel_futures=True)  # the jobs not started yet do not start
                    raise fut.exception()
                results[started[fut]] = fut.result()
                say(f"{started[fut]} done in {results[started[fut]][1] / 60:.1f} min")
            if not done:
                for fut in pending:
                    at = _last(logs[started[fut]], markers)
                    if at:  # started (a job waiting for a process counts as running, but has no log yet)
                        say(f"{started[fut]}: {at}")
    return {name: results[name] for name in jobs}
