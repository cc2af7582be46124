"""Importance weights that undo the shift the filters cause (the mix's ``reweight`` section).

Filtering changes the distribution: if a filter removes 14% of the documents about one subject and 6% of those
about another, the first is under-represented in the kept data. Per source, a deliberately smooth linear probe
(logistic regression, strong L2) is trained to tell a uniform sample of the *unfiltered* documents (label 1) from
a uniform sample of the *kept* ones (label 0), the two classes weighted equally (prior 0.5). Its odds estimate
the density ratio::

    p(x) = P(unfiltered | x),   w(x) = p / (1 - p) ≈ P_unfiltered(x) / P_kept(x)

so weighting every kept document by w(x) makes weighted statistics of the kept data approximate those of the
unfiltered data, as far as the probe's features see the difference. Weights are clipped to
``[min_weight, max_weight]`` (a few documents must not dominate) and normalized to mean 1 over the kept documents
of the source, so the source's token share is unchanged.

Features: the hashed embedder (words or word n-grams of :mod:`llmft.data.dedup`'s Shingler, feature-hashed into
``dim`` signed dimensions, L2-normalized) or a user function, reduced to their top ``components`` principal
components (unit variance). The probe is fitted with L-BFGS (scipy) on the class-balanced mean log-loss plus
``l2 / 2 * |w|^2`` (the intercept is not penalized).

Why smooth. The removed documents appear only among the unfiltered, so a flexible probe learns the filtered
feature itself (a kept document lacks it: no use) and memorizes documents (a kept document is in both samples,
so memorizing flattens its odds to a constant). Few components and cross-fitting (``folds``: a document's weight
comes from a probe that did not train on it) leave the broad content that the filter correlates with. On the
test corpus (tests/test_filters.py: a filter removing 14% of one class and 6% of the other) this undoes about
90-100% of the keyword shift; all 4096 hashed dimensions with the same folds, 50-70%.

The weights go with each document through tokenizing, chunking, selection and packing into the ``weight`` column
of the train shards (one float per token; 0 on padding), and the training loss uses them: a step's loss is
Σ w·nll / Σ w over its trained tokens, w of the predicted token (:mod:`llmft.train.loss`), so a weight of 2 counts
as two copies of the document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from llmft.data.decontam import normalize_words
from llmft.data.dedup import Shingler, _normalize, hashed_embedding
from llmft.data.filters import load_function
from llmft.data.mix import Reweight


@dataclass
class ReweightResult:
    """Weights of one source's kept documents (in order), and the report."""

    weights: np.ndarray  # (kept,) float64, mean 1
    report: dict


def embed(texts: Sequence[str], cfg: Reweight) -> np.ndarray:
    """(n, d) float32, rows L2-normalized."""
    if cfg.embedder == "hashed":
        sh = Shingler(cfg.shingle_size)
        return hashed_embedding([sh(normalize_words(t)) for t in texts], cfg.dim)
    fn = load_function(cfg.embedder, "reweight.embedder")
    return _normalize(np.asarray(fn(list(texts)), dtype=np.float32))


def principal_components(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The top ``k`` principal-component scores of ``x`` (n, d), each scaled to unit variance: (n, k).

    A randomized SVD (two power iterations) of the centered matrix; k is capped at min(n, d) - 1.
    """
    x = x.astype(np.float64) - x.mean(0)  # (n, d)
    k = max(1, min(k, min(x.shape) - 1))
    q = np.linalg.qr(x @ rng.standard_normal((x.shape[1], k + 10)))[0]  # (n, k + 10)
    for _ in range(2):
        q = np.linalg.qr(x @ (x.T @ q))[0]
    u, sv, _ = np.linalg.svd(q.T @ x, full_matrices=False)  # (k + 10, k + 10)
    scores = (q @ u)[:, :k]  # (n, k) unit-norm columns
    return scores * np.sqrt(len(x))  # unit variance


def fit_probe(pos: np.ndarray, neg: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Logistic regression, the two classes weighted equally, L2 on the weights (not the intercept).

    Args:
        pos: (n1, d) features of class 1.
        neg: (n0, d) features of class 0.
        l2: penalty strength.

    Returns:
        (weights (d,), intercept)
    """
    x = np.concatenate([pos, neg]).astype(np.float64)  # (n, d)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    sw = np.concatenate([np.full(len(pos), 0.5 / len(pos)), np.full(len(neg), 0.5 / len(neg))])
    d = x.shape[1]

    def loss(theta):
        w, b = theta[:d], theta[d]
        z = x @ w + b
        # log(1 + exp(-z)) for y = 1, log(1 + exp(z)) for y = 0, stably
        s = np.where(y == 1, -z, z)
        nll = np.logaddexp(0, s)
        g = sw * np.where(y == 1, -1, 1) / (1 + np.exp(-s))  # d nll / d z, weighted
        return float(sw @ nll + 0.5 * l2 * w @ w), np.concatenate([x.T @ g + l2 * w, [g.sum()]])

    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:d], float(res.x[d])


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else 0.5


def reweight(texts: Sequence[str], keep: np.ndarray, cfg: Reweight, stream: int = 0) -> ReweightResult:
    """Weights for the kept documents of one source.

    Args:
        texts: every document of the source, before filtering.
        keep: (n,) bool, the filters' decision.
        cfg: the reweight settings.
        stream: a number that varies the seed per source.
    """
    rng = np.random.default_rng([cfg.seed, stream])
    n = len(texts)
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        return ReweightResult(np.zeros(0), {"kept": 0})
    if len(kept) == n:  # nothing removed: nothing to undo
        return ReweightResult(np.ones(n), {"kept": n, "probe_accuracy": 0.5, "weight_min": 1.0, "weight_max": 1.0,
                                          "clipped": 0, "effective_documents": float(n)})
    fold = rng.permutation(n) % cfg.folds  # (n,) cross-fitting: no document's weight comes from a probe it trained
    unf = np.sort(rng.choice(n, min(n, cfg.sample_size), replace=False))
    fil = np.sort(rng.choice(kept, min(len(kept), cfg.sample_size), replace=False))
    need = np.union1d(np.union1d(unf, fil), kept)
    emb = embed([texts[i] for i in need], cfg)  # (len(need), d)
    if cfg.components:
        emb = principal_components(emb, cfg.components, rng)  # (len(need), k)
    row = np.full(n, -1)
    row[need] = np.arange(len(need))
    folds = cfg.folds
    if any(not (fold[unf] != k).any() or not (fold[fil] != k).any() for k in range(folds)):
        folds = 1  # too few documents to leave a fold out
    logit = np.zeros(n)
    correct = []
    for k in range(folds):
        train = fold != k if folds > 1 else np.ones(n, dtype=bool)  # (n,) bool
        w, b = fit_probe(emb[row[unf[train[unf]]]], emb[row[fil[train[fil]]]], cfg.l2)
        held = ~train if folds > 1 else train
        scored = np.flatnonzero(held & (row >= 0))
        logit[scored] = emb[row[scored]] @ w + b
        hu, hf = unf[held[unf]], fil[held[fil]]
        correct.append(0.5 * _mean(logit[hu] > 0) + 0.5 * _mean(logit[hf] <= 0))
    accuracy = float(np.mean(correct))  # on held-out documents (folds > 1)
    odds = np.exp(np.clip(logit[kept], -30, 30))  # p / (1 - p)
    clipped = int(((odds < cfg.min_weight) | (odds > cfg.max_weight)).sum())
    weights = np.clip(odds, cfg.min_weight, cfg.max_weight)
    weights /= weights.mean()
    report = {"kept": int(len(kept)), "unfiltered_sample": int(len(unf)), "kept_sample": int(len(fil)),
              "probe_accuracy": accuracy, "components": int(emb.shape[1]), "folds": folds,
              "weight_min": float(weights.min()), "weight_max": float(weights.max()),
              "clipped": clipped, "effective_documents": float(weights.sum() ** 2 / (weights**2).sum())}
    return ReweightResult(weights, report)
