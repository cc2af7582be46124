"""Near-duplicate candidates by meaning: hashed bag-of-words embeddings or a sentence embedder, clustered (k-means) and
compared within clusters by cosine similarity."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence

import numpy as np

from llmft.data.dedup.similarity import _pairs
from llmft.data.sources import DataError

EMBED_DIM = 256  # the hashed embedder's dimensions; hashing noise on a cosine is at most sqrt(2 / 256) = 0.088


HASHED_MARGIN = 0.27  # 3 * 0.088: see hashed_min_cosine


MIN_PER_CLUSTER = 10  # at most one centroid per this many documents


TRAIN_PER_CLUSTER = 64  # k-means trains on at most this many documents per centroid


KMEANS_ITERS = 10  # Lloyd iterations: a rough clustering is enough to group near neighbours


def hashed_embedding(shingles: Sequence[np.ndarray], dim: int = EMBED_DIM) -> np.ndarray:
    """Each shingle set feature-hashed into ``dim`` signed dimensions, L2-normalized: (n, dim) float32.

    Bucket from the low bits of the hash, sign from the top bit, so the inner product of two rows estimates the
    cosine of the two shingle sets (noise std <= sqrt(2 / dim)). Rows of empty documents are zero.
    """
    lengths = np.array([len(s) for s in shingles], dtype=np.int64)
    out = np.zeros((len(shingles), dim), dtype=np.float64)
    if lengths.sum():
        h = np.concatenate(shingles).astype(np.int64)
        doc = np.repeat(np.arange(len(shingles)), lengths)
        sign = np.where(h >> 31, -1.0, 1.0)
        out = np.bincount(doc * dim + (h % dim), weights=sign, minlength=len(shingles) * dim).reshape(-1, dim)
    return _normalize(out)


def hashed_min_cosine(threshold: float) -> float:
    """Default ``candidate_cosine`` of the hashed embedder: 2t / (1 + t) - HASHED_MARGIN.

    If J(A, B) = I / (a + b - I) >= t then I >= t (a + b) / (1 + t), so the cosine of the two shingle sets,
    I / sqrt(a b), is at least 2t / (1 + t) (as a + b >= 2 sqrt(a b)); the margin covers the hashing noise.
    """
    return 2 * threshold / (1 + threshold) - HASHED_MARGIN


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norm > 0, norm, 1), dtype=np.float32)


def load_embedder(spec: str) -> Callable[[list[str]], np.ndarray] | None:
    """The text embedder named by ``Dedup.embedder`` (None for 'hashed', which works on shingles).

    Raises:
        DataError: sentence-transformers is not installed or cannot load the model, or the function cannot be
            imported.
    """
    if spec == "hashed":
        return None
    kind, _, rest = spec.partition(":")
    if kind == "sentence-transformers":
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise DataError(f"dedup.embedder {spec!r}: sentence-transformers is not installed; pip install "
                            "sentence-transformers, or use embedder: hashed") from None
        try:
            model = SentenceTransformer(rest)
        except (OSError, ValueError) as e:  # a missing directory, or a hub id not cached / not found offline
            raise DataError(f"dedup.embedder {spec!r}: cannot load the model {rest!r}: {e}") from None
        return lambda texts: model.encode(texts, batch_size=64, normalize_embeddings=True)
    try:
        fn = getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError) as e:
        raise DataError(f"dedup.embedder {spec!r}: cannot import {rest} from {kind}: {e}") from None
    return fn


def cluster_candidates(emb: np.ndarray, num_clusters: int, clusterings: int, min_cosine: float,
                       seed: int) -> tuple[np.ndarray, dict]:
    """Candidate pairs from ``clusterings`` independent k-means clusterings of the rows of ``emb`` (faiss).

    Args:
        emb: (n, d) L2-normalized float32 vectors; zero rows (empty documents) are left out.
        num_clusters: K; at most n / MIN_PER_CLUSTER is used.
        clusterings: R.
        min_cosine: a pair in a cluster is a candidate when its inner product is at least this.
        seed: clustering r uses seed * 1000 + r.

    Returns:
        ((m, 2) int64 pairs i < j, stats: K used, new candidates per clustering).
    """
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs which CPU build it tried at INFO
    import faiss

    threads = faiss.omp_get_max_threads()
    # One thread: k-means sums in a fixed order (the same candidates on any machine), and the many small
    # per-cluster searches run faster without OpenMP start-up and spinning (measured: 3x on 2 busy cores).
    faiss.omp_set_num_threads(1)
    try:
        return _cluster_candidates(faiss, emb, num_clusters, clusterings, min_cosine, seed)
    finally:
        faiss.omp_set_num_threads(threads)


def _cluster_candidates(faiss, emb: np.ndarray, num_clusters: int, clusterings: int, min_cosine: float,
                        seed: int) -> tuple[np.ndarray, dict]:
    live = np.flatnonzero(np.abs(emb).sum(axis=1) > 0)
    x = emb[live]  # (n, d)
    n, d = x.shape
    k = int(min(num_clusters, max(1, n // MIN_PER_CLUSTER)))
    seen = np.zeros((0, 2), dtype=np.int64)
    new_per_round = []
    for r in range(clusterings):
        rng = np.random.default_rng([seed, r])
        if k > 1:
            train = x[np.sort(rng.choice(n, size=min(n, TRAIN_PER_CLUSTER * k), replace=False))]
            km = faiss.Kmeans(d, k, niter=KMEANS_ITERS, seed=(seed * 1000 + r) % (2**31), spherical=True, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=TRAIN_PER_CLUSTER)
            km.train(train)
            assign = km.index.search(x, 1)[1][:, 0]  # (n,) cluster of each document
        else:
            assign = np.zeros(n, dtype=np.int64)
        order = np.argsort(assign, kind="stable")
        bounds = np.flatnonzero(np.diff(assign[order])) + 1
        rows = []
        for members in np.split(order, bounds):
            if len(members) < 2:
                continue
            index = faiss.IndexFlatIP(d)
            index.add(x[members])
            # range_search keeps inner products > radius; nextafter makes it >= min_cosine
            lims, _, found = index.range_search(x[members], float(np.nextafter(np.float32(min_cosine), -2)))
            src = np.repeat(np.arange(len(members)), np.diff(lims.astype(np.int64)))
            keep = found > src
            rows.append(np.column_stack([members[src[keep]], members[found[keep]]]))
        round_pairs = _pairs(rows)
        merged = _pairs([seen, round_pairs])
        new_per_round.append(len(merged) - len(seen))
        seen = merged
    pairs = live[seen] if len(seen) else seen
    return pairs, {"k": k, "new_candidates_per_clustering": new_per_round}


def embed_documents(embedder: str, texts: Sequence[str], shingles: Sequence[np.ndarray]) -> np.ndarray:
    """(n, d) L2-normalized float32 vectors of the documents, by ``Dedup.embedder``.

    Raises:
        DataError: a custom embedder fails to load or returns the wrong shape.
    """
    fn = load_embedder(embedder)
    if fn is None:
        return hashed_embedding(shingles)
    emb = np.asarray(fn(list(texts)), dtype=np.float32)
    if emb.ndim != 2 or len(emb) != len(texts):
        raise DataError(f"dedup.embedder {embedder!r} returned shape {emb.shape}; expected ({len(texts)}, d)")
    return _normalize(emb)
