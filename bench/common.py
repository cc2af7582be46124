"""Pieces the llmft-vs-transformers benches share: the model, the books, the FLOP count, the machine's measured GEMM
peak, children with a memory cap, and writing a section of RESULTS.md.

The model of every bench: LLaMA, 4 layers, hidden 256, 4 heads (head dim 64), MLP 688, vocab 32000, untied
embeddings, random init (seeded), fp32, SDPA. Its tokenizer is llmft's tiny byte-level BPE (2048 tokens), so the
token ids use the first 2048 rows of the 32000-row embedding; the compute is that of the full vocabulary.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SHARED_BOOKS = REPO.parent / "shared" / "data" / "gutenberg"  # 84 (Frankenstein), 2701 (Moby Dick)
MODEL = {"vocab_size": 32000, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688}
# glibc's dynamic mmap threshold keeps freed heap memory resident (see docs/memory.md); both sides of every bench
# run with it fixed, so that peak RSS measures what a step needs rather than allocator slack
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}


def matmul_params(model: dict = MODEL) -> int:
    """Weights that take part in a matmul: q and o (h x h), k and v (h x kv_dim: h for multi-head attention, less
    with grouped-query attention), gate, up, down (3 h i) per layer, and the LM head (h v). The embedding (a lookup)
    and the norms are not counted."""
    h = model["hidden_size"]
    kv_dim = h * model.get("num_kv_heads", model["num_heads"]) // model["num_heads"]
    return (
        model["num_layers"] * (2 * h * h + 2 * h * kv_dim + 3 * h * model["intermediate_size"])
        + h * model["vocab_size"]
    )


def flops_per_token(seq_len: int, model: dict = MODEL) -> float:
    """Model FLOPs per trained token: 6 N (forward 2 N, backward 4 N; N = :func:`matmul_params`, LM head included)
    plus attention 12 L h s (PaLM, appendix B: QK^T and AV, forward and backward, full s x s with no causal halving).
    Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs)."""
    return 6 * matmul_params(model) + 12 * model["num_layers"] * model["hidden_size"] * seq_len


def book_paths(tmp: Path) -> list[Path]:
    """The real Gutenberg books (shared data), else the bundled ones decompressed into ``tmp``."""
    books = sorted(SHARED_BOOKS.glob("*.txt")) if SHARED_BOOKS.is_dir() else []
    if books:
        return books
    sys.path.insert(0, str(REPO))
    from llmft.testing.tiny import ASSETS, read_text

    out = []
    for gz in sorted(ASSETS.glob("*.txt.gz")):
        path = tmp / gz.name.removesuffix(".gz")
        path.write_text(read_text(gz), encoding="utf-8")
        out.append(path)
    return out


def write_model_dir(out: Path, max_len: int, model: dict = MODEL) -> Path:
    """config.json of ``model`` (the bench model unless given; ``max_position_embeddings = max_len``) and llmft's
    tiny tokenizer."""
    sys.path.insert(0, str(REPO))
    from llmft.testing.tiny import ASSETS, tiny_llama_config

    out.mkdir(parents=True, exist_ok=True)
    tiny_llama_config(max_position_embeddings=max_len, **model).save_pretrained(out)
    for f in (ASSETS / "tiny-llama").iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load1() -> float:
    return os.getloadavg()[0]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, CPU only")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def run_child(args: list[str], cap_bytes: int | None = None, timeout_s: float | None = None,
              reserve_bytes: int = 1 << 30) -> dict:
    """Run ``python <args>`` and return the JSON on its last stdout line, plus ``status``, ``seconds``,
    ``watched_peak_rss`` (sampled every 50 ms), ``watched_peak_tree_rss`` (the child and its descendants, summed),
    ``killed_for`` ("cap", "machine" or None) and ``load1``, the mean of
    the 1-minute load average at start and end.

    ``cap_bytes``: the child is killed once its RSS passes it (status ``"memory"``), and its address space is
    limited to the cap + 4 GiB (virtual reservations of the libraries), so that a large allocation fails at once
    instead of being paged in; it is also killed (status ``"memory"``) when the machine's available memory falls
    below ``reserve_bytes``, so that other work on the machine never meets the OOM killer. ``timeout_s``: killed
    after that many seconds (status ``"time"``).
    """
    import psutil

    def limit() -> None:
        if cap_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes + (4 << 30),) * 2)

    env = {**os.environ, **CHILD_ENV}
    load_start, t0 = load1(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    ps, peak, tree_peak, status, killed_for = psutil.Process(proc.pid), 0, 0, None, None
    import threading

    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
            peak = max(peak, rss)
            for c in ps.children(recursive=True):  # worker processes: the whole tree's resident memory
                try:
                    rss += c.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            tree_peak = max(tree_peak, rss)
        except psutil.NoSuchProcess:
            break
        if cap_bytes is not None and peak > cap_bytes:
            status, killed_for = "memory", "cap"
        elif cap_bytes is not None and mem_available() < reserve_bytes:
            status, killed_for = "memory", "machine"
        elif timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            status = "time"
        if status:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    for r in readers:
        r.join()
    seconds = time.perf_counter() - t0
    stdout, stderr = out.get("stdout", ""), out.get("stderr", "")
    result: dict = {}
    if status is None:
        lines = stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1])
            status = "ok"
        elif "can't allocate memory" in stderr or "MemoryError" in stderr or "out of memory" in stderr.lower():
            status = "memory"
        else:
            status = "error"
    return {**result, "status": status, "killed_for": killed_for, "returncode": proc.returncode, "seconds": seconds,
            "watched_peak_rss": peak, "watched_peak_tree_rss": tree_peak,
            "load1": (load_start + load1()) / 2, "stderr_tail": stderr[-2000:] if status == "error" else ""}


def write_section(results: Path, lines: list[str]) -> None:
    """Append ``lines`` (a ``## name — date`` section) to the results file, creating it with its header."""
    if not results.exists():
        results.write_text("# Benchmark results\n\nNewest runs are appended at the end. Ratios compare with a "
                           "baseline measured in the same run.\n\n")
    with open(results, "a") as f:
        f.write("\n".join(lines) + "\n")
