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
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, book_paths, machine, run_child, write_model_dir, write_section  # noqa: E402

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


def search(side: str, args, model_dir: Path, books: list[str], cap: int, deadline: float) -> dict:
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
        tried[s] = attempt(side, s, model_dir, books, cap, timeout_s=max(left, 1))
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


def main() -> None:
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
    args = p.parse_args()
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
    for side, f in found.items():
        for n, r in sorted(f["tried"].items()):
            what = {"ok": "trained one step", "memory": r.get("why"), "time": "killed: time budget"}[r["status"]]
            peak = r.get("peak_rss") or r["watched_peak_rss"]
            lines.append(f"| {name[side]} | {n:,} | {what} | {peak / 2**30:.2f} | {r['seconds']:.0f} | "
                         f"{r['load1']:.2f} |")
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
