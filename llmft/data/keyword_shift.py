"""``llmft data report --keywords``: how the filters shifted the frequency of chosen keywords, and how much of the
shift the reweighting undoes.

For each keyword (a whole word or phrase, case-insensitive, as in :func:`llmft.data.filters.keyword_regex`), its
frequency per 1M words (words: whitespace-separated) in

- the unfiltered documents (after decontamination and deduplication, before the ``filters``),
- the kept documents,
- the kept documents weighted by the reweighting (every occurrence and every word of a document counts w times)::

      f_reweighted = 1e6 * sum_d w_d * count_d / sum_d w_d * words_d

The shift is the relative change against the unfiltered frequency, ``f / f_unfiltered - 1``, and the reduction
``1 - |shift_reweighted| / |shift_filtered|``. Written as keyword_shift.md, keyword_shift.json and
keyword_shift.png (grouped bars).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmft.data.filters import keyword_regex


def keyword_counts(texts: Sequence[str], keywords: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """((n, k) occurrences of each keyword per document, (n,) words per document)."""
    counts = np.zeros((len(texts), len(keywords)), dtype=np.int64)
    for j, k in enumerate(keywords):
        rx = keyword_regex([k])
        counts[:, j] = [len(rx.findall(t)) for t in texts]
    words = np.array([len(t.split()) for t in texts], dtype=np.int64)
    return counts, words


def _freq(counts: np.ndarray, words: np.ndarray, w: np.ndarray) -> np.ndarray:
    return 1e6 * (w @ counts) / max(float(w @ words), 1.0)


def keyword_shift(texts: Sequence[str], keep: np.ndarray, weights: np.ndarray | None,
                  keywords: Sequence[str]) -> dict:
    """The keyword-shift table.

    Args:
        texts: every document before filtering.
        keep: (n,) bool, kept by the filters.
        weights: (kept,) the reweighting's weights of the kept documents in order, or None (no reweighting).
        keywords: the keywords.

    Returns:
        {"documents": {...}, "words": {...}, "keywords": {keyword: {unfiltered, filtered, reweighted,
        shift_filtered, shift_reweighted, shift_reduction}}} (frequencies per 1M words; reweighted entries None
        without weights).
    """
    counts, words = keyword_counts(texts, keywords)
    keep = np.asarray(keep, dtype=bool)
    ones = np.ones(len(texts))
    f_u = _freq(counts, words, ones)
    f_f = _freq(counts[keep], words[keep], ones[keep])
    f_r = _freq(counts[keep], words[keep], np.asarray(weights, dtype=np.float64)) if weights is not None else None
    table = {}
    for j, k in enumerate(keywords):
        u, f = float(f_u[j]), float(f_f[j])
        shift_f = f / u - 1 if u else None
        entry = {"unfiltered": u, "filtered": f, "shift_filtered": shift_f, "reweighted": None,
                 "shift_reweighted": None, "shift_reduction": None,
                 "occurrences": {"unfiltered": int(counts[:, j].sum()), "filtered": int(counts[keep, j].sum())}}
        if f_r is not None:
            r = float(f_r[j])
            entry["reweighted"] = r
            entry["shift_reweighted"] = r / u - 1 if u else None
            if shift_f:
                entry["shift_reduction"] = 1 - abs(entry["shift_reweighted"]) / abs(shift_f)
        table[k] = entry
    return {"documents": {"unfiltered": int(len(texts)), "filtered": int(keep.sum())},
            "words": {"unfiltered": int(words.sum()), "filtered": int(words[keep].sum())},
            "reweighted": weights is not None, "keywords": table}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def shift_markdown(report: dict) -> str:
    rw = report["reweighted"]
    lines = ["# Keyword shift", "",
             f"Documents: {report['documents']['unfiltered']:,} unfiltered, {report['documents']['filtered']:,} kept. "
             "Frequencies per 1M words, whole word, case-insensitive.", ""]
    head = "| keyword | unfiltered | filtered | shift |" + (" reweighted | shift | reduction |" if rw else "")
    lines += [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for k, e in report["keywords"].items():
        line = f"| {k} | {e['unfiltered']:.1f} | {e['filtered']:.1f} | {_pct(e['shift_filtered'])} |"
        if rw:
            red = "n/a" if e["shift_reduction"] is None else f"{100 * e['shift_reduction']:.0f}%"
            line += f" {e['reweighted']:.1f} | {_pct(e['shift_reweighted'])} | {red} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_shift_report(report: dict, out: Path) -> None:
    """keyword_shift.json, keyword_shift.md and keyword_shift.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "keyword_shift.json").write_text(json.dumps(report, indent=1))
    (out / "keyword_shift.md").write_text(shift_markdown(report))
    keys = list(report["keywords"])
    series = [("unfiltered", "unfiltered"), ("filtered", "filtered")]
    if report["reweighted"]:
        series.append(("reweighted", "reweighted filtered"))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(keys) + 2), 3.8), dpi=110)
    width = 0.8 / len(series)
    xs = np.arange(len(keys))
    for s, (field, label) in enumerate(series):
        ax.bar(xs + (s - (len(series) - 1) / 2) * width, [report["keywords"][k][field] for k in keys], width,
               label=label)
    ax.set_xticks(xs, keys, fontsize=8)
    ax.set_ylabel("occurrences per 1M words")
    ax.set_title("Keyword frequency before and after filtering")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "keyword_shift.png")
    plt.close(fig)


def keyword_report(target: Path, keywords: list[str], out: Path | None = None,
                   overrides: list[str] | None = None) -> tuple[dict, Path]:
    """The keyword-shift report of a built mix (its ``stats.json`` holds the resolved recipe; the sources are read
    again) or of a data recipe, written under ``out`` (default: the built directory).

    Returns:
        (the report, where it was written).

    Raises:
        RecipeError: ``out`` is missing for a recipe.
        DataError: the build has no recipe in its stats, or the mix has no filters.
    """
    from llmft.config import RecipeError
    from llmft.config.data import MixRecipe, load_mix
    from llmft.data.build import curate_recipe
    from llmft.data.sources import DataError

    if target.is_dir():
        stats_file = target / "stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        if "mix" not in stats:
            raise DataError(f"{target}: no stats.json with the recipe (built before filters existed?); rebuild it or "
                            "pass the data recipe")
        mix, out = MixRecipe.model_validate(stats["mix"]), Path(out or target)
    else:
        if out is None:
            raise RecipeError([f"{target}: --out is required when reporting on a recipe (where to write the report)"])
        mix = load_mix(target, overrides or [])
    if not mix.filters:
        raise DataError(f"{target}: the mix has no filters, so nothing shifted; add a filters section")
    curated = curate_recipe(mix)
    texts = [t for c in curated.values() for t in c.texts]
    keep = np.concatenate([c.keep for c in curated.values()])
    weights = None if mix.reweight is None else np.concatenate([c.weights for c in curated.values()])
    report = keyword_shift(texts, keep, weights, keywords)
    report["by_source"] = {n: keyword_shift(c.texts, c.keep, c.weights, keywords)["keywords"]
                           for n, c in curated.items()}
    write_shift_report(report, out)
    return report, out
