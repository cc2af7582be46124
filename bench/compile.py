"""``model.compile`` on and off: llmft's training loop with each decoder layer compiled (regional ``torch.compile``)
against the same run in eager mode; tokens/s of the steps after the warm-up, the compile time, peak RSS.

    python bench/compile.py [--lengths 2048 4096] [--warmup 2] [--steps 3] [--chunk 4096] [--quick]
                            [--results bench/RESULTS.md]

Model: LLaMA 4 layers, hidden 256, 4 heads, MLP 688, vocab 32000, random init (seed 0), fp32, SDPA, one sequence per
step, AdamW, no gradient checkpointing; data: the real Gutenberg books (concat rows of SEQ_LEN). Each run is
``llmft.train.loop.train`` on a recipe in its own process (``model.compile: true`` or false, nothing else differs),
eager first, then compiled, at each length. The inductor caches are disabled in the compiled process
(``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``), so that its first step pays the whole compile. A step's time is the
interval between the ends of consecutive optimizer steps; the first ``--warmup`` steps are dropped (they absorb the
compile); tokens/s = SEQ_LEN / median step time. Compile time = first step compiled - first step eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    book_paths,
    load1,
    machine,
    run_child,
    write_model_dir,
    write_section,  # noqa: E402
)
from train_throughput import llmft_child  # noqa: E402  the same llmft run, compile on or off


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--warmup", type=int, default=2, help="steps not timed (>= 1; the first one compiles)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--chunk", type=int, default=4096, help="train.loss_chunk_tokens")
    p.add_argument("--quick", action="store_true", help="smoke test: length 256, 1 + 1 steps")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file the section is appended to")
    p.add_argument("--child", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--books", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            r = llmft_child(Path(args.model_dir), [Path(b) for b in args.books], args.seq_len,
                            args.warmup + args.steps, False, args.chunk, Path(tmp), args.child == "compiled")
        ends = [r.pop("first_forward")] + r.pop("step_ends")  # [start of step 1, end of step 1, end of step 2, ...]
        r["first_step"] = ends[1] - ends[0]
        r["step_seconds"] = [b - a for a, b in zip(ends[args.warmup :], ends[args.warmup + 1 :])]
        print(json.dumps(r))
        return
    if args.quick:
        args.lengths, args.warmup, args.steps, args.chunk = [256], 1, 1, 256
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step compiles)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_dir(tmp / "model", max(args.lengths))
        books = [str(b) for b in book_paths(tmp)]
        for seq_len in args.lengths:
            got = {}
            for side in ("eager", "compiled"):
                cmd = [__file__, "--child", side, "--seq-len", str(seq_len), "--model-dir", str(model_dir),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--chunk", str(args.chunk),
                       "--books", *books]
                os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1" if side == "compiled" else "0"
                res = run_child(cmd)
                if res["status"] != "ok":
                    raise SystemExit(f"{side} at {seq_len} failed ({res['status']}):\n{res['stderr_tail']}")
                print(f"[bench] {side:8s} s={seq_len}: first step {res['first_step']:.1f} s, steps "
                      f"{', '.join(f'{t:.2f}' for t in res['step_seconds'])} s, peak RSS "
                      f"{res['peak_rss'] / 2**20:,.0f} MiB, load {res['load1']:.2f}", flush=True)
                got[side] = res
            rows.append((seq_len, got))

    cmd = (f"python bench/compile.py --lengths {' '.join(map(str, args.lengths))} --warmup {args.warmup} --steps "
           f"{args.steps} --chunk {args.chunk}" + (" --quick" if args.quick else ""))
    lines = [
        f"## compile — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; machine: {machine()}. Model: LLaMA 4 layers, hidden 256, 4 heads, MLP 688, vocab 32000, "
        "random init (seed 0), fp32, SDPA, 1 sequence per step, no gradient checkpointing, "
        f"`train.loss_chunk_tokens: {args.chunk}`, real Gutenberg books. `llmft.train.loop.train` with "
        "`model.compile` off and on (each decoder layer compiled with inductor), each in its own process, inductor "
        f"caches disabled. {args.warmup} warm-up step(s) dropped, median of {args.steps} timed steps (range in "
        "brackets). Compile time: the compiled run's first step minus the eager run's first step. The machine is "
        "shared and was loaded (load: mean 1-minute load average during the run); ratios compare runs made in the "
        "same invocation, back to back.",
        "",
        "| seq | model.compile | tokens/s [range] | ratio | first step (s) | compile time (s) | peak RSS (MiB) "
        "| loss at step 1 | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = []
    for seq_len, got in rows:
        base = None
        for side in ("eager", "compiled"):
            r = got[side]
            times = r["step_seconds"]
            tps = seq_len / statistics.median(times)
            base = base or tps
            compile_s = r["first_step"] - got["eager"]["first_step"]
            table.append({"seq_len": seq_len, "side": side, "tps": tps, "ratio": tps / base,
                          "first_step": r["first_step"], "compile_s": compile_s, "peak_rss": r["peak_rss"],
                          "losses": r["losses"]})
            lines.append(f"| {seq_len} | {'on' if side == 'compiled' else 'off'} | {tps:,.0f} "
                         f"[{seq_len / max(times):,.0f}-{seq_len / min(times):,.0f}] | {tps / base:.2f} | "
                         f"{r['first_step']:.1f} | {f'{compile_s:.1f}' if side == 'compiled' else ''} | "
                         f"{r['peak_rss'] / 2**20:,.0f} | "
                         f"{r['losses'][0]:.5f} | {r['load1']:.2f} |")
    lines.append("")
    print("\n".join(lines))
    print("[bench] json " + json.dumps({"load1_end": load1(), "rows": table}))
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
