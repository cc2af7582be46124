"""Evaluation throughput: ``llmft eval --ppl pg19`` (``llmft.eval.ppl.evaluate_ppl``, windows protocol) against a raw
``model(input_ids)`` forward loop over the same windows under ``torch.no_grad``, same model, in the same process.

    python bench/eval_throughput.py [--lengths 2048 4096] [--windows 6] [--repeats 3] [--quick]
                                    [--results bench/RESULTS.md]

Model: LLaMA 4 layers, hidden 256, 4 heads, MLP 688, vocab 32000, random init (seed 0), fp32, SDPA, eval mode.
Book: Moby Dick (Project Gutenberg #2701, ../shared/data/gutenberg, header and footer stripped by llmft's PG-19 reader;
else the bundled copy), tokenized by ``llmft.eval.pg19.load_books``; at each length L the first ``--windows`` x L
tokens. llmft scores every window (NLL sum, tokens, bytes); the baseline only runs the forward pass (logits, no loss,
``use_cache=False``: without it the forward also fills a KV cache, which made the baseline slower than llmft's scoring
in the 15:54 run of 2026-11-22). The two alternate ``--repeats`` times after one warm-up window each; tokens/s = windows
x L / median seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED_BOOKS, load1, machine, write_model_dir, write_section  # noqa: E402

sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--windows", type=int, default=6, help="windows per length")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side, alternating the order")
    p.add_argument("--quick", action="store_true", help="smoke test: lengths 256 512, 2 windows, 1 repeat")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file the section is appended to")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.windows, args.repeats = [256, 512], 2, 1

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmft.eval.pg19 import load_books
    from llmft.eval.ppl import Book, evaluate_ppl
    from llmft.testing.tiny import ASSETS, read_text

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_dir(tmp / "model", max(args.lengths))
        tok = AutoTokenizer.from_pretrained(model_dir)
        if (SHARED_BOOKS / "2701.txt").is_file():
            (tmp / "books").mkdir()
            (tmp / "books" / "2701.txt").symlink_to(SHARED_BOOKS / "2701.txt")
        else:
            (tmp / "books").mkdir()
            (tmp / "books" / "2701.txt").write_text(read_text(ASSETS / "mobydick.txt.gz"), encoding="utf-8")
        book = load_books(tmp / "books", tok)[0]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()

    def llmft_side(b: Book, length: int) -> dict:
        return evaluate_ppl(model, [b], [length], "windows")[length]

    @torch.no_grad()
    def raw_side(b: Book, length: int) -> None:
        ids = torch.from_numpy(b.ids)
        for start in range(0, len(ids) - length + 1, length):
            model(input_ids=ids[start : start + length][None], use_cache=False)  # no KV cache: the leanest forward

    rows = []
    for length in args.lengths:
        n = args.windows * length
        if len(book.ids) < n:
            raise SystemExit(f"the book has {len(book.ids):,} tokens, fewer than {args.windows} x {length}")
        part = Book(book.name, book.ids[:n], book.nbytes[:n])
        warm = Book(book.name, book.ids[n : n + length], book.nbytes[n : n + length])
        llmft_side(warm, length)
        raw_side(warm, length)
        times: dict[str, list[float]] = {"llmft": [], "raw": []}
        loads: list[float] = []
        result = None
        for r in range(args.repeats):
            for side in (("llmft", "raw") if r % 2 == 0 else ("raw", "llmft")):
                loads.append(load1())
                t0 = time.perf_counter()
                out = llmft_side(part, length) if side == "llmft" else raw_side(part, length)
                times[side].append(time.perf_counter() - t0)
                result = out if side == "llmft" else result
            print(f"[bench] L={length} repeat {r}: llmft {times['llmft'][-1]:.2f} s, raw {times['raw'][-1]:.2f} s, "
                  f"load {loads[-1]:.2f}", flush=True)
        assert result["windows"] == args.windows and result["tokens"] == args.windows * (length - 1)
        tps = {k: n / statistics.median(v) for k, v in times.items()}
        rows.append({"length": length, "llmft_tps": tps["llmft"], "raw_tps": tps["raw"],
                     "ratio": tps["llmft"] / tps["raw"], "ppl_per_byte": result["ppl_per_byte"],
                     "load": statistics.mean(loads), "times": times})

    cmd = (f"python bench/eval_throughput.py --lengths {' '.join(map(str, args.lengths))} --windows {args.windows} "
           f"--repeats {args.repeats}" + (" --quick" if args.quick else ""))
    lines = [
        f"## eval_throughput — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; machine: {machine()}. Model: LLaMA 4 layers, hidden 256, vocab 32000, random init, fp32, "
        f"SDPA, eval mode. Book: Moby Dick (Gutenberg #2701), the first {args.windows} windows of each length. "
        "llmft: `llmft.eval.ppl.evaluate_ppl` (windows protocol: forward + NLL, tokens and bytes of every window); "
        "baseline: `model(input_ids=window, use_cache=False)` under `torch.no_grad` (forward only, no KV cache). "
        "Same process, alternating, "
        f"{args.repeats} passes each after a warm-up window; median. Load: mean 1-minute load average.",
        "",
        "| context | raw forward tokens/s | llmft eval --ppl tokens/s | ratio | load |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {r['length']} | {r['raw_tps']:,.0f} | {r['llmft_tps']:,.0f} | {r['ratio']:.2f} | {r['load']:.2f} |"
            for r in rows
        ],
        "",
    ]
    print("\n".join(lines))
    print("[bench] json " + json.dumps(rows))
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
