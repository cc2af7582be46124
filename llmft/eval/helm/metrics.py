"""HELM's metric functions, re-implemented to give the same numbers as HELM's reference implementation.

Sources (stanford-crfm/helm, ``src/helm/benchmark/``):

- ``metrics/evaluate_reference_metrics.py`` (``basic_metrics.py`` before the split): ``normalize_text``,
  ``exact_match``, ``quasi_exact_match``, ``f1_score`` (nltk's set-based ``f_measure``), ``get_rouge_function``
  and ``compute_reference_metrics`` (the score of an instance is the max over its correct references, computed
  on the stripped first completion, after the multiple-choice letter -> option mapping);
- ``metrics/summarization_metrics.py``: ROUGE for CNN/DM and XSUM strips ``{``/``}`` around texts
  (``_remove_braces``) and takes the max over references;
- ``metrics/basic_metrics.py`` (``BasicReferenceMetric.evaluate_references``): multiple choice scored per
  option (``multiple_choice_separate_original`` / ``_calibrated``), exact match with ties;
- ``metrics/ranking_metrics.py`` and ``common/general.py`` (``binarize_dict``): MS MARCO's binary ranking, scored
  with trec_eval's ``recip_rank`` (top-k limited) and ``ndcg_cut`` as computed by ``pytrec_eval``.

The test suite (``tests/unit/eval/test_helm.py``) checks these against a transcription of HELM's functions on a battery
of prediction/reference pairs.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from functools import lru_cache

_PUNCTUATION = set(string.punctuation)  # ASCII punctuation only, exactly as HELM: "¿", "—", "’" are kept
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str, should_remove_articles: bool = True) -> str:
    """Lower-case, drop ASCII punctuation, then articles (a/an/the), then collapse whitespace.

    HELM's ``normalize_text`` (copied there from the QuAC scorer). Accents and non-ASCII punctuation survive:
    ``"Café!"`` -> ``"café"``.
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    if should_remove_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(gold: str, pred: str) -> float:
    """1 if ``gold`` and ``pred`` are equal after stripping surrounding whitespace; an empty prediction scores 0."""
    if not pred:
        return 0.0
    return 1.0 if gold.strip() == pred.strip() else 0.0


def quasi_exact_match(gold: str, pred: str) -> float:
    """1 if equal after :func:`normalize_text`; an empty prediction scores 0 (even against an empty gold)."""
    if not pred:
        return 0.0
    return 1.0 if normalize_text(gold) == normalize_text(pred) else 0.0


def _f_measure(reference: set, test: set, alpha: float = 0.5) -> float | None:
    """nltk.metrics.scores.f_measure: None when either set is empty, 0 when there is no overlap."""
    if not reference or not test:
        return None
    overlap = len(reference & test)
    precision, recall = overlap / len(test), overlap / len(reference)
    if precision == 0 or recall == 0:
        return 0.0
    return 1.0 / (alpha / precision + (1 - alpha) / recall)


def f1_score(gold: str, pred: str) -> float:
    """Word F1 between the *sets* of normalized words (HELM uses nltk's set-based ``f_measure``, not SQuAD's bags).

    Repeated words count once; 0 when either side normalizes to nothing.
    """
    score = _f_measure(set(normalize_text(gold).split()), set(normalize_text(pred).split()))
    return 0.0 if score is None else float(score)


@lru_cache(maxsize=None)
def _rouge_scorer(rouge_type: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)


def rouge_2(gold: str, pred: str) -> float:
    """ROUGE-2 F-measure from ``rouge-score`` with the Porter stemmer (HELM's ``get_rouge_function("rouge2")``)."""
    return float(_rouge_scorer("rouge2").score(gold, pred)["rouge2"].fmeasure)


def _remove_braces(text: str) -> str:
    """HELM's SummarizationMetric._remove_braces: one leading ``{`` and one trailing ``}`` are dropped."""
    if text.startswith("{"):
        text = text[1:]
    if text.endswith("}"):
        text = text[:-1]
    return text


def summarization_rouge_2(golds: Sequence[str], pred: str) -> float:
    """ROUGE-2 as HELM's SummarizationMetric computes it: braces removed, stripped prediction, max over golds."""
    pred = _remove_braces(pred.strip())
    return max(rouge_2(_remove_braces(gold), pred) for gold in golds)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "quasi_exact_match": quasi_exact_match,
    "f1_score": f1_score,
    "rouge_2": rouge_2,
}


def score_references(metric: str, golds: Sequence[str], pred: str | None) -> float:
    """The instance score: max over correct references of ``metric(gold, pred)``.

    Args:
        metric: one of :data:`METRICS`.
        golds: the correct references (at least one).
        pred: the stripped completion; ``None`` (an unmapped multiple-choice letter) scores 0.

    Raises:
        ValueError: unknown metric or no correct reference.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if not golds:
        raise ValueError("an instance needs at least one correct reference")
    if metric == "rouge_2":
        return summarization_rouge_2(golds, pred or "")
    fn = METRICS[metric]
    return max(fn(gold, pred or "") for gold in golds)


# ------------------------------------------------------------------------------- multiple choice, separate


def multiple_choice_separate_exact_match(scores: Sequence[float], correct: Sequence[bool]) -> tuple[float, int]:
    """HELM's exact match for per-option scoring: the share of correct options among the argmax ties.

    Returns:
        (exact match, predicted index = first option attaining the max score).
    """
    best = max(scores)
    argmax = [i for i, s in enumerate(scores) if s >= best]
    hits = sum(1 for i in argmax if correct[i])
    return hits / len(argmax), argmax[0]


# ------------------------------------------------------------------------------- ranking (MS MARCO)


def rank_binary(outputs: Sequence[tuple[str, float]], correct_output: str = "Yes",
                wrong_output: str = "No") -> list[int]:
    """Order passages the way HELM's RankingMetric does for ``ranking_binary`` (best first).

    Each passage has the model's completion to "Does the passage answer the query?" and its log probability.
    Passages answered ``Yes`` come first (most confident first), then ``No`` (least confident first), then any
    other answer; labels are compared stripped and lower-cased. Ties keep the passages' order (stable sort).

    Args:
        outputs: (completion text, completion log probability) per passage, in reference order.

    Returns:
        Passage indices, best first.
    """
    def key(i: int) -> tuple[int, float]:
        text, logprob = outputs[i]
        label = text.strip().lower()
        if label == correct_output.strip().lower():
            return 2, logprob
        if label == wrong_output.strip().lower():
            return 1, -logprob
        return 0, -logprob

    return sorted(range(len(outputs)), key=key, reverse=True)


def reciprocal_rank_at_k(ranked: Sequence[int], relevance: dict[int, int], k: int,
                         multiple_relevance_values: bool = False) -> float:
    """trec_eval ``recip_rank`` on the top ``k`` of the ranking (HELM's ``recip_rank.k``).

    Args:
        ranked: passage indices, best first (:func:`rank_binary`).
        relevance: judged relevance per passage index (missing or 0: not relevant).
        k: cut-off.
        multiple_relevance_values: graded judgments (TREC track): HELM binarizes them first by turning 1 into 0
            (``binarize_dict``), so only 2 and 3 count as relevant.

    Returns:
        1 / rank of the first relevant passage within the top k, or 0.
    """
    for position, index in enumerate(ranked[:k], start=1):
        rel = relevance.get(index, 0)
        if multiple_relevance_values and rel == 1:
            rel = 0
        if rel >= 1:
            return 1.0 / position
    return 0.0


def ndcg_at_k(ranked: Sequence[int], relevance: dict[int, int], k: int) -> float:
    """trec_eval ``ndcg_cut.k``: gain = the judged relevance value, discount log2(rank + 1), ideal from all judgments.

    Returns:
        DCG@k / ideal DCG@k, or 0 when nothing is judged relevant.
    """
    dcg = sum(relevance.get(index, 0) / math.log2(position + 1)
              for position, index in enumerate(ranked[:k], start=1) if relevance.get(index, 0) > 0)
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(position + 1) for position, r in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0
