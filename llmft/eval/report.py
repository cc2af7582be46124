"""Perplexity reports: markdown table, JSON and a PNG of perplexity against context length, for one or more
models, and the side-by-side comparison of earlier reports (``llmft eval --compare``).

``ppl.json`` layout::

    {"protocol": {"data": ..., "mode": "windows", "stride": 256, "lengths": [...], "max_docs": ...},
     "models": {"<model>": {"<L>": {"ppl_per_byte", "token_ppl", "bits_per_byte", "nll", "tokens", "bytes",
                                    "windows", "books", "too_short"}}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def _num(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


LABELS = {"ppl_per_byte": "ppl/byte", "token_ppl": "token ppl", "ppl": "token ppl"}
DIGITS = {"ppl_per_byte": 3, "token_ppl": 2, "ppl": 2}


def ppl_table(models: dict[str, dict[int, dict]], metrics: Sequence[str] = ("ppl_per_byte", "token_ppl"), *,
              by: Literal["length", "model"] = "length", compare: bool = True, context: int | None = None,
              digits: int | None = None, length_format: str = "{:,}", first_header: str | None = None) -> str:
    """The markdown table of perplexity results, for every report that has one (``llmft eval``, ``--compare``,
    the quickstart, ``llmft repro``).

    Args:
        models: ``{name: {length: {metric: value, ...}}}`` (lengths as ints or strings).
        metrics: the columns (``by="length"``: a column per metric per model, labelled ``"<model> <metric>"`` when
            there are several metrics, else ``"<model>"``; ``by="model"``: the first metric only).
        by: ``"length"``: a row per context length; ``"model"``: a row per model, a column per length (the PI
            paper's Table 1).
        compare: with ``by="length"`` and two or more models, a column per later model with its relative change
            of the first metric against the first model.
        context: with ``by="model"``, the pre-training length C: length columns read ``2,048 (2C)``.
        digits: decimals (default: 3 for perplexity per byte, 2 for token perplexity).
        length_format: how a length is written.
        first_header: the first column's header (default: ``context``, or ``model`` with ``by="model"``).

    Books shorter than a length (``too_short``) are listed under the table.
    """
    names = list(models)

    def get(name: str, length: int) -> dict:
        res = models[name]
        return res.get(length, res.get(str(length), {}))

    def num(x, metric: str) -> str:
        return _num(x, DIGITS.get(metric, 2) if digits is None else digits)

    lengths = sorted({int(n) for r in models.values() for n in r})
    if by == "model":
        metric = metrics[0]
        head = [first_header or "model"] + [
            length_format.format(n) + ("" if context is None else " (C)" if n == context else f" ({n // context}C)")
            for n in lengths]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(lengths)]
        lines += ["| " + " | ".join([name] + [num(get(name, n).get(metric, math.nan), metric) for n in lengths]) + " |"
                  for name in names]
        return "\n".join(lines)
    cols = [(m, n) for m in metrics for n in names]
    head = [first_header or "context"] + [f"{n} {LABELS.get(m, m)}" if len(metrics) > 1 else n for m, n in cols]
    compare = compare and len(names) > 1
    if compare:
        head += [f"{n} vs {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for length in lengths:
        cells = [length_format.format(length)] + [num(get(n, length).get(m, math.nan), m) for m, n in cols]
        if compare:
            base = get(names[0], length).get(metrics[0], math.nan)
            for n in names[1:]:
                v = get(n, length).get(metrics[0], math.nan)
                cells.append("—" if math.isnan(base) or math.isnan(v) else f"{100 * (v / base - 1):+.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {n}: {len(r['too_short'])} book(s) shorter than {int(length):,} tokens, not scored at that length "
             f"({', '.join(r['too_short'][:5])}{', ...' if len(r['too_short']) > 5 else ''})"
             for n in names for length, r in sorted(models[n].items(), key=lambda kv: int(kv[0])) if r.get("too_short")]
    return "\n".join(lines + ([""] + notes if notes else []))


YLABELS = {"ppl_per_byte": "perplexity per byte", "token_ppl": "token perplexity"}


def plot_ppl(models: dict[str, dict[int, dict]], path: Path, metric: str = "ppl_per_byte", title: str = "",
             ylabel: str = "", trained_len: int | None = None, trained_label: str = "training length",
             dashed: frozenset[str] = frozenset(), log_y: bool = False, legend_outside: bool = False) -> Path:
    """PNG of ``metric`` against context length (log2 axis), one line per model.

    Args:
        models: ``{name: {length: {metric: value, ...}}}``; NaN points are left out.
        trained_len: draw a dotted vertical line there, labelled ``trained_label (trained_len)``.
        dashed: names drawn dashed (e.g. models used without fine-tuning).
        log_y: log y axis with plain number labels.
        legend_outside: legend to the right of the axes (many lines).
    """
    fig, ax = plt.subplots(figsize=(10, 4.8) if legend_outside else (7, 4.5), dpi=120)
    lengths = set()
    for name, results in models.items():
        pts = sorted((int(n), r[metric]) for n, r in results.items() if not math.isnan(r[metric]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if name in dashed else "-",
                    label=name)
            lengths.update(p[0] for p in pts)
    if trained_len is not None:
        ax.axvline(trained_len, color="grey", linestyle=":", label=f"{trained_label} ({trained_len})")
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel or YLABELS.get(metric, metric))
    ax.set_title(title or f"{metric.replace('_', ' ')} by context length")
    ax.grid(True, which="both", alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_ppl_report(models: dict[str, dict[int, dict]], protocol: dict, out_dir: Path) -> dict[str, Path]:
    """ppl.json, ppl.md and ppl.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"protocol": protocol, "models": {m: {str(n): r for n, r in res.items()} for m, res in models.items()}}
    (out_dir / "ppl.json").write_text(json.dumps(data, indent=1))
    table = ppl_table(models)
    desc = ", ".join(f"{k} {v}" for k, v in protocol.items() if v is not None)
    (out_dir / "ppl.md").write_text(f"# Perplexity by context length\n\n{desc}\n\n{table}\n")
    plot_ppl(models, out_dir / "ppl.png", title=f"PG-19 perplexity per byte ({protocol.get('mode', '')})")
    return {"json": out_dir / "ppl.json", "markdown": out_dir / "ppl.md", "plot": out_dir / "ppl.png"}


def load_report(path: Path) -> dict:
    """A ``ppl.json`` (or a directory holding one, such as RUN/eval).

    Raises:
        FileNotFoundError: no ppl.json there.
    """
    path = Path(path)
    for candidate in (path, path / "ppl.json", path / "eval" / "ppl.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"{path}: no ppl.json (run `llmft eval --ppl pg19 --model ... --out {path}` first)")


def compare_reports(paths: list[Path], out_dir: Path) -> dict[str, Path]:
    """Side-by-side table and plot of earlier reports (the first is the baseline): compare.md, compare.png.

    Models are named by their report's directory (its parent for RUN/eval) when a report holds one model.

    Raises:
        FileNotFoundError: a path has no ppl.json.
        ValueError: the reports used different protocols (data, mode, stride), so their numbers do not compare.
    """
    reports = [(Path(p), load_report(p)) for p in paths]
    keys = ("data", "mode", "stride")
    first = {k: reports[0][1]["protocol"].get(k) for k in keys}
    for p, rep in reports[1:]:
        other = {k: rep["protocol"].get(k) for k in keys}
        if other != first:
            raise ValueError(f"{p} was measured with {other}, {paths[0]} with {first}: re-run one of them with the "
                             "same --data, --mode and --stride")
    models: dict[str, dict] = {}
    for p, rep in reports:
        label = p.parent.name if p.name in ("eval", "ppl.json") else p.name
        for model, res in rep["models"].items():
            name = label if len(rep["models"]) == 1 else f"{label}:{model}"
            models[name] = {int(n): r for n, r in res.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    table = ppl_table(models)
    (out_dir / "compare.md").write_text(f"# Perplexity per byte: {' vs '.join(models)}\n\n"
                                        f"{', '.join(f'{k} {v}' for k, v in first.items())}\n\n{table}\n")
    plot_ppl(models, out_dir / "compare.png", title="PG-19 perplexity per byte")
    return {"markdown": out_dir / "compare.md", "plot": out_dir / "compare.png", "table": table}
