"""Deduplication benchmark: runtime at three corpus sizes (fitted exponent: time ~ n^b) and recall/precision
against an exact all-pairs search, for MinHash-LSH and for one and five clusterings.

    python bench/dedup.py [--sizes 4000,16000,64000] [--recall-sample 1000] [--results bench/RESULTS.md]

Corpus: :func:`llmft.testing.dedup_corpus.planted_corpus` (real sentences of the bundled books, 30% planted variants:
5-15% word edits, reorderings, restyled copies; a quarter of the bases with shared boilerplate), one source.
Settings: 3-word shingles, Jaccard threshold 0.35, 128 permutations, K = 1024 (at most n / 10), seed 0. The time
is the whole :func:`llmft.data.dedup.deduplicate` call (normalizing and shingling included) minus the recall
measurement; recall and precision come from that measurement: ``--recall-sample`` documents, each compared with
every document by the exact search.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import RESULTS, load1, write_section  # noqa: E402

from llmft.config.data import Dedup  # noqa: E402
from llmft.data.dedup import deduplicate  # noqa: E402
from llmft.testing.dedup_corpus import planted_corpus, sentences  # noqa: E402

SETTINGS = {"threshold": 0.35, "shingle_size": 3, "seed": 0}
METHODS = {
    "minhash (LSH, 128 permutations)": {"methods": ["minhash"]},
    "clusters, 1 clustering": {"methods": ["clusters"], "clusterings": 1},
    "clusters, 5 clusterings": {"methods": ["clusters"], "clusterings": 5},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4000,16000,64000", help="corpus sizes in documents (three or more)")
    p.add_argument("--recall-sample", type=int, default=1000)
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append the section to")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    pool = sentences()
    rows, times = [], {name: [] for name in METHODS}
    loads = [load1()]
    for n in sizes:
        t0 = time.perf_counter()
        corpus = planted_corpus(n, seed=0, pool=pool)
        gen_s = time.perf_counter() - t0
        words = sum(len(t.split()) for t in corpus.texts)
        print(f"n={n:,}: corpus generated in {gen_s:.1f} s ({words / n:.0f} words per document)", flush=True)
        for name, kw in METHODS.items():
            r = deduplicate(corpus.texts, ["corpus"] * n, Dedup(recall_sample=args.recall_sample, **kw, **SETTINGS))
            sec = r.report["seconds"]
            run_s = sec["total"] - sec.get("recall", 0.0)
            times[name].append(run_s)
            rec = r.report["recall"]
            st = r.report["methods"][kw["methods"][0]]
            k = f", K {st['k']['corpus']}" if "k" in st else ""
            rows.append(f"| {name} | {n:,} | {run_s:.2f} | {n / run_s:,.0f} | {st['candidates']:,}{k} | "
                        f"{rec['recall']:.2%} | {rec['recall_grouped']:.2%} | {rec['precision']:.2%} | "
                        f"{rec['true_pairs']:,} | {r.report['removed']:,} |")
            print(rows[-1], flush=True)
            loads.append(load1())
    fits = []
    for name, ts in times.items():
        b = np.polyfit(np.log(sizes), np.log(ts), 1)[0]
        fits.append(f"| {name} | {' | '.join(f'{t:.2f}' for t in ts)} | **{b:.2f}** |")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import datasketch
    import faiss

    lines = [
        f"## dedup — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python bench/dedup.py --sizes {args.sizes} --recall-sample {args.recall_sample}`; machine: {cpu}, "
        f"{os.cpu_count()} cores (shared: load average {min(loads):.1f}-{max(loads):.1f} during the run), CPU only; "
        f"datasketch {datasketch.__version__}, faiss-cpu {faiss.__version__} (one thread). Corpus: "
        "`planted_corpus(n, seed=0)` (real sentences of the bundled books, ~400 words per document, 30% planted "
        "variants: 5-15% word edits, reorderings, restyled copies; shared boilerplate on a quarter of the bases). "
        "A true pair: Jaccard of 3-word shingle sets >= 0.35. Seconds: the whole `deduplicate` call "
        "(normalize, shingle, candidates, exact check, groups) without the recall measurement. Recall and "
        f"precision: against the exact all-pairs search for {args.recall_sample:,} sampled documents (each with "
        "every document); 'grouped': true pairs whose documents ended in one group.",
        "",
        "| method | documents | seconds | documents/s | candidate pairs | recall | recall (grouped) | precision | "
        "true pairs (sample) | removed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"| method | {' | '.join(f'seconds at {n:,}' for n in sizes)} | fitted exponent b (time ~ n^b) |",
        f"|---|{'---:|' * len(sizes)}---:|",
        *fits,
        "",
    ]
    print("\n".join(lines))
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
