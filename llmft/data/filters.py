"""Document filters (the mix's ``filters`` list): a score per document, removed when the score is above the
filter's threshold. The build runs them on batches of documents as it reads them, after decontamination and before
deduplication and tokenizing (so a filtered source holds no texts; with ``reweight``, a source's documents are
filtered all at once, after deduplication, because the probe needs them all); :class:`FilterTally` adds up the
batches' reports.

Kinds:

- ``keywords``: matches of ``words`` (whole words or phrases, case-insensitive) and ``patterns`` (regexes,
  case-insensitive) per 1000 words. The default threshold 0 removes a document on any match.
- ``length``: words (whitespace-separated) outside ``[min_words, max_words]``; the score is the word count.
- ``classifier``: a user function ``package.module:function`` mapping a list of texts to one score each
  (higher = more to remove), e.g. a toxicity or quality model.
- ``perplexity``: the token perplexity of the document's first ``max_tokens`` tokens under a small causal LM
  ``model`` (its own tokenizer, with its special tokens): ``exp(mean over predicted tokens of -log p)``. Gibberish,
  markup and boilerplate score high. A text of fewer than 2 tokens scores 1 (kept: a length filter handles those).
  The model loads once per build (then released; safetensors weights only, no remote code) and runs under
  ``torch.no_grad`` on the GPU if there is one, ``batch_size`` texts per forward pass. The build's cache key
  holds the filter settings (the model's name), not the model's weights: rebuild with ``--force`` after
  retraining it in place.

Modes. ``document`` scores the whole document. ``recall`` scores every window of ``window_words`` words (cut at
word boundaries, the last one shorter) and takes the highest: it removes more. For ``keywords`` it removes a
superset of ``document`` mode (the document's rate is the length-weighted mean of its windows' rates, so their
maximum is at least that); a classifier's windows are scored by the same function.

Report (``stats.json`` "filters", ``filters.md``): per filter and source the documents scored and removed (a
document matched by several filters counts for each; ``removed_only_here`` counts those no other filter
removed), the words removed, and example removed documents with their scores.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmft.config.data import TextFilter
from llmft.data.sources import DataError

EXCERPT_CHARS = 200
_WORD = re.compile(r"\S+")


@dataclass
class FilterResult:
    """What :func:`apply_filters` decided for one source."""

    keep: np.ndarray  # (n,) bool
    report: dict  # {filter name: {documents, removed, removed_only_here, words_removed, threshold, examples}}


@dataclass
class FilterTally:
    """One source's filter results added up batch by batch, so that a build filters while it reads: the counts of
    each filter's report summed, its first ``examples`` examples kept."""

    filters: Sequence[TextFilter]
    documents: int = 0
    removed: int = 0
    report: dict = field(default_factory=dict)  # as FilterResult.report

    def add(self, result: FilterResult) -> None:
        """Add the result of :func:`apply_filters` on the next batch of the source's documents."""
        self.merge(len(result.keep), int((~result.keep).sum()), result.report)

    def merge(self, documents: int, removed: int, report: dict) -> None:
        """Add the counts of batches scored elsewhere (another tally's ``documents``, ``removed``, ``report``)."""
        self.documents += documents
        self.removed += removed
        limits = {f.name or f.kind: f.examples for f in self.filters}
        for name, r in report.items():
            t = self.report.setdefault(name, {"documents": 0, "removed": 0, "removed_only_here": 0,
                                              "words_removed": 0, "examples": []})
            for key in ("documents", "removed", "removed_only_here", "words_removed"):
                t[key] += r[key]
            t["examples"] += r["examples"][: max(0, limits[name] - len(t["examples"]))]


def _windows(text: str, size: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i : i + size]) for i in range(0, max(1, len(words)), size)]


def keyword_regex(words: Sequence[str], patterns: Sequence[str] = ()) -> re.Pattern | None:
    """One case-insensitive regex: each word or phrase whole (not inside a longer word), or any of the patterns."""
    parts = [rf"(?<!\w){re.escape(w)}(?!\w)" for w in words] + [f"(?:{p})" for p in patterns]
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def load_function(spec: str, what: str) -> Callable:
    """``package.module:function`` -> the function.

    Raises:
        DataError: it cannot be imported.
    """
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"{what} {spec!r}: cannot import {name} from {module}: {e}") from None


def _scorer(f: TextFilter) -> Callable[[list[str]], np.ndarray]:
    if f.kind == "keywords":
        rx = keyword_regex(f.words, f.patterns)
        return lambda texts: np.array([1000 * len(rx.findall(t)) / max(1, len(t.split())) for t in texts])
    if f.kind == "length":
        return lambda texts: np.array([len(t.split()) for t in texts], dtype=np.float64)
    if f.kind == "perplexity":
        return lambda texts: perplexities(texts, f.model, f.max_tokens, f.batch_size)
    fn = load_function(f.function, "filters classifier")

    def classify(texts: list[str]) -> np.ndarray:
        scores = np.asarray(fn(list(texts)), dtype=np.float64).reshape(-1)
        if len(scores) != len(texts):
            raise DataError(f"filters classifier {f.function!r} returned {len(scores)} scores for {len(texts)} "
                            "texts; it must return one score per text")
        return scores

    return classify


_SCORING_LM: dict[str, tuple] = {}  # model name -> (tokenizer, model): one loaded at a time


def _scoring_lm(name: str):
    """The perplexity filter's tokenizer and model, in eval mode, cached for the next source.

    Raises:
        DataError: the model or tokenizer cannot be loaded.
    """
    if name not in _SCORING_LM:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _SCORING_LM.clear()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, use_safetensors=True,
                                                         dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise DataError(f"filters perplexity model {name!r}: cannot load it ({str(e).splitlines()[0]}); give a "
                            "local directory or hub id of a causal LM with safetensors weights") from None
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        _SCORING_LM[name] = tokenizer, model
    return _SCORING_LM[name]


def release_scoring_models() -> None:
    """Drop the perplexity filter's cached LM (a build run before training must not keep it in memory)."""
    if _SCORING_LM:
        import torch

        _SCORING_LM.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def perplexities(texts: Sequence[str], model: str, max_tokens: int = 512, batch_size: int = 16) -> np.ndarray:
    """(n,) token perplexity of each text's first ``max_tokens`` tokens under the causal LM ``model``.

    Raises:
        DataError: the model cannot be loaded.
    """
    import torch

    tokenizer, lm = _scoring_lm(model)
    limit = min(max_tokens, getattr(lm.config, "max_position_embeddings", None) or max_tokens)
    ids = [tokenizer(t)["input_ids"][:limit] for t in texts]
    out = np.ones(len(texts), dtype=np.float64)  # fewer than 2 tokens: nothing predicted, perplexity 1
    order = sorted((i for i in range(len(ids)) if len(ids[i]) >= 2), key=lambda i: len(ids[i]))  # similar lengths
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        s = len(ids[part[-1]])
        tokens = torch.zeros((len(part), s), dtype=torch.long)  # (b, s), right-padded
        mask = torch.zeros((len(part), s), dtype=torch.long)  # (b, s)
        for r, i in enumerate(part):
            tokens[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        with torch.no_grad():
            logits = lm(input_ids=tokens.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()  # (b, s, v)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:].to(lm.device),
                                                    reduction="none").cpu()  # (b, s-1): position p predicts p + 1
        predicted = mask[:, 1:].double()  # (b, s-1)
        mean = (nll.double() * predicted).sum(1) / predicted.sum(1)  # (b,)
        out[part] = torch.exp(mean).numpy()
    return out


def score(f: TextFilter, texts: Sequence[str]) -> np.ndarray:
    """The filter's score of every text (in ``recall`` mode: the highest over its windows). Shape (n,)."""
    scorer = _scorer(f)
    if f.mode == "document" or not texts:
        return scorer(list(texts))
    windows = [_windows(t, f.window_words) for t in texts]
    flat = scorer([w for ws in windows for w in ws])
    bounds = np.cumsum([0] + [len(ws) for ws in windows])
    return np.maximum.reduceat(flat, bounds[:-1])


def removes(f: TextFilter, scores: np.ndarray) -> np.ndarray:
    """(n,) bool: the documents this filter removes, given their scores."""
    if f.kind == "length":
        lo = f.min_words if f.min_words is not None else -np.inf
        hi = f.max_words if f.max_words is not None else np.inf
        return (scores < lo) | (scores > hi)
    threshold = f.threshold if f.threshold is not None else 0.0
    return scores > threshold


def apply_filters(texts: Sequence[str], source: str, filters: Sequence[TextFilter],
                  where: Sequence[str] | None = None) -> FilterResult:
    """Score and filter one source's documents.

    Args:
        texts: the documents (prompt and text together).
        source: the source's name (a filter with ``sources`` skips the others).
        filters: the mix's filters.
        where: each document's origin, for the report's examples.

    Returns:
        The kept mask and the per-filter report of this source.

    Raises:
        DataError: a classifier that cannot be imported or returns the wrong number of scores.
    """
    n = len(texts)
    words = np.array([len(t.split()) for t in texts], dtype=np.int64)
    hits = {}
    scores = {}
    for f in filters:
        name = f.name or f.kind
        if f.sources is not None and source not in f.sources:
            continue
        scores[name] = score(f, texts)
        hits[name] = removes(f, scores[name])
    any_hit = np.zeros(n, dtype=bool)
    for h in hits.values():
        any_hit |= h
    report = {}
    for f in filters:
        name = f.name or f.kind
        if name not in hits:
            continue
        h = hits[name]
        others = np.zeros(n, dtype=bool)
        for other, oh in hits.items():
            if other != name:
                others |= oh
        idx = np.flatnonzero(h)
        report[name] = {
            "documents": n, "removed": int(h.sum()), "removed_only_here": int((h & ~others).sum()),
            "words_removed": int(words[h].sum()),
            "examples": [{"where": where[i] if where is not None else str(i), "score": round(float(scores[name][i]), 4),
                          "excerpt": _excerpt(texts[i], f)} for i in idx[: f.examples]],
        }
    return FilterResult(~any_hit, report)


def _excerpt(text: str, f: TextFilter) -> str:
    """The start of the text, or for a keywords filter the text around the first match."""
    text = " ".join(text.split())
    start = 0
    if f.kind == "keywords":
        m = keyword_regex(f.words, f.patterns).search(text)
        start = max(0, m.start() - EXCERPT_CHARS // 2) if m else 0
    part = text[start : start + EXCERPT_CHARS]
    return ("..." if start else "") + part + ("..." if start + EXCERPT_CHARS < len(text) else "")


def merge_reports(by_source: dict[str, FilterTally], filters: Sequence[TextFilter]) -> dict:
    """The ``filters`` entry of stats.json: per filter (settings, totals, per-source counts) and per source."""
    out = {"by_filter": {}, "by_source": {}}
    for f in filters:
        name = f.name or f.kind
        per = {s: r.report[name] for s, r in by_source.items() if name in r.report}
        out["by_filter"][name] = {
            "settings": f.model_dump(mode="json", exclude_defaults=True),
            "removed": sum(p["removed"] for p in per.values()),
            "by_source": per,
        }
    for s, r in by_source.items():
        out["by_source"][s] = {"documents": r.documents, "removed": r.removed, "kept": r.documents - r.removed}
    return out


def report_markdown(filters_report: dict, reweight_report: dict | None = None) -> str:
    """``filters.md``: what each filter removed, per source, with examples; the reweighting summary."""
    lines = ["# Filter report", "", "| source | documents | removed | kept |", "|---|---:|---:|---:|"]
    for s, st in filters_report["by_source"].items():
        lines.append(f"| {s} | {st['documents']} | {st['removed']} | {st['kept']} |")
    for name, f in filters_report["by_filter"].items():
        lines += ["", f"## {name}", "", f"Settings: `{f['settings']}`", "",
                  "| source | documents | removed | removed only here | words removed |", "|---|---:|---:|---:|---:|"]
        for s, st in f["by_source"].items():
            pct = st["removed"] / max(1, st["documents"])
            lines.append(f"| {s} | {st['documents']} | {st['removed']} ({pct:.1%}) | {st['removed_only_here']} | "
                         f"{st['words_removed']} |")
        for s, st in f["by_source"].items():
            if st["examples"]:
                lines += ["", f"Removed from {s}:", ""]
                lines += [f"- `{e['where']}` (score {e['score']}): {e['excerpt']}" for e in st["examples"]]
    if reweight_report:
        lines += ["", "## Reweighting", "",
                  "Weights w = p / (1 - p) of a linear probe for P(unfiltered | x), clipped, mean 1 per source. "
                  "Stored per token in the train shards' `weight` column; the training loss is Σ w·nll / Σ w per "
                  "step.",
                  "", "| source | kept | probe accuracy | weight min | weight max | clipped | effective docs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for s, st in reweight_report["by_source"].items():
            lines.append(f"| {s} | {st['kept']} | {st['probe_accuracy']:.3f} | {st['weight_min']:.3f} | "
                         f"{st['weight_max']:.3f} | {st['clipped']} | {st['effective_documents']:.0f} |")
    return "\n".join(lines) + "\n"
