"""``llmft eval --drift BASE``: what a fine-tune, an adapter or a stack of adapters changed beyond its task.

On general held-out text (default: the two shipped books), each variant is compared with BASE window by window:

- ``kl``: KL(base || variant) of the next-token distributions, in nats per token, averaged over every position of
  every window: ``sum_v p_base(v) (log p_base(v) - log p_variant(v))``. 0 when the variant predicts exactly as
  the base; it grows as the variant's predictions move away, whether or not that helps on this text.
- ``ppl_base``, ``ppl``, ``ppl_change``: token perplexity of the base and of the variant on the same tokens, and
  the relative change (positive: the variant is worse on this text).

Variants: each ``--model`` (a checkpoint, or an llmft LoRA adapter merged into its base exactly as ``llmft merge``
does, with the adapter's RoPE-scaled config); each ``--stack a:0.7,b:0.3`` (``W0 + 0.7 delta_a + 0.3 delta_b``,
``llmft merge``'s stacking); and, with two or more adapters among the models, the cumulative stacks of the first
k adapters at weight 1 each (k = 1..n): users who stack LoRA adapters report that each one added wears away
unrelated detail, and the plot of KL against k measures it.

Shapes: ``s`` window length, ``v`` vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llmft.atomic import save_figure, write_text
from llmft.config.loading import shipped_path

log = logging.getLogger(__name__)

DEFAULT_TEXTS = (shipped_path("llmft/assets/frankenstein.txt.gz"), shipped_path("llmft/assets/mobydick.txt.gz"))
HELD_OUT = 0.1  # the last 10% of each text is scored (the part a model trained on the book's start has not seen)


@dataclass(frozen=True)
class Variant:
    """One model compared with the base: a checkpoint, one adapter, or a weighted stack of adapters."""

    name: str
    kind: str  # "model", "adapter", "stack" or "cumulative"
    path: str | None = None  # a checkpoint or adapter directory
    adapters: tuple[tuple[str, float], ...] = ()  # (adapter directory, weight) for adapters and stacks

    @property
    def k(self) -> int:
        """How many adapters it stacks (0 for a checkpoint)."""
        return len(self.adapters)


def is_adapter(path: str) -> bool:
    """Whether ``path`` is an llmft (PEFT) adapter directory rather than a full checkpoint."""
    return (Path(path) / "adapter_config.json").is_file()


def parse_stack(spec: str) -> tuple[tuple[str, float], ...]:
    """``"a:0.7,b:0.3"`` -> ((a, 0.7), (b, 0.3)); a part without a weight has weight 1.

    Raises:
        ValueError: a weight is not a number, or a part names no adapter directory.
    """
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"--stack {spec!r}: {weight!r} is not a weight (PATH:WEIGHT, e.g. runs/a/final:0.7)")
        if not is_adapter(path):
            raise ValueError(f"--stack {spec!r}: {path} is not an llmft adapter directory (no adapter_config.json)")
        out.append((path, w))
    if not out:
        raise ValueError(f"--stack {spec!r}: expected PATH:WEIGHT[,PATH:WEIGHT...]")
    return tuple(out)


def variants(models: list[str], stacks: list[str]) -> list[Variant]:
    """The variants to compare: every model, every stack, and the cumulative stacks of the adapters among the models
    (when there are two or more).

    Raises:
        ValueError: a stack spec is malformed.
    """
    def label(m: str) -> str:  # runs/a/final -> a
        p = Path(m)
        return p.parent.name if p.name in ("final", "model") and p.parent.name else p.name

    out = [Variant(label(m), "adapter" if is_adapter(m) else "model", m, ((m, 1.0),) if is_adapter(m) else ())
           for m in models]
    out += [Variant(f"stack {spec}", "stack", None, parse_stack(spec)) for spec in stacks]
    adapters = [m for m in models if is_adapter(m)]
    if len(adapters) >= 2:
        out += [Variant(f"first {k} adapters", "cumulative", None, tuple((a, 1.0) for a in adapters[:k]))
                for k in range(1, len(adapters) + 1)]
    return out


def read_text(path: str | Path) -> str:
    """A text file (``.txt``, ``.txt.gz``, ``.txt.zst``), read as the data pipeline reads a ``text`` source.

    Raises:
        FileNotFoundError: it does not exist.
    """
    from llmft.config.sources import SourceSpec
    from llmft.data.sources import read_source

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--drift-data {path}: no such file (give a .txt or .txt.gz)")
    (doc,) = read_source(SourceSpec(format="text", path=path), on_error="stop")
    return doc.text


def held_out_windows(tokenizer, text: str, length: int, max_windows: int) -> torch.Tensor:
    """(n, length) token windows of the last 10% of ``text`` (non-overlapping, at most ``max_windows``)."""
    tail = text[int(len(text) * (1 - HELD_OUT)):]
    ids = tokenizer(tail, add_special_tokens=False).input_ids
    n = min(len(ids) // length, max_windows)
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


@torch.no_grad()
def _compare(base, model, windows: torch.Tensor, device) -> dict[str, float]:
    """KL(base || model) per token and both NLLs over the windows."""
    kl = nll_b = nll_m = 0.0
    count = 0
    for x in windows:
        x = x[None].to(device)  # (1, s)
        lp_b = torch.log_softmax(base(input_ids=x).logits[0].float(), -1)  # (s, v)
        lp_m = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)  # (s, v)
        kl += float((lp_b.exp() * (lp_b - lp_m)).sum(-1).clamp_min(0).sum())
        target = x[0, 1:]
        nll_b -= float(lp_b[:-1].gather(-1, target[:, None]).sum())
        nll_m -= float(lp_m[:-1].gather(-1, target[:, None]).sum())
        count += x.shape[1]
    tokens = count - len(windows)
    return {"kl": kl / count, "ppl_base": math.exp(nll_b / tokens), "ppl": math.exp(nll_m / tokens),
            "ppl_change": math.exp((nll_m - nll_b) / tokens) - 1, "tokens": count}


def run_drift(base: str, models: list[str], stacks: list[str] | None = None, texts: list[str] | None = None,
              length: int = 512, max_windows: int = 16, dtype: str = "float32", device: str = "cpu",
              attention: str = "sdpa") -> dict:
    """Drift of every variant from ``base`` on each text.

    Returns:
        ``{"base", "texts": [names], "length", "windows": {text: n}, "rows": [{"name", "kind", "k", "adapters",
        "per_text": {text: {"kl", "ppl_base", "ppl", "ppl_change", "tokens"}}}]}``.

    Raises:
        ModelLoadError: the base or a variant cannot be loaded.
        FileNotFoundError: a text is missing.
        ValueError: a stack is malformed, or a text is shorter than one window.
    """
    from llmft.model.adapters import merged_model
    from llmft.model.load import DTYPES, load_trained

    specs = variants(models, stacks or [])
    base_model, tokenizer = load_trained(base, dtype, device, attention)
    paths = [Path(t) for t in (texts or DEFAULT_TEXTS)]
    names = [p.name.split(".")[0] for p in paths]
    windows = {}
    for name, p in zip(names, paths):
        windows[name] = held_out_windows(tokenizer, read_text(p), length, max_windows)
        if len(windows[name]) == 0:
            raise ValueError(f"--drift-data {p}: its held-out last 10% is shorter than one window of {length} tokens")
    rows = []
    for v in specs:
        if v.kind == "model":
            model, _ = load_trained(v.path, dtype, device, attention)
        else:
            adapter_base = json.loads((Path(v.adapters[0][0]) / "adapter_config.json").read_text()).get(
                "base_model_name_or_path")
            model = merged_model(adapter_base, [(Path(a), w) for a, w in v.adapters]).to(DTYPES[dtype]).to(device)
        per_text = {name: _compare(base_model, model, w, device) for name, w in windows.items()}
        rows.append({"name": v.name, "kind": v.kind, "k": v.k, "adapters": [list(a) for a in v.adapters],
                     "per_text": per_text})
        log.info("drift %s: %s", v.name, ", ".join(f"{t} KL {r['kl']:.4f}" for t, r in per_text.items()))
        del model
    return {"base": base, "texts": names, "length": length, "windows": {n: len(w) for n, w in windows.items()},
            "rows": rows}


def drift_table(r: dict) -> str:
    """Markdown: a row per variant; per text, KL and the perplexity change."""
    head = "| variant | kind | " + " | ".join(f"{t} KL | {t} ppl change" for t in r["texts"]) + " |"
    lines = [head, "|---|---|" + "---:|---:|" * len(r["texts"])]
    for row in r["rows"]:
        cells = [f"{row['per_text'][t]['kl']:.4f} | {100 * row['per_text'][t]['ppl_change']:+.2f}%" for t in r["texts"]]
        lines.append(f"| {row['name']} | {row['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_drift(r: dict, path: Path) -> Path:
    """PNG: KL per variant and text (bars); beside it, with cumulative stacks, KL against the number of stacked
    adapters (one line per text)."""
    from matplotlib.figure import Figure

    cumulative = [row for row in r["rows"] if row["kind"] == "cumulative"]
    fig = Figure(figsize=(12 if cumulative else 7, 4.5), dpi=110)
    axes = fig.subplots(1, 2 if cumulative else 1, squeeze=False)[0]
    ax = axes[0]
    rows = [row for row in r["rows"] if row["kind"] != "cumulative"]
    width = 0.8 / max(len(r["texts"]), 1)
    for i, t in enumerate(r["texts"]):
        ax.bar([j + i * width for j in range(len(rows))], [row["per_text"][t]["kl"] for row in rows], width, label=t)
    ax.set_xticks([j + width * (len(r["texts"]) - 1) / 2 for j in range(len(rows))],
                  [row["name"][:28] for row in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("KL(base || variant), nats per token")
    ax.set_title("Drift from the base on held-out text", fontsize=10)
    ax.legend(fontsize=8)
    if cumulative:
        ax = axes[1]
        for t in r["texts"]:
            ax.plot([row["k"] for row in cumulative], [row["per_text"][t]["kl"] for row in cumulative], marker="o",
                    label=t)
        ax.set_xlabel("adapters stacked (weight 1 each)")
        ax.set_ylabel("KL(base || stack), nats per token")
        ax.set_xticks([row["k"] for row in cumulative])
        ax.set_title("Drift against the number of stacked adapters", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_drift_report(r: dict, out: Path) -> dict[str, Path]:
    """``drift.json``, ``drift.md`` and ``drift.png`` in ``out``."""
    paths = {"json": out / "drift.json", "markdown": out / "drift.md", "plot": out / "drift.png"}
    write_text(paths["json"], json.dumps(r, indent=1) + "\n")
    write_text(paths["markdown"], f"# Drift from {r['base']}\n\nKL(base || variant) of next-token distributions "
               f"(nats per token) and token-perplexity change on the last 10% of each text, windows of "
               f"{r['length']} tokens ({', '.join(f'{t}: {n}' for t, n in r['windows'].items())} windows).\n\n"
               + drift_table(r) + "\n")
    plot_drift(r, paths["plot"])
    return paths
