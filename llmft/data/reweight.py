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
``dim`` signed dimensions, L2-normalized; stored sparse) or a user function, reduced to their top ``components``
principal components (unit variance), fitted on the probe's two samples and applied to every kept document. The
probe is fitted with L-BFGS (scipy) on the class-balanced mean log-loss plus ``l2 / 2 * |w|^2`` (the intercept is
not penalized).

Why smooth. The removed documents appear only among the unfiltered, so a flexible probe learns the filtered
feature itself (a kept document lacks it: no use) and memorizes documents (a kept document is in both samples,
so memorizing flattens its odds to a constant). Few components and cross-fitting (``folds``: a document's weight
comes from a probe that did not train on it) leave the broad content that the filter correlates with. On the
test corpus (tests/unit/data/test_filters.py: a filter removing 14% of one class and 6% of the other) this undoes about
90-100% of the keyword shift; all 4096 hashed dimensions with the same folds, 50-70%.

Memory (:class:`ReweightStream`): a build feeds each source's documents batch by batch as it reads them; the
embeddings go to a spill file (a hashed embedding: 8 bytes per distinct word or n-gram of the document), and what is
held grows by 17 bytes per document (the filters' decision, two file offsets). Fitting holds the two samples'
sparse embeddings (``sample_size`` each); scoring streams over the kept documents' stored embeddings and holds one
weight per kept document. So a source is reweighted in memory that does not grow with its texts, and a sampled
source (read to its token need) is reweighted from what was read: a seeded random choice of its files.

The weights go with each document through tokenizing, chunking, selection and packing into the ``weight`` column
of the train shards (one float per token; 0 on padding), and the training loss uses them: a step's loss is
Σ w·nll / Σ w over its trained tokens, w of the predicted token (:mod:`llmft.train.loss`), so a weight of 2 counts
as two copies of the document.
"""

from __future__ import annotations

import logging
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize

from llmft.config.data import Reweight
from llmft.data.decontam import normalize_words
from llmft.data.dedup import Shingler
from llmft.data.dedup.embedding import _normalize
from llmft.data.filters import load_function
from llmft.data.units import ArraySpill

log = logging.getLogger(__name__)
PROJECT_CHUNK = 1 << 21  # stored embedding entries read back at a time (a block: ~16 MB) when fitting and scoring


@dataclass
class ReweightResult:
    """Weights of one source's kept documents (in order), and the report."""

    weights: np.ndarray  # (kept,) float64, mean 1
    report: dict


def sparse_embedding(texts: Sequence[str], cfg: Reweight, shingler: Shingler | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each text's embedding as sparse rows, L2-normalized: (indices (nnz,) int32, values (nnz,) float32,
    entries per text (n,) int64), rows in order, indices ascending within a row.

    ``hashed``: the text's shingle set feature-hashed into ``cfg.dim`` signed dimensions (bucket from the low bits
    of the hash, sign from the top bit), as :func:`llmft.data.dedup.hashed_embedding` makes it densely: a
    document of u distinct shingles has at most u entries, whatever ``dim``. A user embedder's dense rows are kept
    whole (every dimension an entry).

    Raises:
        DataError: a user embedder that cannot be imported.
    """
    if cfg.embedder != "hashed":
        dense = _normalize(np.asarray(load_function(cfg.embedder, "reweight.embedder")(list(texts)), np.float32))
        n, d = dense.shape if dense.ndim == 2 else (len(texts), 0)
        return np.tile(np.arange(d, dtype=np.int32), n), dense.reshape(-1), np.full(n, d, np.int64)
    shingler = shingler or Shingler(cfg.shingle_size)
    shingles = [shingler(normalize_words(t)) for t in texts]
    lengths = np.array([len(s) for s in shingles], dtype=np.int64)
    if not lengths.sum():
        return np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(len(texts), np.int64)
    h = np.concatenate(shingles).astype(np.int64)
    key = np.repeat(np.arange(len(texts), dtype=np.int64), lengths) * cfg.dim + h % cfg.dim  # (shingles,) row, bucket
    cells, inverse = np.unique(key, return_inverse=True)  # sorted: by row, then bucket
    value = np.bincount(inverse, weights=np.where(h >> 31, -1.0, 1.0))  # (cells,) the signed count in each bucket
    nonzero = value != 0  # (buckets whose signs cancel hold nothing)
    cells, value = cells[nonzero], value[nonzero]
    row = cells // cfg.dim
    norm = np.sqrt(np.bincount(row, weights=value**2, minlength=len(texts)))  # (n,)
    return ((cells % cfg.dim).astype(np.int32), (value / norm[row]).astype(np.float32),
            np.bincount(row, minlength=len(texts)).astype(np.int64))


@dataclass
class Projection:
    """The top principal components of a sample of embeddings: ``x -> (x - mean) @ axes.T * scale``, each
    component of unit variance over the sample. ``axes`` None: the embeddings themselves (``components: 0``)."""

    mean: np.ndarray | None  # (d,)
    axes: np.ndarray | None  # (k, d) orthonormal rows
    scale: np.ndarray | None  # (k,)

    def __call__(self, x: sp.csr_matrix) -> np.ndarray | sp.csr_matrix:
        """(n, d) sparse embeddings -> (n, k) dense scores (or the sparse embeddings unchanged)."""
        if self.axes is None:
            return x
        return (np.asarray(x @ self.axes.T) - self.mean @ self.axes.T) * self.scale


def principal_components(blocks: Callable[[], Iterable[sp.csr_matrix]], dim: int, k: int,
                         rng: np.random.Generator) -> Projection:
    """The top ``k`` principal components of a matrix's rows: a randomized SVD (two power iterations) of the centered
    matrix, centered implicitly so sparse rows stay sparse; k is capped at min(n, d) - 1.

    Args:
        blocks: yields the matrix's rows, in order, as (m, dim) sparse blocks; called once per pass (8 passes), so
            only a block and the (n, k + 10) sketch are in memory, never the whole matrix.
        dim: the number of columns, d.
        k: components.
        rng: draws the sketch.
    """
    n, total = 0, np.zeros(dim)
    for b in blocks():
        n += b.shape[0]
        total += np.asarray(b.sum(0)).ravel()
    mean = total / n  # (d,)
    k = max(1, min(k, min(n, dim) - 1))

    def times(m: np.ndarray) -> np.ndarray:  # (x - 1 mean^T) @ m: (n, l)
        return np.concatenate([np.asarray(b @ m) for b in blocks()]) - mean @ m

    def times_t(q: np.ndarray) -> np.ndarray:  # (x - 1 mean^T)^T @ q: (d, l)
        out, row = np.zeros((dim, q.shape[1])), 0
        for b in blocks():
            out += np.asarray(b.T @ q[row : row + b.shape[0]])
            row += b.shape[0]
        return out - np.outer(mean, q.sum(0))

    q = np.linalg.qr(times(rng.standard_normal((dim, k + 10))))[0]  # (n, k + 10)
    for _ in range(2):
        q = np.linalg.qr(times(times_t(q)))[0]
    _, sv, vt = np.linalg.svd(times_t(q).T, full_matrices=False)  # of q^T x_centered: (k + 10, d)
    sv = sv[:k]
    scale = np.where(sv > 1e-9 * max(1.0, sv[0]), np.sqrt(n) / np.maximum(sv, 1e-300), 0.0)
    return Projection(mean, vt[:k], scale)  # unit variance over the rows: u * sqrt(n), u = x_c v / s


def fit_probe(pos: np.ndarray, neg: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Logistic regression, the two classes weighted equally, L2 on the weights (not the intercept).

    Args:
        pos: (n1, d) features of class 1 (dense, or sparse rows).
        neg: (n0, d) features of class 0 (the same kind).
        l2: penalty strength.

    Returns:
        (weights (d,), intercept)
    """
    if sp.issparse(pos):
        x = sp.vstack([pos, neg]).tocsr().astype(np.float64)  # (n, d)
    else:
        x = np.concatenate([pos, neg]).astype(np.float64)
    n1, n0 = pos.shape[0], neg.shape[0]
    y = np.concatenate([np.ones(n1), np.zeros(n0)])
    sw = np.concatenate([np.full(n1, 0.5 / n1), np.full(n0, 0.5 / n0)])
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


class ReweightStream:
    """The reweighting of one source, fed its documents batch by batch in reading order: what it holds in memory
    grows by per-document numbers only, never texts or dense embeddings.

    :meth:`add` embeds every document (kept by the filters or not) and appends its sparse embedding to two spill
    files in ``workdir`` (a hashed embedding: 8 bytes per distinct shingle of the document, at most ``dim``
    entries); in memory: the filters' decision (1 byte) and two file offsets (16 bytes) per document.
    :meth:`finish` then draws the probe's samples (``sample_size`` documents of each set, uniformly, seeded),
    fits the principal components on their embeddings (read back a block of ``PROJECT_CHUNK`` entries at a time,
    once per pass), fits a probe per fold on their projections, and streams over the kept documents' stored
    embeddings to score them: the weights, 8 bytes per kept document. Beyond per-document numbers it holds a
    block and the samples' (sample, components + 10) sketch and projections, bounded by ``sample_size`` whatever
    the source's size (with ``components: 0``, the samples' sparse embeddings themselves).

    Args:
        cfg: the reweight settings.
        workdir: an existing directory for the spill files (the build's staging directory).
        stream: a number that varies the seed per source.

    Raises:
        OSError: the spill files cannot be written.
    """

    def __init__(self, cfg: Reweight, workdir: Path, stream: int = 0):
        self.cfg, self.stream = cfg, stream
        self.keep = array("b")  # (documents,) the filters' decision
        self.kept = 0  # documents kept so far: the next kept document's index among them
        self._indices = ArraySpill(Path(workdir) / "embedding.idx", np.int32)
        self._values = ArraySpill(Path(workdir) / "embedding.val", np.float32)
        self._shingler = Shingler(cfg.shingle_size) if cfg.embedder == "hashed" else None

    def __len__(self) -> int:
        return len(self.keep)

    def add(self, texts: Sequence[str], keep: np.ndarray) -> None:
        """The next documents of the source and the filters' decision on each ((n,) bool).

        Raises:
            DataError: a user embedder that fails to import.
            OSError: the spill cannot be written.
        """
        self.add_embedded(*sparse_embedding(texts, self.cfg, self._shingler), keep)

    def add_embedded(self, indices: np.ndarray, values: np.ndarray, counts: np.ndarray, keep: np.ndarray) -> None:
        """The next documents as :func:`sparse_embedding` made them (elsewhere: the data engine's tasks), and the
        filters' decision on each.

        Raises:
            OSError: the spill cannot be written.
        """
        self._indices.extend(indices, counts)
        self._values.extend(values, counts)
        self.keep.extend(np.asarray(keep, np.int8).tolist())
        self.kept += int(np.count_nonzero(keep))

    def _rows(self, docs: np.ndarray, dim: int) -> sp.csr_matrix:
        """The stored embeddings of documents ``docs`` (ascending): (len(docs), dim) sparse rows."""
        idx = [self._indices[i] for i in docs.tolist()]
        val = [self._values[i] for i in docs.tolist()]
        indptr = np.zeros(len(docs) + 1, np.int64)
        np.cumsum([len(v) for v in val], out=indptr[1:])
        return sp.csr_matrix((np.concatenate(val) if val else np.zeros(0, np.float32),
                              np.concatenate(idx) if idx else np.zeros(0, np.int32), indptr), shape=(len(docs), dim))

    def _blocks(self, docs: np.ndarray, dim: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """The stored embeddings of documents ``docs`` (ascending) in order, in blocks of about ``PROJECT_CHUNK``
        entries: yields (the block's first index into ``docs``, (m, dim) sparse rows). A block is read with one
        read per file when its documents are dense among those stored (the kept ones), one per document when not
        (a sample)."""
        offsets = np.frombuffer(self._values.offsets, np.int64)  # (documents + 1,)
        ends = np.cumsum(offsets[docs + 1] - offsets[docs])  # (len(docs),) entries up to each document's end
        first = 0
        while first < len(docs):
            before = ends[first - 1] if first else 0
            last = max(first + 1, int(np.searchsorted(ends, before + PROJECT_CHUNK, side="right")))
            a, b = int(docs[first]), int(docs[last - 1]) + 1  # the documents spanned
            if offsets[b] - offsets[a] <= 2 * (ends[last - 1] - before):  # one read of the span, the rest dropped
                rows = sp.csr_matrix((self._values.span(a, b), self._indices.span(a, b),
                                      offsets[a : b + 1] - offsets[a]), shape=(b - a, dim))[docs[first:last] - a]
            else:
                rows = self._rows(docs[first:last], dim)
            yield first, rows
            first = last

    def finish(self) -> ReweightResult:
        """The weights of the kept documents, in the order they were added, and the report."""
        cfg, t0 = self.cfg, time.perf_counter()
        rng = np.random.default_rng([cfg.seed, self.stream])
        keep = np.frombuffer(self.keep, np.int8).astype(bool)  # (n,)
        n = len(keep)
        kept = np.flatnonzero(keep)
        if len(kept) == 0:
            return ReweightResult(np.zeros(0), {"documents": n, "kept": 0})
        if len(kept) == n:  # nothing removed: nothing to undo
            return ReweightResult(np.ones(n), {"documents": n, "kept": n, "probe_accuracy": 0.5, "weight_min": 1.0,
                                              "weight_max": 1.0, "clipped": 0, "effective_documents": float(n)})
        fold = (rng.permutation(n) % cfg.folds).astype(np.int8)  # (n,) cross-fitting: a document is scored by a
        # probe that did not train on it
        unf = np.sort(rng.choice(n, min(n, cfg.sample_size), replace=False))
        fil = np.sort(rng.choice(kept, min(len(kept), cfg.sample_size), replace=False))
        sample = np.union1d(unf, fil)
        dim = cfg.dim if cfg.embedder == "hashed" else int(self._indices.lengths().max())
        if cfg.components:  # the sample's embeddings read back a block at a time, on each pass
            def blocks() -> Iterator[sp.csr_matrix]:
                return (rows for _, rows in self._blocks(sample, dim))

            project = principal_components(blocks, dim, cfg.components, rng)
            feats = np.concatenate([project(rows) for rows in blocks()])  # (len(sample), k)
        else:  # every dimension: the probe is fitted on the sample's sparse embeddings, held
            project = Projection(None, None, None)
            feats = self._rows(sample, dim)  # (len(sample), dim) sparse
        at_u, at_f = np.searchsorted(sample, unf), np.searchsorted(sample, fil)
        folds = cfg.folds
        if any(not (fold[unf] != k).any() or not (fold[fil] != k).any() for k in range(folds)):
            folds = 1  # too few documents to leave a fold out
        probes, correct = [], []
        for k in range(folds):
            train_u, train_f = (fold[unf] != k, fold[fil] != k) if folds > 1 else (slice(None), slice(None))
            w, b = fit_probe(feats[at_u[train_u]], feats[at_f[train_f]], cfg.l2)
            probes.append((w, b))
            if folds > 1:  # accuracy on the held-out fold's samples
                hu, hf = feats[at_u[fold[unf] == k]] @ w + b, feats[at_f[fold[fil] == k]] @ w + b
            else:
                hu, hf = feats[at_u] @ w + b, feats[at_f] @ w + b
            correct.append(0.5 * _mean(np.asarray(hu) > 0) + 0.5 * _mean(np.asarray(hf) <= 0))
        log.info("reweight: probe fitted on %d + %d sampled documents of %d (%d kept) in %.1f s; scoring the kept "
                 "documents", len(unf), len(fil), n, len(kept), time.perf_counter() - t0)
        logit = np.zeros(len(kept))  # (kept,)
        kept_fold = fold[kept] if folds > 1 else np.zeros(len(kept), np.int8)
        for first, rows in self._blocks(kept, dim):
            x = project(rows)
            part = slice(first, first + rows.shape[0])
            for k, (w, b) in enumerate(probes):
                mine = kept_fold[part] == k
                if mine.any():
                    logit[part][mine] = np.asarray(x[mine] @ w).ravel() + b
        odds = np.exp(np.clip(logit, -30, 30))  # p / (1 - p)
        clipped = int(((odds < cfg.min_weight) | (odds > cfg.max_weight)).sum())
        weights = np.clip(odds, cfg.min_weight, cfg.max_weight)
        weights /= weights.mean()
        report = {"documents": n, "kept": int(len(kept)), "unfiltered_sample": int(len(unf)),
                  "kept_sample": int(len(fil)),
                  "probe_accuracy": float(np.mean(correct)), "components": int(feats.shape[1]), "folds": folds,
                  "weight_min": float(weights.min()), "weight_max": float(weights.max()),
                  "clipped": clipped, "effective_documents": float(weights.sum() ** 2 / (weights**2).sum())}
        return ReweightResult(weights, report)

    def remove(self) -> None:
        """Delete the spill files."""
        self._indices.remove()
        self._values.remove()

    def __enter__(self) -> ReweightStream:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def reweight(texts: Sequence[str], keep: np.ndarray, cfg: Reweight, stream: int = 0) -> ReweightResult:
    """Weights for the kept documents of one source held in memory (:class:`ReweightStream` over ``texts``, the
    same weights as a build that streams them).

    Args:
        texts: every document of the source, before filtering.
        keep: (n,) bool, the filters' decision.
        cfg: the reweight settings.
        stream: a number that varies the seed per source.
    """
    with tempfile.TemporaryDirectory(prefix="llmft-reweight-") as tmp, ReweightStream(cfg, Path(tmp), stream) as rw:
        for i in range(0, len(texts), 256):
            rw.add(texts[i : i + 256], keep[i : i + 256])
        return rw.finish()
