"""Data-scale benchmark: how `llmft data build`'s memory and time grow with the mix, and what a training rank
then holds, at two or three sizes, with the raw tokenizer on the same text as the speed baseline.

    python bench/data_scale.py [--sizes 10,30] [--seq-len 4096] [--num-proc 1] [--dedup | --engine | --reweight]

Sizes are millions of training tokens (the mix's ``total_tokens``). The corpus is generated from the bundled books
(Frankenstein, Moby Dick): documents are random windows of their text, 1K-30K tokens long (log-uniform), written
as jsonl shards of about 1/32 of a share each (a sharded corpus, as RedPajama, the Pile and OIG are published). Four
sources with equal shares (25% each) and different sizes: ``big`` holds 10x the tokens its share needs, ``mid``
2x, ``small`` 1.5x, ``tight`` 1.2x. Concat packing at ``--seq-len``, no dedup or filters.

Per size, each in a child process: the build (peak RSS, seconds, tokens/s of text read and tokenized, bytes read per
source against the bytes its share needs), the raw fast tokenizer over the first shards of every source, up to
``--sample-mb`` each (``encode_batch_fast`` in batches of 256 documents: the speed baseline, and each source's
tokens per byte, which turns a share's tokens into the bytes it needs), and two training ranks serving an epoch of
the built rows (``bench/row_store.py``'s child: resident memory over a no-data baseline).

``--dedup``: documents are random runs of the books' sentences (so distinct documents are not near-duplicates), and
in each shard 5% of the documents are exact copies and 5% near copies (1 word in 50 changed) of earlier ones in
that shard. Each size is built twice on the same corpus, with and without Together's dedup section (exact +
MinHash, 256 permutations, Jaccard 0.8 over 5-word shingles, keep longest): the table gives both peak RSS and the
difference per document scanned, against the stated cost (256 * 4 bytes of signature while deciding).

``--engine``: each size is built twice on the same corpus, in the build's process (``num_proc`` tokenizing
workers) and with ``engine: {workers: num_proc}`` (datatrove's local executor running the per-file tasks): time,
peak RSS of the whole process tree (build and workers), the bytes the engine prepared against the bytes the build
used, and whether the rows are the same bytes.

``--reweight``: each size is built twice on the same corpus with a keyword filter (``REWEIGHT_FILTER``), without
and with ``reweight: {}`` (the default probe: hashed bag of words, 32 principal components, 20,000 documents per
sample): peak RSS of both, the difference per document read, and the build time.
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
SHARDS_PER_SHARE = 32
COPIES = 0.05  # --dedup: the share of a shard's documents that are exact copies, and again near copies
REWEIGHT_FILTER = {"kind": "keywords", "words": ["lamp"]}  # --reweight: removes about a third of the windows
DEDUP = {"methods": ["exact", "minhash"], "scope": "across_sources", "threshold": 0.8, "shingle_size": 5,
         "num_perm": 256, "keep": "longest"}  # data_recipes/together_32k_pretrain.yaml's


def write_corpus(out: Path, total_tokens: int, seed: int = 0, copies: bool = False) -> dict:
    """One directory of jsonl shards per source, documents 1K-30K tokens of book text (with ``copies``: runs of
    random sentences, and planted copies); returns {source: directory}."""
    import numpy as np
    from transformers import AutoTokenizer

    from llmft.testing.dedup_corpus import sentences
    from llmft.testing.tiny import ASSETS, read_text

    pool = sentences() if copies else None

    text = read_text(ASSETS / "frankenstein.txt.gz") + read_text(ASSETS / "mobydick.txt.gz")
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    chars_per_token = len(text) / len(tok(text[:200_000], add_special_tokens=False)["input_ids"]) * 200_000 / len(text)
    rng = np.random.default_rng(seed)
    sources = {}
    for name, ratio in SOURCES.items():
        want_chars = ratio * total_tokens / 4 * chars_per_token
        shard_chars = total_tokens / 4 / SHARDS_PER_SHARE * chars_per_token
        path = out / name
        path.mkdir()
        written, shard = 0, 0
        while written < want_chars:
            with open(path / f"{shard:05d}.jsonl", "w") as f:
                in_shard, earlier = 0, []
                while in_shard < shard_chars and written < want_chars:
                    n = int(math.exp(rng.uniform(math.log(1000), math.log(30_000))) * chars_per_token)
                    u = rng.random()
                    if copies and earlier and u < 2 * COPIES:  # a copy of an earlier document of the shard
                        doc = earlier[int(rng.integers(len(earlier)))]
                        if u >= COPIES:  # near copy: 1 word in 50 changed
                            doc = " ".join(w + "x" if i % 50 == 49 else w for i, w in enumerate(doc.split(" ")))
                    elif copies:
                        parts, size = [], 0
                        while size < n:
                            parts.append(pool[int(rng.integers(len(pool)))])
                            size += len(parts[-1]) + 1
                        doc = " ".join(parts)
                        earlier.append(doc)
                    else:
                        start = int(rng.integers(0, len(text) - n))
                        doc = text[start : start + n]
                    f.write(json.dumps({"text": doc}) + "\n")
                    written += len(doc)
                    in_shard += len(doc)
            shard += 1
        sources[name] = str(path)
    return sources


def child_build(args: argparse.Namespace) -> None:
    """Build the mix once; print stats as one JSON line."""
    from llmft.config.data import load_mix
    from llmft.data.build import build_from_recipe
    from llmft.testing.tiny import ASSETS

    t0 = time.perf_counter()
    mix = load_mix(args.mix)
    built = build_from_recipe(mix, Path(args.out), args.seq_len, str(ASSETS / "tiny-llama"),
                              load_rows=False)
    seconds = time.perf_counter() - t0
    s = built.stats
    print(json.dumps({"seconds": seconds, "total_tokens": s["total_tokens"], "dedup": s["dedup"] and {
                          k: s["dedup"][k] for k in ("documents", "removed", "exact_duplicates")},
                      "read_tokens": sum(v["available_tokens"] + s["validation_tokens"].get(k, 0)
                                         for k, v in s["sources"].items()),
                      "sources": {k: {x: v[x] for x in ("available_tokens", "selected_tokens", "realized_share",
                                                         "documents", "target_tokens", "bytes_read", "bytes_total",
                                                         "files_read", "files_total", "deduplicated")}
                                  | {"bytes_prepared": v.get("bytes_prepared"), "filtered": v.get("filtered")}
                                  for k, v in s["sources"].items()},
                      "reweight": s["reweight"] and {k: {x: v[x] for x in ("documents", "kept", "probe_accuracy")}
                                                     for k, v in s["reweight"]["by_source"].items()},
                      "validation_fraction": mix.validation_fraction}))


def child_tokenize(args: argparse.Namespace) -> None:
    """The raw fast tokenizer over the first shards of each source directory (up to ``--sample-mb`` each): read the
    jsonl, encode_batch_fast in batches of 256; per source, the tokens and bytes it covered."""
    from transformers import AutoTokenizer

    from llmft.testing.tiny import ASSETS

    backend = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").backend_tokenizer
    seconds, tokens, per_source = 0.0, 0, {}
    for source in args.files.split(","):
        got, size = 0, 0
        for path in sorted(Path(source).iterdir()):
            if size >= args.sample_mb * 2**20:
                break
            size += path.stat().st_size
            with open(path) as f:
                texts = [json.loads(line)["text"] for line in f]
            t0 = time.perf_counter()
            for i in range(0, len(texts), 256):
                got += sum(len(e.ids) for e in backend.encode_batch_fast(texts[i : i + 256], add_special_tokens=False))
            seconds += time.perf_counter() - t0
        tokens += got
        per_source[Path(source).name] = {"tokens": got, "bytes": size}
    print(json.dumps({"seconds": seconds, "tokens": tokens, "sources": per_source}))


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
    p.add_argument("--sample-mb", type=float, default=64, help="MiB per source the raw tokenizer reads")
    p.add_argument("--dir", default=None, help="where to write the corpora (default: a temporary directory)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--dedup", action="store_true", help="sentence-run documents with planted copies; each size "
                   "built with and without dedup")
    p.add_argument("--engine", action="store_true", help="each size also built with the data engine (datatrove's "
                   "local executor): time, memory and rows compared")
    p.add_argument("--reweight", action="store_true", help="each size built with a keyword filter, without and "
                   "with reweight")
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
            sources = write_corpus(tmp, total, copies=args.dedup)
            mix = {"seq_len": args.seq_len, "total_tokens": total, "packing": "concat", "num_proc": args.num_proc,
                   "sources": [{"name": n, "weight": 1, "source": {"format": "jsonl", "path": s}}
                               for n, s in sources.items()]}

            def build(name: str) -> dict:  # in a child process: its peak RSS is the build's
                (tmp / f"{name}.yaml").write_text(yaml.safe_dump(mix, sort_keys=False))
                out = run_child([str(Path(__file__)), "--child", "build", "--mix", str(tmp / f"{name}.yaml"), "--out",
                                 str(tmp / name), "--seq-len", str(args.seq_len)], timeout_s=7200)
                if out["status"] != "ok":
                    raise SystemExit(f"the build failed ({out['status']}): {out['stderr_tail']}")
                return out

            # the same corpus without dedup (the dedup cost's baseline), without the engine, or without reweight
            if args.reweight:  # the filter removes more of the long windows: the tight sources may take a 2nd pass
                mix["filters"] = [REWEIGHT_FILTER]
                for s in mix["sources"]:
                    s["max_epochs"] = 3
            plain = build("plain") if args.dedup or args.engine or args.reweight else None
            if args.dedup:
                mix["dedup"] = DEDUP
            if args.engine:
                mix["engine"] = {"workers": args.num_proc}
            if args.reweight:
                mix["reweight"] = {}
            b = build("out")
            b["plain"] = plain
            if args.engine:
                b["same_rows"] = all((tmp / "plain" / "rows" / f.name).read_bytes() == f.read_bytes()
                                     for f in (tmp / "out" / "rows").iterdir())
            t = run_child([str(Path(__file__)), "--child", "tokenize", "--sample-mb", str(args.sample_mb), "--files",
                           ",".join(sources.values())], timeout_s=7200)
            r = ranks(tmp / "out" / "rows")
            table.append((size, sources, b, t, r))
            print(f"{size:g} M: build peak {b['watched_peak_rss'] / GB:.2f} GB in {b['seconds']:.0f} s; "
                  f"rank data RSS {[round(x['data_rss'] / MB, 1) for x in r]} MiB", flush=True)

    flag = " --dedup" if args.dedup else " --engine" if args.engine else " --reweight" if args.reweight else ""
    lines = [f"## data_scale{flag} — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"`python bench/data_scale.py --sizes {args.sizes} --seq-len {args.seq_len} --num-proc {args.num_proc}"
             f"{flag}` on {machine()}.", "",
             "Four sources of jsonl shards (each about 1/32 of a share) of book-text documents (1K-30K tokens), 25% "
             "shares; `big` holds 10x what its share needs, `mid` 2x, `small` 1.5x, `tight` 1.2x. Concat packing, "
             "tiny-llama BPE. Build: peak RSS of the build process (sampled every 50 ms). Tokens/s: tokens read and "
             "tokenized per second, against `encode_batch_fast` alone on the first shards of every source. "
             "Read/needed: the bytes the build read from a source over the bytes its share needs (its tokens, plus "
             "the held-out fraction, at the source's tokens per byte).", "",
             "| training tokens | text read (tokens) | build peak RSS | bytes/token built | build s | tokens/s vs raw "
             "tokenizer | read / needed: big, mid, small, tight | realized shares | rank data RSS (2 ranks) |",
             "|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for size, sources, b, t, r in table:
        shares = ", ".join(f"{v['realized_share']:.3f}" for v in b["sources"].values())
        ratios = []
        for name, v in b["sources"].items():
            per_byte = t["sources"][name]["tokens"] / t["sources"][name]["bytes"]
            kept = 1 - v["deduplicated"] / v["documents"]  # with dedup, the share needs this much more text
            ratios.append(v["bytes_read"] / (v["target_tokens"] / (1 - b["validation_fraction"]) / per_byte / kept))
        lines.append(f"| {b['total_tokens'] / 1e6:,.1f} M | {b['read_tokens'] / 1e6:,.1f} M | "
                     f"{b['watched_peak_rss'] / GB:.2f} GB | {b['watched_peak_rss'] / b['total_tokens']:.1f} | "
                     f"{b['seconds']:.0f} | {b['read_tokens'] / b['seconds'] / (t['tokens'] / t['seconds']):.2f} | "
                     + ", ".join(f"{x:.2f}" for x in ratios) + f" | {shares} | "
                     + " / ".join(f"{x['data_rss'] / MB:.1f} MiB" for x in r) + " |")
    if len(table) >= 2:
        (s0, _, b0, _, _), (s1, _, b1, _, _) = table[0], table[-1]
        slope = (b1["watched_peak_rss"] - b0["watched_peak_rss"]) / (b1["total_tokens"] - b0["total_tokens"])
        lines += ["", f"Build peak RSS at {s1:g} M is {b1['watched_peak_rss'] / b0['watched_peak_rss']:.2f}x the "
                  f"{s0:g} M figure: it grows by {slope:.2f} bytes per training token "
                  f"({b1['read_tokens'] / b1['total_tokens']:.2f} tokens read per token built); extrapolated to "
                  f"Together's 1.5 B-token phase 1: "
                  f"{(b1['watched_peak_rss'] + slope * (1.5e9 - b1['total_tokens'])) / GB:,.2f} GB."]
    if args.dedup:
        lines += [
            "",
            "Dedup (Together's settings: exact + MinHash, 256 permutations, keep longest; sentence-run "
            f"documents, {COPIES:.0%} exact and {COPIES:.0%} near copies per shard; read/needed above counts "
            "the removed documents as needed reading): peak RSS of the same build with and without dedup.",
            "",
            "| training tokens | documents scanned | removed (exact) | peak RSS without | peak RSS with dedup | "
            "difference | per document scanned | build s without / with |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for size, sources, b, t, r in table:
            d, p = b["dedup"], b["plain"]
            diff = b["watched_peak_rss"] - p["watched_peak_rss"]
            lines.append(f"| {b['total_tokens'] / 1e6:,.1f} M | {d['documents']:,} | {d['removed']:,} "
                         f"({d['exact_duplicates']:,}) | {p['watched_peak_rss'] / GB:.3f} GB | "
                         f"{b['watched_peak_rss'] / GB:.3f} GB | {diff / MB:+.1f} MiB | "
                         f"{diff / d['documents'] / 1024:+.2f} KiB | {p['seconds']:.0f} / {b['seconds']:.0f} |")
    if args.engine:
        lines += ["", f"Engine (datatrove's local executor, {args.num_proc} workers, one file per task) against the "
                  f"build's own process ({args.num_proc} tokenizing workers), same corpus; the rows above are the "
                  "engine's. RSS: peak of the whole process tree.", "",
                  "| training tokens | build s: process / engine | peak tree RSS: process / engine | "
                  "bytes prepared / used by the build: big, mid, small, tight | same rows |",
                  "|---:|---|---|---|---|"]
        for size, sources, b, t, r in table:
            p = b["plain"]
            prepared = ", ".join(f"{v['bytes_prepared'] / v['bytes_read']:.2f}" for v in b["sources"].values())
            lines.append(f"| {b['total_tokens'] / 1e6:,.1f} M | {p['seconds']:.0f} / {b['seconds']:.0f} | "
                         f"{p['watched_peak_tree_rss'] / GB:.2f} / {b['watched_peak_tree_rss'] / GB:.2f} GB | "
                         f"{prepared} | {'yes' if b['same_rows'] else 'NO'} |")
    if args.reweight:
        lines += ["", f"Reweight (a keyword filter {REWEIGHT_FILTER['words']}, then `reweight: {{}}`: every document "
                  "read embedded into a staging file, the probe fitted on 20,000 documents per sample) against the "
                  "same build with the filter alone; the rows above are the reweighted build's.", "",
                  "| training tokens | documents read (kept) | peak RSS: filter / + reweight | difference | "
                  "per document read | build s: filter / + reweight | probe accuracy: big, mid, small, tight |",
                  "|---:|---:|---|---:|---:|---|---|"]
        for size, sources, b, t, r in table:
            p, rw = b["plain"], b["reweight"]
            docs, kept = sum(v["documents"] for v in rw.values()), sum(v["kept"] for v in rw.values())
            diff = b["watched_peak_rss"] - p["watched_peak_rss"]
            lines.append(f"| {b['total_tokens'] / 1e6:,.1f} M | {docs:,} ({kept:,}) | "
                         f"{p['watched_peak_rss'] / GB:.3f} / {b['watched_peak_rss'] / GB:.3f} GB | "
                         f"{diff / MB:+.1f} MiB | {diff / docs:+.0f} B | {p['seconds']:.0f} / {b['seconds']:.0f} | "
                         + ", ".join(f"{v['probe_accuracy']:.3f}" for v in rw.values()) + " |")
    lines.append("")
    write_section(args.results, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
