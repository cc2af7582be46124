"""Data-build benchmark: `llmft data build` tokens/s against the raw fast tokenizer on the same text, in the same
run (ratio), plus the cached rebuild time.

    python bench/data_build.py [--copies 4] [--num-proc 2] [--repeats 3]

Text: the bundled books (Frankenstein, Moby Dick) split into ~2,000-character documents, written as jsonl ``--copies``
times. The pipeline reads, tokenizes (with BOS/EOS), chunks, mixes, packs (concat, 2048) and writes the row store (and
the validation tokens as parquet); the baselines only tokenize the same documents in batches of 256: the transformers
tokenizer call, and the Rust tokenizer's ``encode_batch_fast`` (no offsets), which the build itself uses. Baselines and
build alternate ``--repeats`` times (medians); then the build runs once with ``--num-proc`` tokenizer workers (spawned
processes, one tokenizer thread each).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmft.config.data import load_mix  # noqa: E402
from llmft.data.build import build  # noqa: E402
from llmft.testing.tiny import ASSETS, read_text  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    text = read_text(ASSETS / "frankenstein.txt.gz") + read_text(ASSETS / "mobydick.txt.gz")
    docs = [text[i : i + 2000] for i in range(0, len(text), 2000)] * args.copies
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (tmp / "mix.yaml").write_text(yaml.safe_dump({"seq_len": 2048, "sources": [
            {"name": "books", "weight": 1, "source": {"format": "jsonl", "path": str(tmp / "docs.jsonl")}}]}))

        mix = load_mix(tmp / "mix.yaml")
        raw_times, fast_times, build_times = [], [], []
        for _ in range(args.repeats):  # alternating, so both see the same machine (it is shared); medians
            t0 = time.perf_counter()
            n_raw = sum(len(ids) for i in range(0, len(docs), 256)
                        for ids in tok(docs[i : i + 256], add_special_tokens=False)["input_ids"])
            raw_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the Rust tokenizer's fastest batch call, ids only (what the build uses)
            n_fast = sum(len(e.ids) for i in range(0, len(docs), 256)
                         for e in tok.backend_tokenizer.encode_batch_fast(docs[i : i + 256], add_special_tokens=False))
            fast_times.append(time.perf_counter() - t0)
            assert n_fast == n_raw
            shutil.rmtree(tmp / "out", ignore_errors=True)
            t0 = time.perf_counter()
            built = build(mix, tmp / "out", tok, 2048)
            reference_ids = built.rows.materialize()[0].input_ids  # kept: out/ is removed below
            build_times.append(time.perf_counter() - t0)
        raw_s, fast_s, build_s = (statistics.median(t) for t in (raw_times, fast_times, build_times))
        t0 = time.perf_counter()
        assert build(mix, tmp / "out", tok, 2048, load_rows=False).cached  # what `llmft data build` does
        cached_s = time.perf_counter() - t0
        shutil.rmtree(tmp / "out")
        t0 = time.perf_counter()
        parallel = build(mix.model_copy(update={"num_proc": args.num_proc}), tmp / "out", tok, 2048)
        parallel_s = time.perf_counter() - t0
        assert torch.equal(parallel.rows.materialize()[0].input_ids, reference_ids)  # same output for any num_proc
        shutil.rmtree(tmp / "out")
    n_built = built.stats["sources"]["books"]["available_tokens"]
    lines = [
        f"## data_build — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python bench/data_build.py --copies {args.copies} --num-proc {args.num_proc} "
        f"--repeats {args.repeats}`; "
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, CPU. {len(docs):,} documents of ~2,000 "
        "characters (bundled books), tiny-llama BPE tokenizer (2048), concat packing at 2048. Raw tokenizer and build "
        f"alternate {args.repeats} times in one process; medians (range in brackets). The first build in the process "
        f"also imports matplotlib and pyarrow's parquet writer: {build_times[0]:.2f} s.",
        "",
        "| path | tokens | seconds | tokens/s | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| raw fast tokenizer: `tok(batch of 256)` | {n_raw:,} | "
        f"{raw_s:.2f} [{min(raw_times):.2f}-{max(raw_times):.2f}] | "
        f"{n_raw / raw_s:,.0f} | 1.00 |",
        f"| raw `tok.backend_tokenizer.encode_batch_fast(batch of 256)` | {n_raw:,} | {fast_s:.2f} "
        f"[{min(fast_times):.2f}-{max(fast_times):.2f}] | {n_raw / fast_s:,.0f} | {raw_s / fast_s:.2f} |",
        f"| `llmft data build` (read, tokenize, chunk, mix, pack, write) | {n_built:,} | {build_s:.2f} "
        f"[{min(build_times):.2f}-{max(build_times):.2f}] | "
        f"{n_built / build_s:,.0f} | {(n_built / build_s) / (n_raw / raw_s):.2f} "
        f"({(n_built / build_s) / (n_raw / fast_s):.2f} of encode_batch_fast) |",
        f"| `llmft data build --num-proc {args.num_proc}` (identical output) | {n_built:,} | {parallel_s:.2f} | "
        f"{n_built / parallel_s:,.0f} | {(n_built / parallel_s) / (n_raw / raw_s):.2f} |",
        f"| cached rebuild | | {cached_s:.3f} | | {cached_s / build_s:.3f} of the first build |",
        "",
    ]
    print("\n".join(lines))
    results = REPO / "bench" / "RESULTS.md"
    with open(results, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
