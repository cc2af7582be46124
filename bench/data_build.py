"""Data-build benchmark: `llmft data build` tokens/s against the raw fast tokenizer on the same text, in the same
run (ratio), plus the cached rebuild time.

    python bench/data_build.py [--copies 4] [--num-proc 2]

Text: the bundled books (Frankenstein, Moby Dick) split into ~2,000-character documents, written as jsonl
``--copies`` times. The pipeline reads, tokenizes (with BOS/EOS), chunks, mixes, packs (concat, 2048) and writes
parquet; the baseline only calls the tokenizer on the same documents in batches of 256. The build runs once in
one process and once with ``--num-proc`` tokenizer workers (spawned processes, one tokenizer thread each).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
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

from llmft.data.build import build  # noqa: E402
from llmft.data.mix import load_mix  # noqa: E402
from llmft.model.tiny import ASSETS, read_text  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--num-proc", type=int, default=2)
    args = p.parse_args()
    text = read_text(ASSETS / "frankenstein.txt.gz") + read_text(ASSETS / "mobydick.txt.gz")
    docs = [text[i : i + 2000] for i in range(0, len(text), 2000)] * args.copies
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (tmp / "mix.yaml").write_text(yaml.safe_dump({"seq_len": 2048, "sources": [
            {"name": "books", "weight": 1, "source": {"format": "jsonl", "path": str(tmp / "docs.jsonl")}}]}))

        t0 = time.perf_counter()
        n_raw = sum(len(ids) for i in range(0, len(docs), 256)
                    for ids in tok(docs[i : i + 256], add_special_tokens=False)["input_ids"])
        raw_s = time.perf_counter() - t0

        mix = load_mix(tmp / "mix.yaml")
        t0 = time.perf_counter()
        built = build(mix, tmp / "out", tok, 2048)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert build(mix, tmp / "out", tok, 2048, load_rows=False).cached  # what `llmft data build` does
        cached_s = time.perf_counter() - t0
        shutil.rmtree(tmp / "out")
        t0 = time.perf_counter()
        parallel = build(mix.model_copy(update={"num_proc": args.num_proc}), tmp / "out", tok, 2048)
        parallel_s = time.perf_counter() - t0
        assert torch.equal(parallel.rows.input_ids, built.rows.input_ids)  # same output for any num_proc
        shutil.rmtree(tmp / "out")
    n_built = built.stats["sources"]["books"]["available_tokens"]
    lines = [
        f"## data_build — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python bench/data_build.py --copies {args.copies} --num-proc {args.num_proc}`; machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, CPU. {len(docs):,} documents of ~2,000 characters (bundled books), "
        "tiny-llama BPE tokenizer (2048), concat packing at 2048.",
        "",
        "| path | tokens | seconds | tokens/s | ratio |",
        "|---|---:|---:|---:|---:|",
        f"| raw fast tokenizer (batches of 256) | {n_raw:,} | {raw_s:.2f} | {n_raw / raw_s:,.0f} | 1.00 |",
        f"| `llmft data build` (read, tokenize, chunk, mix, pack, write) | {n_built:,} | {build_s:.2f} | "
        f"{n_built / build_s:,.0f} | {(n_built / build_s) / (n_raw / raw_s):.2f} |",
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
