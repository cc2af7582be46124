"""Deduplicating a list of texts in one call (:func:`deduplicate`), and the report (dedup.md)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from llmft.config.data import Dedup
from llmft.data.dedup.index import DedupIndex, DedupResult

FEATURE_BATCH = 256  # documents per features() call in deduplicate()


def deduplicate(texts: Sequence[str], sources: Sequence[str], cfg: Dedup,
                where: Sequence[str] | None = None) -> DedupResult:
    """Find the duplicate groups among ``texts`` and choose the document kept from each: a :class:`DedupIndex` in
    a temporary directory, fed the documents in order.

    Args:
        texts: the documents, in reading order (the order ``keep: first`` uses).
        sources: the source name of each document; with ``scope: per_source`` only documents of the same source
            are compared.
        cfg: the recipe's ``dedup`` section.
        where: a location per document for the report's examples (default: its index).

    Returns:
        keep / group per document, and the report: settings, ``documents``, ``removed``, ``groups``,
        ``largest_group``, per-method candidate and pair counts, ``by_source`` (documents, removed,
        removed_exact, words_removed), ``examples`` (the least similar pairs found), ``recall`` (true pairs
        of the sampled documents, found, recall, recall_grouped, precision; None when ``recall_sample`` is 0)
        and ``seconds``.

    Raises:
        DataError: a custom embedder fails to load or returns the wrong shape.
    """
    where = list(where) if where is not None else [str(i) for i in range(len(texts))]
    with tempfile.TemporaryDirectory(prefix="llmft-dedup-") as tmp, DedupIndex(cfg, Path(tmp)) as index:
        start = 0
        for end in range(1, len(texts) + 1):  # runs of one source, at most FEATURE_BATCH documents each
            if end == len(texts) or sources[end] != sources[start] or end - start == FEATURE_BATCH:
                index.add_texts(texts[start:end], sources[start], where[start:end])
                start = end
        return index.finish()


def report_markdown(report: dict, title: str = "Deduplication report") -> str:
    """The report as a markdown page: summary, per source, methods, recall, example pairs."""
    s = report["settings"]
    lines = [f"# {title}", "",
             f"Methods {', '.join(s['methods'])}; scope {s['scope']}; a pair is a duplicate when the Jaccard "
             f"similarity of its {s['shingle_size']}-word shingle sets is at least {s['threshold']}; keep {s['keep']}.",
             "",
             f"{report['documents']:,} documents, {report['removed']:,} removed ({report['exact_duplicates']:,} exact "
             f"copies) in {report['groups']:,} groups (largest: {report['largest_group']}).", "",
             "| source | documents | removed | exact copies | words removed | tokens removed |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, st in report["by_source"].items():
        tokens = f"{st['tokens_removed']:,}" if "tokens_removed" in st else ""
        lines.append(f"| {name} | {st['documents']:,} | {st['removed']:,} | {st['removed_exact']:,} | "
                     f"{st['words_removed']:,} | {tokens} |")
    if report["methods"]:
        lines += ["", "| method | candidate pairs | pairs >= threshold | details |", "|---|---:|---:|---|"]
        for m, st in report["methods"].items():
            show = lambda v: (", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict)  # noqa: E731
                              else " / ".join(map(str, v)) if isinstance(v, list) else str(v))
            details = "; ".join(f"{k}: {show(v)}" for k, v in st.items() if k not in ("candidates", "pairs"))
            lines.append(f"| {m} | {st['candidates']:,} | {st['pairs']:,} | {details} |")
    r = report["recall"]
    if r and not r["true_pairs"]:
        lines += ["", f"Recall: an exact all-pairs search finds no true pairs for the {r['sampled_documents']:,} "
                  f"sampled documents ({r['found_pairs']:,} pairs found)."]
    elif r:
        prec = f"{r['precision']:.2%}" if r["precision"] is not None else "n/a"
        lines += ["", f"Recall against an exact all-pairs search over {r['sampled_documents']:,} sampled documents: "
                  f"{r['found']:,} of {r['true_pairs']:,} true pairs found ({r['recall']:.2%}; "
                  f"{r['recall_grouped']:.2%} ended in one group); precision {prec} ({r['found_pairs']:,} pairs "
                  "found)."]
    if report["examples"]:
        lines += ["", "Example pairs (the least similar found):", "", "| J | method | a | b |", "|---:|---|---|---|"]
        for e in report["examples"]:
            cell = lambda w, t: f"`{w}`: {t}".replace("|", "\\|")  # noqa: E731
            lines.append(f"| {e['jaccard']:.3f} | {e['method']} | {cell(e['a'], e['a_text'])} | "
                         f"{cell(e['b'], e['b_text'])} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items())]
    return "\n".join(lines) + "\n"
