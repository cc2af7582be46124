"""Data-scale benchmark: how `llmft data build`'s memory and time grow with the mix, and what a training rank
then holds, at two or three sizes, with the raw tokenizer on the same text as the speed baseline.

    python bench/data_scale.py [--sizes 10,30] [--seq-len 4096] [--num-proc 1]

Sizes are millions of training tokens (the mix's ``total_tokens``). The corpus is generated from the bundled books
(Frankenstein, Moby Dick): documents are random windows of their text, 1K-30K tokens long (log-uniform), written
as jsonl. Four sources with equal shares (25% each) and different sizes: ``big`` holds 10x the tokens its share
needs, ``mid`` 2x, ``small`` 1.5x, ``tight`` 1.2x. Concat packing at ``--seq-len``, no dedup or filters.

Per size, each in a child process: the build (peak RSS, seconds, tokens/s of text read and tokenized, bytes read per
source against the bytes its share needs), the raw fast tokenizer over the same files (``encode_batch_fast`` in
batches of 256 documents: the speed baseline), and two training ranks serving an epoch of the built rows
(``bench/row_store.py``'s child: resident memory over a no-data baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import RESULTS, machine, run_child, write_section  # noqa: E402

SOURCES = {"big": 10.0, "mid": 2.0, "small": 1.5, "tight": 1.2}  # corpus size / tokens its 25% share needs
CHARS_PER_TOKEN = 3.2  # the tiny BPE on the books (measured when the corpus is written)


def write_corpus(out: Path, total_tokens: int, seed: int = 0) -> dict:
    """One jsonl per source, documents 1K-30K tokens of book text; returns {source: {"path", "tokens"}} (tokens
    counted with the tokenizer)."""
    import numpy as np
    from transformers import AutoTokenizer

    from llmft.model.tiny import ASSETS, read_text

    text = read_text(ASSETS / "frankenstein.txt.gz") + read_text(ASSETS / "mobydick.txt.gz")
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    chars_per_token = len(text) / len(tok(text[:200_000], add_special_tokens=False)["input_ids"]) * 200_000 / len(text)
    rng = np.random.default_rng(seed)
    sources = {}
    for name, ratio in SOURCES.items():
        want_chars = ratio * total_tokens / 4 * chars_per_token
        path = out / f"{name}.jsonl"
        written = 0
        with open(path, "w") as f:
            while written < want_chars:
                n = int(math.exp(rng.uniform(math.log(1000), math.log(30_000))) * chars_per_token)
                start = int(rng.integers(0, len(text) - n))
                doc = text[start : start + n]
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc)
        sources[name] = {"path": str(path), "bytes": path.stat().st_size}
    return sources


def child_build(args: argparse.Namespace) -> None:
    """Build the mix once; print stats as one JSON line."""
    from llmft.data.build import build_from_recipe
    from llmft.data.mix import load_mix
    from llmft.model.tiny import ASSETS

    t0 = time.perf_counter()
    built = build_from_recipe(load_mix(args.mix), Path(args.out), args.seq_len, str(ASSETS / "tiny-llama"),
                              load_rows=False)
    seconds = time.perf_counter() - t0
    s = built.stats
    print(json.dumps({"seconds": seconds, "total_tokens": s["total_tokens"],
                      "read_tokens": sum(v["available_tokens"] + s["validation_tokens"].get(k, 0)
                                         for k, v in s["sources"].items()),
                      "sources": {k: {x: v[x] for x in ("available_tokens", "selected_tokens", "realized_share",
                                                         "documents")} for k, v in s["sources"].items()}}))


def child_tokenize(args: argparse.Namespace) -> None:
    """The raw fast tokenizer over the same files: read the jsonl, encode_batch_fast in batches of 256."""
    from transformers import AutoTokenizer

    from llmft.model.tiny import ASSETS

    backend = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").backend_tokenizer
    t0, tokens = time.perf_counter(), 0
    for path in args.files.split(","):
        batch = []
        with open(path) as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 256:
                    tokens += sum(len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
                    batch = []
        if batch:
            tokens += sum(len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
    print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": tokens}))


def ranks(store: Path) -> list[dict]:
    results: list[dict] = [{}, {}]

    def run(rank: int) -> None:
        results[rank] = run_child([str(REPO / "bench" / "row_store.py"), "--child", "--store", str(store), "--rank",
                                   str(rank), "--world", "2"], timeout_s=3600)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def main() -> None:
    import yaml

    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10,30", help="millions of training tokens, comma-separated")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--dir", default=None, help="where to write the corpora (default: a temporary directory)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--child", choices=["build", "tokenize"], help=argparse.SUPPRESS)
    p.add_argument("--mix", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "build":
        return child_build(args)
    if args.child == "tokenize":
        return child_tokenize(args)

    GB, MB = 1e9, 2**20
    table = []
    for size in [float(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            tmp = Path(tmp)
            total = int(size * 1e6)
            sources = write_corpus(tmp, total)
            mix = {"seq_len": args.seq_len, "total_tokens": total, "packing": "concat", "num_proc": args.num_proc,
                   "sources": [{"name": n, "weight": 1, "source": {"format": "jsonl", "path": s["path"]}}
                               for n, s in sources.items()]}
            (tmp / "mix.yaml").write_text(yaml.safe_dump(mix, sort_keys=False))
            b = run_child([str(Path(__file__)), "--child", "build", "--mix", str(tmp / "mix.yaml"), "--out",
                           str(tmp / "out"), "--seq-len", str(args.seq_len)], timeout_s=7200)
            if b["status"] != "ok":
                raise SystemExit(f"the build failed ({b['status']}): {b['stderr_tail']}")
            t = run_child([str(Path(__file__)), "--child", "tokenize", "--files",
                           ",".join(s["path"] for s in sources.values())], timeout_s=7200)
            r = ranks(tmp / "out" / "rows")
            table.append((size, sources, b, t, r))
            print(f"{size:g} M: build peak {b['watched_peak_rss'] / GB:.2f} GB in {b['seconds']:.0f} s; "
                  f"rank data RSS {[round(x['data_rss'] / MB, 1) for x in r]} MiB", flush=True)

    lines = [f"## data_scale — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"`python bench/data_scale.py --sizes {args.sizes} --seq-len {args.seq_len} --num-proc {args.num_proc}` "
             f"on {machine()}.", "",
             "Four jsonl sources of book-text documents (1K-30K tokens), 25% shares; `big` holds 10x what its share "
             "needs, `mid` 2x, `small` 1.5x, `tight` 1.2x. Concat packing, tiny-llama BPE. Build: peak RSS of the "
             "build process (sampled every 50 ms). Tokens/s: tokens read and tokenized per second (all sources, "
             "whole), against `encode_batch_fast` alone on the same files. Read/needed: the bytes the build read "
             "from `big` over the bytes its share needs.", "",
             "| training tokens | text read (tokens) | build peak RSS | bytes/token built | build s | tokens/s vs raw "
             "tokenizer | `big` read / needed | realized shares | rank data RSS (2 ranks) |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for size, sources, b, t, r in table:
        shares = ", ".join(f"{v['realized_share']:.3f}" for v in b["sources"].values())
        big = b["sources"]["big"]
        lines.append(f"| {b['total_tokens'] / 1e6:,.1f} M | {b['read_tokens'] / 1e6:,.1f} M | "
                     f"{b['watched_peak_rss'] / GB:.2f} GB | {b['watched_peak_rss'] / b['total_tokens']:.1f} | "
                     f"{b['seconds']:.0f} | {b['read_tokens'] / b['seconds'] / (t['tokens'] / t['seconds']):.2f} | "
                     f"{big['available_tokens'] / big['selected_tokens']:.1f} | {shares} | "
                     + " / ".join(f"{x['data_rss'] / MB:.1f} MiB" for x in r) + " |")
    if len(table) >= 2:
        (s0, _, b0, _, _), (s1, _, b1, _, _) = table[0], table[-1]
        slope = (b1["watched_peak_rss"] - b0["watched_peak_rss"]) / (b1["total_tokens"] - b0["total_tokens"])
        lines += ["", f"Build RSS grows by {slope:.1f} bytes per training token between {s0:g} M and {s1:g} M "
                  f"(the whole corpus read: {b1['read_tokens'] / b1['total_tokens']:.1f} tokens read per token built); "
                  f"extrapolated to Together's 1.5 B-token phase 1: {(b1['watched_peak_rss'] + slope * (1.5e9 - b1['total_tokens'])) / GB:,.0f} GB."]
    lines.append("")
    write_section(args.results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
