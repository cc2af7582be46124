"""Longest sequence llmft and transformers' ``Trainer`` can each train one step on at this machine's memory: one real
optimizer step (forward, backward, update) per attempt, each in its own process under a memory cap.

    python bench/max_context.py [--mem-gib 21.5] [--start 8192] [--resolution 8192] [--budget-min 20]
                                [--sides hf llmft] [--quick] [--results bench/RESULTS.md]

Model: LLaMA 4 layers, hidden 256, 4 heads, MLP 688, vocab 32000, fp32, SDPA, batch 1, gradient checkpointing on
for both, the real Gutenberg books (bench/common.py). llmft: a recipe run by ``llmft.train.loop.train`` with
``train.loss_chunk_tokens: 1024`` and ``model.checkpoint_keep_attention: true``; transformers: ``Trainer`` with
``activation_checkpointing`` (non-reentrant) and its defaults otherwise (bench/train_throughput.py has both).

Search, per side: lengths double from ``--start`` until an attempt fails, then bisect to ``--resolution``. An attempt
fails when the process's RSS passes ``--mem-gib`` (sampled every 50 ms; its address space is also limited to the cap
+ 4 GiB so that a huge allocation fails at once), or when the machine's available memory drops below 1 GiB (so that
other work never meets the OOM killer; reported separately). Every process runs with
``MALLOC_MMAP_THRESHOLD_=131072``.

Sequence parallelism (``--sp``): the same model trained by ``llmft.train.loop.train`` under the deepspeed launcher
(ZeRO-2, fp32, gradient checkpointing, ``train.loss_chunk_tokens: 1024``), as 1 rank with 2 threads and as 2 ranks
with one thread each and ``parallel.sequence: 2`` (each rank holds half of every sequence), at the fixed lengths
``--sp-lengths``: each rank's peak RSS, the step's tokens/s, and, from a straight line through peak RSS vs length
per side, the longest sequence each fits in the same memory per rank (``--mem-gib`` / 2), marked as extrapolated.

    python bench/max_context.py --sp [--sp-lengths 4096 8192 16384] [--quick]

``--sp --search`` verifies the longest-sequence comparison with real steps instead of the line: each side (1 rank;
SP=2 over 2 ranks) trains one step per attempt under the same RSS cap per rank, ``--sp-cap-gib`` (every rank
watched every 50 ms; all ranks killed once one passes it), lengths doubling from ``--start`` and bisected to
``--resolution``, within ``--budget-min``. The cap is small (default 1.5 GiB, of which ~0.9 GiB is the framework)
so that the lengths stay within minutes per step on 2 cores.

    python bench/max_context.py --sp --search [--sp-cap-gib 1.5] [--start 8192] [--resolution 4096]

Time: one step's cost grows with s^2 (attention); on 2 CPU cores one step at 128K tokens is about an hour. So the
search also has a time budget, ``--budget-min``, shared by the sides: before each attempt the step time is predicted
from the longest finished step (x (s / s_done)^2, an upper bound) and an attempt that would not finish within the
side's remaining share is not started; an attempt still running when the budget is spent is killed (a "time"
result proves nothing either way). Where the search stops for time, the table also gives the memory-limited length
extrapolated from the measured peaks (a straight line through peak RSS vs length: attention is flash-style, the
activations and chunks are linear in s), marked as extrapolated, never as trained. Give a larger budget (e.g.
``--budget-min 180``) to verify 128K with a real step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CHILD_ENV,
    REPO,
    RESULTS,
    book_paths,
    load1,
    machine,
    mem_available,
    peak_rss_bytes,
    run_child,
    write_model_dir,
    write_section,
)

CHUNK = 1024
MAX_LEN = 524_288  # the two books hold ~590K tokens of the bench tokenizer


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (a, b) of peak = a + b s; None with fewer than two lengths."""
    if len({s for s, _ in points}) < 2:
        return None
    n = len(points)
    ms, mp = sum(s for s, _ in points) / n, sum(p for _, p in points) / n
    b = sum((s - ms) * (p - mp) for s, p in points) / sum((s - ms) ** 2 for s, _ in points)
    return mp - b * ms, b


def attempt(side: str, seq_len: int, model_dir: Path, books: list[str], cap: int, timeout_s: float | None) -> dict:
    cmd = [str(Path(__file__).resolve().parent / "train_throughput.py"), "--child", side, "--seq-len", str(seq_len),
           "--ckpt", "on", "--model-dir", str(model_dir), "--warmup", "1", "--steps", "0", "--chunk", str(CHUNK),
           "--books", *books]
    r = run_child(cmd, cap_bytes=cap, timeout_s=timeout_s)
    if r["status"] == "memory":
        r["why"] = {"cap": f"over the {cap / 2**30:g} GiB cap", "machine": "machine low on memory (other work)",
                    None: "an allocation failed (address space limited to the cap + 4 GiB)"}[r["killed_for"]]
    print(f"[bench] {side:5s} {seq_len:>7,}: {r['status']}, {r['seconds']:.0f} s, peak RSS "
          f"{max(r.get('peak_rss', 0), r['watched_peak_rss']) / 2**30:.2f} GiB, load {r['load1']:.2f}", flush=True)
    if r["status"] == "error":
        raise SystemExit(f"{side} at {seq_len} failed:\n{r['stderr_tail']}")
    return r


def search(side: str, args, model_dir: Path, books: list[str], cap: int, deadline: float, run=None) -> dict:
    """Lengths from ``args.start`` doubling until an attempt fails, then bisected to ``args.resolution``, within
    ``deadline``. ``run(s, timeout_s)`` makes one attempt (default: :func:`attempt` for ``side``)."""
    run = run or (lambda s, timeout_s: attempt(side, s, model_dir, books, cap, timeout_s=timeout_s))
    tried: dict[int, dict] = {}
    stop = ""

    def predicted(s: int) -> float:
        done = [(n, r["seconds"]) for n, r in tried.items() if r["status"] == "ok"]
        if not done:
            return 0.0
        n, t = max(done)
        return t * (s / n) ** 2

    def go(s: int) -> dict | None:
        nonlocal stop
        left = deadline - time.monotonic()
        if predicted(s) > left:
            stop = f"{s:,} not tried: one step predicted {predicted(s) / 60:.0f} min, {max(left, 0) / 60:.0f} left"
            return None
        tried[s] = run(s, max(left, 1))
        if tried[s]["status"] == "time":
            stop = f"{s:,} stopped: the time budget ran out during the step"
            return None
        return tried[s]

    s, ok, bad = args.start, None, None
    while s <= args.max_len:
        r = go(s)
        if r is None:
            break
        if r["status"] == "ok":
            ok, s = s, s * 2
        else:
            bad = s
            break
    while ok is not None and bad is not None and bad - ok > args.resolution:
        mid = (ok + bad) // 2 // args.resolution * args.resolution
        if mid <= ok:
            break
        r = go(mid)
        if r is None:
            break
        ok, bad = (mid, bad) if r["status"] == "ok" else (ok, mid)
    points = [(n, float(r["peak_rss"])) for n, r in tried.items() if r["status"] == "ok"]
    line = fit_line(points)
    extrapolated = int((cap - line[0]) / line[1]) if line and line[1] > 0 else None
    if bad is None and not stop:
        stop = f"reached --max-len {args.max_len:,}"
    return {"tried": tried, "max_ok": ok, "first_fail": bad, "stop": stop, "fit": line, "extrapolated": extrapolated}


def attempt_rows(found: dict, label: dict) -> list[str]:
    """The attempts of each side's search as table rows: side, length, result, peak RSS (GiB), seconds, load."""
    rows = []
    for side, f in found.items():
        for n, r in sorted(f["tried"].items()):
            what = {"ok": "trained one step", "memory": r.get("why"), "time": "killed: time budget"}[r["status"]]
            peak = r.get("peak_rss") or r["watched_peak_rss"]
            rows.append(f"| {label[side]} | {n:,} | {what} | {peak / 2**30:.2f} | {r['seconds']:.0f} | "
                        f"{r['load1']:.2f} |")
    return rows


def sp_child(recipe_path: str) -> None:
    """One rank of a ``--sp`` run: train the recipe, then write this rank's peak RSS to ``rank<N>.json`` in the
    run directory (a file each: lines two ranks print to one pipe can interleave)."""
    sys.path.insert(0, str(REPO))
    from llmft.config import load_recipe
    from llmft.train.loop import train

    recipe = load_recipe(recipe_path)
    train(recipe, resume=False)
    rank = int(os.environ.get("RANK", 0))
    Path(recipe.checkpoint.dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss": peak_rss_bytes()}))


def sp_recipe(seq_len: int, sequence: int, model_dir: Path, books: list[str], out: Path, steps: int) -> Path:
    """The recipe of a ``--sp`` run: ``steps`` steps at ``seq_len`` with ``parallel.sequence: sequence``."""
    import yaml

    recipe = {
        "model": {"name": str(model_dir), "init": "random", "dtype": "float32", "attention": "sdpa",
                  "max_seq_len": seq_len, "gradient_checkpointing": True},
        "data": {"sources": [{"format": "text", "path": b} for b in books], "packing": "concat"},
        "train": {"lr": 1e-4, "max_steps": steps, "precision": "fp32", "micro_batch_size": 1,
                  "loss_chunk_tokens": CHUNK, "seed": 0},
        "deepspeed": {"stage": 2},
        "parallel": {"sequence": sequence},
        "checkpoint": {"dir": str(out / f"sp{sequence}-{seq_len}")},
        "logging": {"every_steps": 1},
    }
    path = out / f"sp{sequence}-{seq_len}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def sp_launch(seq_len: int, sequence: int, model_dir: Path, books: list[str], out: Path, steps: int,
              cap_bytes: int | None = None, timeout_s: float | None = None) -> dict:
    """Train ``steps`` steps at ``seq_len`` on ``sequence`` ranks (SP = ``sequence``) under the deepspeed launcher,
    watching every rank's RSS every 50 ms.

    Returns ``status``: "ok", "memory" (a rank passed ``cap_bytes``, or the machine's available memory fell below
    1 GiB: all ranks killed) or "time" (killed after ``timeout_s``); ``peak_rss``: the largest rank's peak (its
    own ru_maxrss when it finished, else the sampled one); ``seconds``; and, when ok, ``tokens_per_second`` of the
    last step and its ``loss``.
    """
    import shutil
    import signal
    import subprocess
    import threading

    import psutil

    path = sp_recipe(seq_len, sequence, model_dir, books, out, steps)
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    env = {**os.environ, **CHILD_ENV, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(2 // sequence)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [deepspeed, "--num_accelerators", str(sequence), "--master_port", str(port), __file__, "--sp-child",
           str(path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a kill reaches every rank
    streams: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: streams.__setitem__(k, s.read()), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    launcher, watched, status, why = psutil.Process(proc.pid), 0, None, ""
    while proc.poll() is None:
        try:
            ranks = [c for c in launcher.children(recursive=True) if "--sp-child" in " ".join(c.cmdline())]
            watched = max([watched] + [c.memory_info().rss for c in ranks])
        except psutil.Error:  # a rank ended between the listing and the reading
            pass
        if cap_bytes is not None and watched > cap_bytes:
            status, why = "memory", f"a rank passed the {cap_bytes / 2**30:.2f} GiB cap"
        elif cap_bytes is not None and mem_available() < (1 << 30):
            status, why = "memory", "the machine's available memory fell below 1 GiB"
        elif timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            status, why = "time", "killed: time budget"
        if status:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    for r in readers:
        r.join()
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):  # a killed run cannot free them
        f.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    if status:
        return {"status": status, "why": why, "peak_rss": watched, "seconds": seconds}
    stdout = streams.get("stdout", "")
    if proc.returncode != 0:
        raise SystemExit(f"SP={sequence} at {seq_len} failed:\n{stdout[-2000:]}{streams.get('stderr', '')[-2000:]}")
    run_dir = out / f"sp{sequence}-{seq_len}"
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"status": "ok", "peak_rss": max(x["peak_rss"] for x in ranks), "ranks": len(ranks),
            "tokens_per_second": rows[-1]["tokens_per_second"], "loss": rows[-1]["loss"], "seconds": seconds,
            "watched_peak_rss": watched}


def sp_run(seq_len: int, sequence: int, model_dir: Path, books: list[str], out: Path, steps: int) -> dict:
    """:func:`sp_launch` without a cap: per-rank peak RSS and the tokens/s of the last step."""
    r = sp_launch(seq_len, sequence, model_dir, books, out, steps)
    print(f"[bench] SP={sequence} {seq_len:>7,}: peak RSS per rank {r['peak_rss'] / 2**30:.2f} GiB, "
          f"{r['tokens_per_second']:,.0f} tok/s, {r['seconds']:.0f} s", flush=True)
    return r


def sp_search_main(args) -> None:
    """``--sp --search``: the longest sequence 1 rank and SP=2 over 2 ranks each train one real step on under the
    same memory cap per rank (``--sp-cap-gib``); a RESULTS.md section."""
    cap = int(args.sp_cap_gib * 2**30)
    t0 = time.monotonic()
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_dir(tmp / "model", args.max_len)
        books = [str(b) for b in book_paths(tmp)]
        for i, sp in enumerate((1, 2)):
            share = (args.budget_min * 60 - (time.monotonic() - t0)) / (2 - i)

            def run(s: int, timeout_s: float, sp=sp) -> dict:
                r = sp_launch(s, sp, model_dir, books, tmp, 1, cap, timeout_s)
                print(f"[bench] SP={sp} {s:>7,}: {r['status']}, peak RSS per rank {r['peak_rss'] / 2**30:.2f} GiB, "
                      f"{r['seconds']:.0f} s", flush=True)
                return {**r, "load1": load1()}

            found[sp] = search(f"sp{sp}", args, model_dir, books, cap, time.monotonic() + share, run=run)
    minutes = (time.monotonic() - t0) / 60
    cmd = (f"python bench/max_context.py --sp --search --sp-cap-gib {args.sp_cap_gib} --start {args.start} "
           f"--resolution {args.resolution} --budget-min {args.budget_min:g}")
    side = {1: "1 rank", 2: "SP=2 over 2 ranks"}
    now = datetime.now(timezone.utc)
    lines = [
        f"## max_context, sequence parallelism, longest trained sequence — {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; machine: {machine()}; {minutes:.1f} min. The bench model (LLaMA 4 layers, hidden 256, "
        f"vocab 32000), fp32, SDPA, gradient checkpointing, `train.loss_chunk_tokens: {CHUNK}`, DeepSpeed ZeRO-2 on "
        "CPU (gloo), batch 1, one real optimizer step per attempt. Cap: "
        f"{args.sp_cap_gib} GiB RSS per rank (the whole process, framework included), the same for both sides; "
        "an attempt whose rank passes it is killed. Lengths double from the start until an attempt fails, then are "
        "bisected to the resolution.",
        "",
        "| side | length | result | peak RSS per rank (GiB) | seconds | load |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += attempt_rows(found, side)
    lines += ["", "| side | longest trained (verified) | first failure | search stopped |", "|---|---:|---:|---|"]
    for sp, f in found.items():
        fail = f"{f['first_fail']:,}" if f["first_fail"] else "-"
        lines.append(f"| {side[sp]} | {f['max_ok'] or 0:,} | {fail} | {f['stop'] or 'bracketed to the resolution'} |")
    if found[1]["max_ok"] and found[2]["max_ok"]:
        lines += ["", f"Ratio of the longest trained sequences, SP=2 / 1 rank: "
                  f"**{found[2]['max_ok'] / found[1]['max_ok']:.2f}x**."]
    lines.append("")
    print("\n".join(lines))
    print("[bench] json " + json.dumps({sp: {k: v for k, v in f.items() if k != "tried"} for sp, f in found.items()}))
    write_section(args.results, lines)


def sp_main(args) -> None:
    """``--sp``: SP=2 over 2 ranks against 1 rank, at fixed lengths; a RESULTS.md section."""
    lengths = [512, 1024] if args.quick else args.sp_lengths
    steps = args.sp_steps
    limit = args.mem_gib * 2**30 / 2  # the same memory per rank on both sides: half of this machine's share
    t0 = time.monotonic()
    runs: dict[int, dict[int, dict]] = {1: {}, 2: {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_dir(tmp / "model", max(lengths))
        books = [str(b) for b in book_paths(tmp)]
        for n in lengths:
            for sp in (1, 2):
                runs[sp][n] = sp_run(n, sp, model_dir, books, tmp, steps)
    minutes = (time.monotonic() - t0) / 60
    fits = {sp: fit_line([(n, float(r["peak_rss"])) for n, r in rs.items()]) for sp, rs in runs.items()}
    longest = {sp: int((limit - f[0]) / f[1]) if f and f[1] > 0 else None for sp, f in fits.items()}
    cmd = "python bench/max_context.py --sp " + ("--quick" if args.quick else
                                                  f"--sp-lengths {' '.join(map(str, lengths))}") + (
        f" --sp-steps {steps}" if steps != 2 else "")
    lines = [
        f"## max_context, sequence parallelism — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; machine: {machine()}; {minutes:.1f} min. The bench model (LLaMA 4 layers, hidden 256, "
        f"vocab 32000), fp32, SDPA, gradient checkpointing, `train.loss_chunk_tokens: {CHUNK}`, DeepSpeed ZeRO-2 on "
        "CPU (gloo), batch 1, "
        f"{steps} steps (tokens/s of the last). 1 rank: 2 threads; SP=2: 2 ranks x 1 thread, each holding half of "
        "every sequence. Peak RSS: the largest rank's, whole process (framework included).",
        "",
        "| length | 1 rank: peak RSS (GiB) | SP=2: peak RSS per rank (GiB) | ratio | 1 rank: tok/s | SP=2: tok/s | "
        "ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in lengths:
        a, b = runs[1][n], runs[2][n]
        lines.append(f"| {n:,} | {a['peak_rss'] / 2**30:.2f} | {b['peak_rss'] / 2**30:.2f} | "
                     f"{b['peak_rss'] / a['peak_rss']:.2f} | {a['tokens_per_second']:,.0f} | "
                     f"{b['tokens_per_second']:,.0f} | {b['tokens_per_second'] / a['tokens_per_second']:.2f} |")
    lines += ["", f"Longest sequence in {limit / 2**30:.2f} GiB per rank, extrapolated from the line through each "
              "side's peaks (not trained at that length):", ""]
    for sp in (1, 2):
        f = fits[sp]
        what = (f"{longest[sp]:,} tokens (peak ~ {f[0] / 2**30:.2f} GiB + {f[1] * 1024 / 2**20:.2f} MiB per 1K "
                "tokens)" if longest[sp] else "-")
        lines.append(f"- {'1 rank' if sp == 1 else 'SP=2 over 2 ranks'}: {what}")
    if longest[1] and longest[2]:
        lines.append(f"- ratio: {longest[2] / longest[1]:.2f}x")
    lines.append("")
    print("\n".join(lines))
    print("[bench] json " + json.dumps({"runs": {sp: {n: {k: v for k, v in r.items()} for n, r in rs.items()}
                                                 for sp, rs in runs.items()}, "longest": longest}))
    write_section(args.results, lines)


def main() -> None:
    if "--sp-child" in sys.argv:  # a rank of a --sp run (the deepspeed launcher adds --local_rank=N)
        sp_child(sys.argv[sys.argv.index("--sp-child") + 1])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    p.add_argument("--mem-gib", type=float, default=round(total_gib - 2, 1),
                   help="RSS cap per attempt (default: this machine's RAM - 2 GiB)")
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--resolution", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=MAX_LEN)
    p.add_argument("--budget-min", type=float, default=20.0, help="wall-clock budget for the whole search")
    p.add_argument("--sides", nargs="+", choices=["hf", "llmft"], default=["hf", "llmft"])
    p.add_argument("--quick", action="store_true", help="smoke test: one attempt per side at 1024 tokens (one "
                   "book), 3 GiB cap")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file the section is appended to")
    p.add_argument("--sp", action="store_true", help="sequence parallelism: SP=2 over 2 ranks vs 1 rank")
    p.add_argument("--sp-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--sp-steps", type=int, default=2, help="with --sp: steps per run (tokens/s of the last)")
    p.add_argument("--search", action="store_true", help="with --sp: search the longest sequence each side trains "
                   "under --sp-cap-gib per rank, with real steps")
    p.add_argument("--sp-cap-gib", type=float, default=1.5, help="with --sp --search: RSS cap per rank")
    args = p.parse_args()
    if args.sp and args.search:
        sp_search_main(args)
        return
    if args.sp:
        sp_main(args)
        return
    if args.quick:
        args.mem_gib, args.start, args.resolution, args.max_len, args.budget_min = 3.0, 1024, 1024, 1024, 10
    cap = int(args.mem_gib * 2**30)
    t0 = time.monotonic()
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_dir(tmp / "model", args.max_len)
        books = [str(b) for b in book_paths(tmp)][-1 if args.quick else 0 :]  # quick: one book
        for i, side in enumerate(args.sides):
            share = (args.budget_min * 60 - (time.monotonic() - t0)) / (len(args.sides) - i)
            found[side] = search(side, args, model_dir, books, cap, time.monotonic() + share)
    minutes = (time.monotonic() - t0) / 60

    name = {"hf": "transformers Trainer", "llmft": "llmft"}
    cmd = (f"python bench/max_context.py --mem-gib {args.mem_gib} --start {args.start} --resolution "
           f"{args.resolution} --max-len {args.max_len} --budget-min {args.budget_min:g} --sides "
           f"{' '.join(args.sides)}" + (" --quick" if args.quick else ""))
    lines = [
        f"## max_context — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; machine: {machine()}; cap {args.mem_gib} GiB RSS per attempt; the search took "
        f"{minutes:.1f} min. One real optimizer step per attempt, each in its own process. Both: gradient "
        "checkpointing, SDPA, fp32, batch 1. llmft: recipe through `llmft.train.loop.train`, "
        f"`train.loss_chunk_tokens: {CHUNK}`, `model.checkpoint_keep_attention: true`; transformers: `Trainer` "
        "defaults otherwise (full logits).",
        "",
        "| side | length | result | peak RSS (GiB) | seconds | load |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += attempt_rows(found, name)
    lines += ["", "| side | longest trained (verified) | first failure | memory-limited length, extrapolated | "
              "search stopped |", "|---|---:|---:|---:|---|"]
    for side, f in found.items():
        fit = (f"{f['extrapolated']:,} (peak ~ {f['fit'][0] / 2**30:.2f} GiB + {f['fit'][1] * 1024 / 2**20:.2f} "
               "MiB per 1K tokens)" if f["extrapolated"] else "-")
        fail = f"{f['first_fail']:,}" if f["first_fail"] else "-"
        lines.append(f"| {name[side]} | {f['max_ok'] or 0:,} | {fail} | {fit} | "
                     f"{f['stop'] or 'bracketed to the resolution'} |")
    lines.append("")
    print("\n".join(lines))
    print("[bench] json " + json.dumps({s: {k: v for k, v in f.items() if k != "tried"} for s, f in found.items()}))
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
