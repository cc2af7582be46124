"""Two of ``llmft repro pi``'s fine-tunes one after the other with every thread, against side by side with the
threads split between them (``llmft.side_by_side``), in fp32 and in bf16 autocast: the wall time of both, their
tokens/s together, and the ratio to fp32 one after the other.

    python bench/side_by_side.py [--steps 100] [--length 1024] [--quick] [--results bench/RESULTS.md]

The fine-tunes: linear PI x8 and YaRN x8 (``recipes/repro/ft_linear.yaml``, ``ft_yarn.yaml``) from the shipped base
(``llmft/assets/repro-base``, 4 layers, hidden 256, vocab 2048), ``--steps`` steps of one ``--length``-token row each
(``llmft.repro.fine_tune``), on the books and the ``--fast`` run's retrieval and copy documents. Each side runs in a
fresh process (the imports are not timed; the side-by-side workers' own start-up is); the clock runs from the first
fine-tune's start to the last one's end. Tokens/s = 2 x steps x length / seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load1, machine, run_child, write_section  # noqa: E402

RECIPES = ("ft_linear", "ft_yarn")
SIDES = (("fp32", "one after the other"), ("bf16", "one after the other"), ("fp32", "side by side"),
         ("bf16", "side by side"))


def child(precision: str, side: str, steps: int, length: int, tmp: Path) -> dict:
    """Run both fine-tunes one way; returns the seconds and the threads used."""
    import torch
    from transformers import AutoTokenizer

    from llmft.repro import FAST, SAVED_BASE, Stage, fine_tune, prepare_books, saved_base, write_mix
    from llmft.side_by_side import run_side_by_side, split_cores

    base = saved_base(SAVED_BASE)
    train_dir, _, _ = prepare_books(tmp, None)
    mix = write_mix(tmp / "mix", AutoTokenizer.from_pretrained(base), train_dir, FAST, 128, length, 0)["files"]
    args = {r: (r, tmp / "runs", 0, train_dir, [mix["ft_retrieval"], mix["ft_copies"]], base,
                (Stage(8, length, steps),), 128, True, (f"train.precision={precision}",)) for r in RECIPES}
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    if side == "side by side":
        run_side_by_side({r: (fine_tune, a) for r, a in args.items()}, {r: tmp / f"{r}.log" for r in RECIPES},
                         say=lambda _: None)
        processes, each = split_cores(len(RECIPES), threads)
    else:
        for a in args.values():
            fine_tune(*a)
        processes, each = 1, threads
    return {"job_seconds": time.perf_counter() - t0, "processes": processes, "threads_each": each}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="steps per fine-tune")
    p.add_argument("--length", type=int, default=1024, help="tokens per step (one row)")
    p.add_argument("--quick", action="store_true", help="smoke test: 5 steps at 256 tokens")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file the section is appended to")
    p.add_argument("--child", nargs=2, metavar=("PRECISION", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.length = 5, 256
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(*args.child, args.steps, args.length, Path(tmp))))
        return

    rows = []
    for precision, side in SIDES:
        r = run_child([__file__, "--child", precision, side, "--steps", str(args.steps), "--length",
                       str(args.length)])
        if r["status"] != "ok":
            raise SystemExit(f"{precision} {side}: {r['status']}\n{r['stderr_tail']}")
        r.update(precision=precision, side=side, tokens_per_s=2 * args.steps * args.length / r["job_seconds"])
        print(f"[bench] {precision} {side}: {r['job_seconds']:.1f} s, {r['tokens_per_s']:,.0f} tokens/s", flush=True)
        rows.append(r)
    base = rows[0]["tokens_per_s"]
    cmd = "python bench/side_by_side.py" + (" --quick" if args.quick else
                                            f" --steps {args.steps} --length {args.length}")
    lines = [f"## side_by_side — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Command: `{cmd}`; machine: {machine()}. Two fine-tunes of `llmft repro pi` (linear PI x8 and YaRN "
             f"x8 from the shipped base, 4 layers, hidden 256, vocab 2048), {args.steps} steps of one "
             f"{args.length}-token row each, one after the other with every thread against side by side with the "
             "threads split (`llmft.side_by_side`), in fp32 and in bf16 autocast (fp32 master weights). Each side "
             "in a fresh process, timed from the first fine-tune's start to the last one's end (the side-by-side "
             "workers' start-up included). Tokens/s: both fine-tunes' tokens over that time. Load: mean 1-minute "
             "load average during the side.", "",
             "| precision | fine-tunes | processes x threads | seconds | tokens/s | ratio | load |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['side']} | {r['processes']} x {r['threads_each']} | "
                     f"{r['job_seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | "
                     f"{r['load1']:.2f} |")
    lines.append("")
    write_section(args.results, lines)
    print(f"[bench] json {json.dumps(rows)}")
    print(f"[bench] load now {load1():.2f}; appended to {args.results}")


if __name__ == "__main__":
    main()
