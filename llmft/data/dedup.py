"""Remove exact and near-duplicate documents: exact hashes, MinHash-LSH, and repeated clustering.

Similarity (one definition for every method and for the ground truth). A document's *shingles* are its runs of
``shingle_size`` consecutive normalized words (lowercased, punctuation dropped: the normalization of
:mod:`llmft.data.decontam`), each hashed to 32 bits; a document shorter than that is one shingle. Two documents
are duplicates, a *true pair*, when the Jaccard similarity of their shingle sets is at least ``threshold``::

    J(A, B) = |A ∩ B| / |A ∪ B|        e.g. 3-word shingles, 15% of the words substituted: J ≈ 0.44

Shared boilerplate (a header and footer on otherwise different documents) counts only through J: 50 shared words
on two 300-word documents give J ≈ 0.1, not a pair at any sensible threshold.

Methods (``methods``, any of):

- ``exact``: blake2b of the normalized words. Only the first of each set of equal documents goes on to the
  near-duplicate methods (the others are its duplicates with J = 1).
- ``minhash``: a MinHash signature (``num_perm`` permutations, datasketch's affine32 scheme) per document, and
  datasketch's ``MinHashLSH`` banding, with (bands, rows) chosen for ``threshold`` weighting missed pairs 9:1
  over spurious candidates. Candidates whose signatures agree far less often than the threshold (4 standard
  deviations) are dropped; the rest are checked with the exact J, so every pair found is a true pair.
- ``clusters``: embed every document (default: its shingles feature-hashed into 256 signed dimensions,
  L2-normalized, whose inner product estimates the cosine of the shingle sets, which is >= 2t / (1 + t) for a
  pair with J >= t), train k-means (faiss, spherical, one thread) with ``num_clusters`` centroids on a random
  subset, assign every document to its nearest centroid, and within each cluster find the pairs with cosine >=
  ``candidate_cosine`` (faiss range search); check them with the exact J. A near-duplicate pair split by one
  clustering is often together in another, so the candidates of ``clusterings`` independent clusterings
  (different seeds and subsets) are joined. The literature reports 85% of the duplicate pairs with one
  clustering of K = 1024 and 97% with five.

Groups. Pairs found by any method are the edges of a graph; each connected group (union-find) keeps one
document (``keep``: the first read, or the longest) and the others are removed. A chain can put two documents
below the threshold in one group (A ~ B ~ C); that is the usual behaviour of union-find deduplication.

Recall. For ``recall_sample`` documents, every document of the scope that is a true pair with it is found by an
exact all-pairs search (a sparse product of the document-shingle matrix); recall is the share of those pairs the
methods found (directly, or as exact copies of the documents of a found pair), precision the share of found
pairs that are true, and ``recall_grouped`` the share of true pairs whose documents ended in one group (a pair
missed directly is often joined through a third document).

Memory (:class:`DedupIndex`, fed batch by batch, never the texts): under 100 bytes per document in memory (an
exact hash, a word count, a source id and offsets); the shingles (4 bytes per word), signatures, embeddings and
report excerpts go to files. Deciding reads back the signatures, ``num_perm`` * 4 bytes per document (minhash),
sorts one LSH band at a time (16 bytes per document), reads the shingles only of candidate pairs, and for the
recall sample streams over the shingle file; clusters hold the embeddings, ``EMBED_DIM`` * 4 = 1 KB per document.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmft.config.data import Dedup
from llmft.data.decontam import normalize_words
from llmft.data.sources import DataError
from llmft.data.units import ArraySpill

log = logging.getLogger(__name__)
EMBED_DIM = 256  # the hashed embedder's dimensions; hashing noise on a cosine is at most sqrt(2 / 256) = 0.088
HASHED_MARGIN = 0.27  # 3 * 0.088: see hashed_min_cosine
LSH_WEIGHTS = (0.1, 0.9)  # datasketch (false positive, false negative) weights: candidates are checked anyway
MIN_PER_CLUSTER = 10  # at most one centroid per this many documents
TRAIN_PER_CLUSTER = 64  # k-means trains on at most this many documents per centroid
KMEANS_ITERS = 10  # Lloyd iterations: a rough clustering is enough to group near neighbours
EXCERPT_CHARS = 160
_BASE = np.uint64(0x9E3779B97F4A7C15)  # polynomial shingle hash multiplier (as in decontam)
SIGNATURE_CHUNK = 8192  # shingles per MinHash update: a (chunk, num_perm) uint32 temporary
FEATURE_BATCH = 256  # documents per features() call in deduplicate()
RECALL_CHUNK_SHINGLES = 1 << 21  # the recall search reads back this many shingles at a time (16 MB of int64)
MAX_CACHED_WORDS = 1 << 20  # the Shingler's word-hash cache is cleared past this many words (bounded memory)


@dataclass
class DedupResult:
    """What :func:`deduplicate` decided."""

    keep: np.ndarray  # (n,) bool: False for removed documents
    group: np.ndarray  # (n,) int: the index of the document kept for this one's group (itself if alone)
    pairs: np.ndarray  # (m, 2) int64 i < j: the pairs found (exact copies: each with the first of its text)
    report: dict  # see :func:`deduplicate`


# ----------------------------------------------------------------------------------------------- shingles


class Shingler:
    """Documents -> sorted unique uint32 shingle hashes, with a word-value cache (stable across processes).

    Args:
        n: words per shingle.
    """

    def __init__(self, n: int):
        self.n = n
        self._values: dict[str, int] = {}

    def words(self, text: str) -> list[str]:
        return normalize_words(text)

    def __call__(self, words: list[str]) -> np.ndarray:
        """The shingle set of one document's normalized words, as sorted unique uint32 hashes."""
        if not words:
            return np.zeros(0, dtype=np.uint32)
        values = self._values
        if len(values) > MAX_CACHED_WORDS:
            values.clear()
        for w in set(words).difference(values):
            values[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                       "little")
        v = np.fromiter(map(values.__getitem__, words), dtype=np.uint64, count=len(words))
        n = min(self.n, len(v))  # a short document is one shingle of all its words
        count = len(v) - n + 1
        h = v[:count].copy()
        for k in range(1, n):  # sum_k v[i + k] * BASE**(n - 1 - k) mod 2**64 (uint64 wraps)
            h *= _BASE
            h += v[k : k + count]
        return np.unique(_fmix64(h) >> np.uint64(32)).astype(np.uint32)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: spreads the polynomial hash over all bits (the top 32 are kept)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """J of two sorted unique hash arrays (0 when both are empty)."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def jaccard_pairs(pairs: np.ndarray, shingles: Sequence[np.ndarray]) -> np.ndarray:
    """Exact J of every (i, j) row of ``pairs``: (m,) float64.

    One numpy call per distinct first document: its partners' shingles, concatenated, are looked up in its own
    sorted array (searchsorted), and the hits counted per partner.
    """
    out = np.zeros(len(pairs))
    if not len(pairs):
        return out
    order = np.argsort(pairs[:, 0], kind="stable")
    p = pairs[order]
    starts = np.flatnonzero(np.r_[True, p[1:, 0] != p[:-1, 0]])
    for s, e in zip(starts.tolist(), [*starts[1:].tolist(), len(p)]):
        a = shingles[p[s, 0]]
        partners = [shingles[j] for j in p[s:e, 1].tolist()]
        lengths = np.array([len(b) for b in partners])
        if len(a) == 0 or lengths.sum() == 0:
            continue
        cat = np.concatenate(partners)
        idx = np.searchsorted(a, cat)
        idx[idx == len(a)] = 0
        inter = np.bincount(np.repeat(np.arange(e - s), lengths), weights=a[idx] == cat, minlength=e - s)
        union = len(a) + lengths - inter
        out[order[s:e]] = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return out


def _pairs(rows: list[np.ndarray]) -> np.ndarray:
    """Unique (i, j) rows with i < j from a list of (m, 2) arrays."""
    if not rows:
        return np.zeros((0, 2), dtype=np.int64)
    p = np.concatenate(rows).astype(np.int64)
    p = np.sort(p, axis=1)
    p = p[p[:, 0] != p[:, 1]]
    return np.unique(p, axis=0) if len(p) else p


# ----------------------------------------------------------------------------------------------- minhash


@functools.lru_cache(maxsize=4)
def _minhash_template(num_perm: int, seed: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed)


def minhash_signatures(shingles: Sequence[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    """datasketch MinHash signatures (affine32 scheme) of shingle sets: (n, num_perm) uint32; the row of an empty
    set is all 2**32 - 1. Each set goes in ``SIGNATURE_CHUNK`` hashes per update (one numpy call each, and a
    bounded (chunk, num_perm) temporary), which gives the signature of one update with every hash (tested)."""
    from datasketch import MinHash

    template = _minhash_template(num_perm, seed)
    out = np.empty((len(shingles), num_perm), dtype=np.uint32)
    for i, sh in enumerate(shingles):
        m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, permutations=template.permutations,
                    scheme=template.scheme)
        for start in range(0, len(sh), SIGNATURE_CHUNK):
            m.update_batch([sh[start : start + SIGNATURE_CHUNK]])  # one hash value per shingle (identity hashfunc)
        out[i] = m.hashvalues
    return out


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) of the LSH banding for ``threshold``: datasketch's choice for MinHashLSH, weighting missed
    pairs 9:1 over spurious candidates (LSH_WEIGHTS)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, *LSH_WEIGHTS)


def minhash_candidates(signatures: np.ndarray, threshold: float) -> tuple[np.ndarray, dict]:
    """Candidate pairs of MinHash-LSH over ``signatures`` (n, num_perm), without those whose MinHash estimate of J
    is more than 4 standard deviations below the threshold (a true pair is dropped with probability < 1e-4; most
    LSH candidates of a low threshold are such chance collisions).

    The banding of datasketch's MinHashLSH (:func:`lsh_bands`), computed band by band over the signature matrix
    instead of in its dictionaries (which take kilobytes per document): each band's ``rows`` values are hashed to
    64 bits, the documents sorted by that hash, and every two documents with the same hash are a candidate (a
    64-bit collision of different bands adds a candidate that the estimate and the exact check then drop). Memory:
    the signatures plus 16 bytes per document for the band being sorted, and the candidates.

    Returns:
        ((m, 2) int64 pairs i < j, {"bands", "rows", "lsh_candidates"}).
    """
    n, num_perm = signatures.shape
    bands, rows = lsh_bands(threshold, num_perm)
    found = []
    for band in range(bands):
        h = np.zeros(n, dtype=np.uint64)
        for c in range(band * rows, (band + 1) * rows):
            h = _fmix64(h * _BASE + signatures[:, c].astype(np.uint64))
        order = np.argsort(h, kind="stable")
        found.append(_same_key_pairs(h[order], order))
    pairs = _pairs(found)
    estimate = np.concatenate([(signatures[c[:, 0]] == signatures[c[:, 1]]).mean(axis=1) for c in np.array_split(
        pairs, max(1, len(pairs) // 65536))]) if len(pairs) else np.zeros(0)
    floor = threshold - 4 * np.sqrt(threshold * (1 - threshold) / num_perm)
    return pairs[estimate >= floor], {"bands": bands, "rows": rows, "lsh_candidates": len(pairs)}


def _same_key_pairs(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Every pair (ids[a], ids[b]), a < b, of positions with equal ``keys`` (sorted): (m, 2) int64. The work is
    the number of pairs: position a is paired with a + d while a + d is still in its run."""
    if len(keys) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    run_end = np.repeat(np.append(starts[1:], len(keys)), np.diff(np.append(starts, len(keys))))  # (n,) end of run
    pos = np.flatnonzero(run_end - np.arange(len(keys)) >= 2)  # positions with a later one in their run
    out, d = [], 1
    while len(pos):
        out.append(np.column_stack([ids[pos], ids[pos + d]]))
        d += 1
        pos = pos[pos + d < run_end[pos]]
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), dtype=np.int64)


def _identity(x):
    return x


# ----------------------------------------------------------------------------------------------- clusters


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


# ----------------------------------------------------------------------------------------------- ground truth


def all_pairs(shingles: Sequence[np.ndarray], threshold: float, rows: np.ndarray | None = None,
              chunk: int = 256) -> np.ndarray:
    """Exact search: every pair (i, j), i < j, with J >= threshold, where i or j is in ``rows`` (default: all).

    A sparse (documents x distinct shingles) 0/1 matrix X; X[rows] @ X.T counts the shared shingles of every
    pair that shares any. Cost: sum over the shingles of the sampled rows of the number of documents holding them.

    Returns:
        (m, 2) int64 pairs i < j, sorted.
    """
    from scipy import sparse

    lengths = np.array([len(s) for s in shingles], dtype=np.int64)
    if lengths.sum() == 0:
        return np.zeros((0, 2), dtype=np.int64)
    _, cols = np.unique(np.concatenate(shingles), return_inverse=True)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    x = sparse.csr_matrix((np.ones(len(cols), dtype=np.int32), cols, indptr), shape=(len(shingles), cols.max() + 1))
    xt = x.T.tocsr()
    rows = np.arange(len(shingles)) if rows is None else np.asarray(rows, dtype=np.int64)
    out = []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        inter = (x[r] @ xt).tocoo()  # (len(r), n) shared-shingle counts
        i, j, c = r[inter.row], inter.col.astype(np.int64), inter.data.astype(np.float64)
        ok = (i != j) & (c / (lengths[i] + lengths[j] - c) >= threshold)
        out.append(np.column_stack([i[ok], j[ok]]))
    return _pairs(out)


# ----------------------------------------------------------------------------------------------- driver


@dataclass
class Features:
    """One batch's per-document dedup features, from :func:`features` (in any process): never the texts."""

    n_words: np.ndarray  # (n,) int64
    exact: np.ndarray  # (n, 16) uint8: blake2b of the normalized words
    shingles: np.ndarray  # (sum of counts,) uint32: each document's sorted unique shingle hashes, in turn
    counts: np.ndarray  # (n,) int64 shingles per document
    signatures: np.ndarray | None  # (n, num_perm) uint32 with minhash
    embeddings: np.ndarray | None  # (n, EMBED_DIM) float32 with clusters and the hashed embedder
    excerpts: list[str]  # for the report's example pairs

    def select(self, keep: np.ndarray) -> Features:
        """The features of the documents where ``keep`` (n,) bool is set."""
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        parts = [self.shingles[starts[i] : starts[i + 1]] for i in np.flatnonzero(keep)]
        return Features(self.n_words[keep], self.exact[keep],
                        np.concatenate(parts) if parts else np.zeros(0, np.uint32), self.counts[keep],
                        None if self.signatures is None else self.signatures[keep],
                        None if self.embeddings is None else self.embeddings[keep],
                        [e for e, k in zip(self.excerpts, keep) if k])


def features(texts: Sequence[str], cfg: Dedup, shingler: Shingler | None = None) -> Features:
    """The dedup features of a batch of documents (prompt and text together)."""
    shingler = shingler or Shingler(cfg.shingle_size)
    words = [shingler.words(t) for t in texts]
    shingles = [shingler(w) for w in words]
    exact = np.frombuffer(b"".join(hashlib.blake2b(" ".join(w).encode("utf-8", "surrogatepass"),
                                                   digest_size=16).digest() for w in words),
                          dtype=np.uint8).reshape(-1, 16)
    return Features(
        n_words=np.array([len(w) for w in words], dtype=np.int64), exact=exact,
        shingles=np.concatenate(shingles) if shingles else np.zeros(0, np.uint32),
        counts=np.array([len(s) for s in shingles], dtype=np.int64),
        signatures=minhash_signatures(shingles, cfg.num_perm, cfg.seed) if "minhash" in cfg.methods else None,
        embeddings=hashed_embedding(shingles) if "clusters" in cfg.methods and cfg.embedder == "hashed" else None,
        excerpts=[_excerpt(t) for t in texts])


class DedupIndex:
    """The corpus-wide state of deduplication, document by document in reading order, without the texts.

    In memory per document: its exact hash (16 bytes), word count (8), source (2) and the offsets of its spilled
    data (16); with ``minhash`` its signature (``num_perm`` * 4 bytes) is written to a file and read back whole by
    :meth:`finish`; with ``clusters`` its embedding (``EMBED_DIM`` * 4 bytes) likewise. Its shingles (4 bytes per
    word) and its location and excerpt go to files in ``workdir``, read back only for the candidate pairs, the
    recall sample and the report's examples.

    Args:
        cfg: the dedup settings.
        workdir: a directory for the spilled data (created; its files are removed by :meth:`remove`).

    Raises:
        OSError: the spill files cannot be written.
    """

    def __init__(self, cfg: Dedup, workdir: Path):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.shingler = Shingler(cfg.shingle_size)
        self._shingles = ArraySpill(self.workdir / "shingles.u32", np.uint32)
        self._notes = ArraySpill(self.workdir / "notes.u8", np.uint8)  # "where\0excerpt", utf-8
        self._signatures = ArraySpill(self.workdir / "signatures.u32", np.uint32) if "minhash" in cfg.methods else None
        self._embeddings = ArraySpill(self.workdir / "embeddings.f32", np.float32) \
            if "clusters" in cfg.methods else None
        self._embedder: Callable | None = None  # a custom embedder, loaded on first use
        self.n_words = array("q")
        self.exact = bytearray()
        self.source_ids = array("H")
        self.sources: list[str] = []

    def __len__(self) -> int:
        return len(self.n_words)

    def add_texts(self, texts: Sequence[str], source: str, where: Sequence[str]) -> None:
        """Add documents of one source, computing their features here."""
        self.add(features(texts, self.cfg, self.shingler), source, where, texts)

    def add(self, feats: Features, source: str, where: Sequence[str], texts: Sequence[str] | None = None) -> None:
        """Add a batch of documents of one source by their features (``texts`` only for a custom embedder).

        Raises:
            DataError: a custom embedder fails to load or returns the wrong shape.
            OSError: the spill files cannot be written.
            ValueError: ``texts`` is missing with a custom embedder.
        """
        n = len(feats.n_words)
        if n == 0:
            return
        if source not in self.sources:
            self.sources.append(source)
        self.source_ids.extend([self.sources.index(source)] * n)
        self.n_words.extend(feats.n_words.tolist())
        self.exact += feats.exact.tobytes()
        self._shingles.extend(feats.shingles, feats.counts)
        for w, e in zip(where, feats.excerpts):
            self._notes.append(np.frombuffer(f"{w}\0{e}".encode("utf-8", "surrogatepass"), np.uint8))
        if self._signatures is not None:
            self._signatures.extend(feats.signatures, np.full(n, self.cfg.num_perm))
        if self._embeddings is not None:
            emb = feats.embeddings
            if emb is None:
                if texts is None:
                    raise ValueError("a custom embedder needs the texts")
                self._embedder = self._embedder or load_embedder(self.cfg.embedder)
                emb = _normalize(np.asarray(self._embedder(list(texts)), dtype=np.float32))
                if emb.ndim != 2 or len(emb) != n:
                    raise DataError(f"dedup.embedder {self.cfg.embedder!r} returned shape {emb.shape}; expected "
                                    f"({n}, d)")
            self._embeddings.extend(emb, np.full(n, emb.shape[1]))

    def shingles(self, i: int) -> np.ndarray:
        """Document ``i``'s sorted unique shingle hashes (read back from the spill)."""
        return self._shingles[i]

    def note(self, i: int) -> tuple[str, str]:
        """(where, excerpt) of document ``i``."""
        where, _, excerpt = self._notes[i].tobytes().decode("utf-8", "surrogatepass").partition("\0")
        return where, excerpt

    def _matrix(self, spill: ArraySpill | None, dtype: type) -> np.ndarray | None:
        if spill is None or not len(self):
            return None
        spill[0]  # flushes what was written
        return np.memmap(spill.path, dtype=dtype, mode="r", shape=(len(self), len(spill[0])))

    def finish(self, recall: bool = True) -> DedupResult:
        """Find the duplicate groups among every document added so far and choose the document kept from each (see
        the module docstring). It may be called again after more documents are added; ``recall=False`` skips the
        recall measurement (a pass over every document's shingles), for decisions that may not be the last.

        Returns:
            keep / group per document and the report of :func:`deduplicate`.

        Raises:
            DataError: a custom embedder fails to load or returns the wrong shape.
        """
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        cfg, t_start, n = self.cfg, time.perf_counter(), len(self)
        n_words = np.frombuffer(self.n_words, np.int64) if n else np.zeros(0, np.int64)
        exact = np.frombuffer(bytes(self.exact), dtype="V16") if n else np.zeros(0, "V16")
        src = np.frombuffer(self.source_ids, np.uint16) if n else np.zeros(0, np.uint16)
        lengths = self._shingles.lengths()
        signatures = self._matrix(self._signatures, np.uint32)
        embeddings = self._matrix(self._embeddings, np.float32)
        scopes = [np.flatnonzero(src == k) for k in range(len(self.sources))] if cfg.scope == "per_source" \
            else [np.arange(n)]
        edges: list[tuple[int, int, float, str]] = []  # (i, j, J, method) of near-duplicate pairs found
        exact_edges: list[np.ndarray] = []  # (first with this normalized text, copy) rows
        methods = {m: {"candidates": 0, "pairs": 0} for m in cfg.methods if m != "exact"}
        extra: dict[str, dict] = {}
        seconds = {"exact": 0.0, "minhash": 0.0, "clusters": 0.0, "verify": 0.0, "recall": 0.0}
        truth: set[tuple[int, int]] = set()  # true pairs touching the recall sample (global indices)
        found_sampled: set[tuple[int, int]] = set()  # found pairs touching the recall sample
        sampled = 0

        for members in scopes:
            if not len(members):
                continue
            t0 = time.perf_counter()
            local_rep = np.arange(len(members))  # representative of each document's exact class (itself without exact)
            if "exact" in cfg.methods:
                _, first, inverse = np.unique(exact[members], return_index=True, return_inverse=True)
                local_rep = first[inverse.reshape(-1)]  # np.unique's first index: the first in reading order
                copies = np.flatnonzero(local_rep != np.arange(len(members)))
                exact_edges.append(np.column_stack([members[local_rep[copies]], members[copies]]))
            reps = np.flatnonzero(local_rep == np.arange(len(members)))  # local indices that go on
            seconds["exact"] += time.perf_counter() - t0

            candidates: dict[str, np.ndarray] = {}
            if "minhash" in cfg.methods:
                t0 = time.perf_counter()
                live = reps[lengths[members[reps]] > 0]  # documents without shingles are left out
                pairs, extra["minhash"] = minhash_candidates(np.asarray(signatures[members[live]]), cfg.threshold)
                candidates["minhash"] = np.searchsorted(reps, live)[pairs] if len(pairs) else pairs
                seconds["minhash"] += time.perf_counter() - t0
            if "clusters" in cfg.methods:
                t0 = time.perf_counter()
                emb = np.asarray(embeddings[members[reps]])  # (reps, d): EMBED_DIM * 4 bytes per document
                min_cos = cfg.candidate_cosine if cfg.candidate_cosine is not None \
                    else hashed_min_cosine(cfg.threshold)
                candidates["clusters"], st = cluster_candidates(emb, cfg.num_clusters, cfg.clusterings, min_cos,
                                                                cfg.seed)
                del emb
                ex = extra.setdefault("clusters", {"candidate_cosine": round(float(min_cos), 4), "k": {},
                                                   "new_candidates_per_clustering": [0] * cfg.clusterings})
                ex["k"][self._scope_name(members)] = st["k"]
                ex["new_candidates_per_clustering"] = [a + b for a, b in zip(ex["new_candidates_per_clustering"],
                                                                             st["new_candidates_per_clustering"])]
                seconds["clusters"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            union = _pairs(list(candidates.values()))  # every candidate once (local rep positions), checked exactly
            union_keys = union[:, 0] * len(reps) + union[:, 1]
            sims = jaccard_pairs(union, _Lazy(lambda p: self.shingles(int(members[reps[p]])), len(reps)))
            found_local: set[tuple[int, int]] = set()  # (a, b) local indices of members, a < b
            for method, pairs in candidates.items():
                methods[method]["candidates"] += len(pairs)
                sim = sims[np.searchsorted(union_keys, pairs[:, 0] * len(reps) + pairs[:, 1])]
                ok = sim >= cfg.threshold
                methods[method]["pairs"] += int(ok.sum())
                for (p, q), j in zip(pairs[ok].tolist(), sim[ok].tolist()):
                    a, b = int(reps[p]), int(reps[q])
                    if (a, b) not in found_local:
                        found_local.add((a, b))
                        edges.append((int(members[a]), int(members[b]), j, method))
            seconds["verify"] += time.perf_counter() - t0

            if cfg.recall_sample and recall:
                t0 = time.perf_counter()
                rng = np.random.default_rng([cfg.seed, 7])
                sample = np.sort(rng.choice(len(members), size=min(cfg.recall_sample, len(members)), replace=False))
                sampled += len(sample)
                t_local, f_local = self._recall(members, local_rep, found_local, sample)
                truth |= {(int(members[a]), int(members[b])) for a, b in t_local}
                found_sampled |= {(int(members[a]), int(members[b])) for a, b in f_local}
                seconds["recall"] += time.perf_counter() - t0

        # groups: connected components of the pairs found; one kept document per group
        edge_rows = np.array([(i, j) for i, j, _, _ in edges], dtype=np.int64).reshape(-1, 2)
        links = np.concatenate([edge_rows, *exact_edges]) if exact_edges else edge_rows
        _, roots = connected_components(coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(n, n)),
                                        directed=False)
        # keep: first -> the first of each group; longest -> the most words, the first of those on a tie
        order = np.lexsort((np.arange(n), -n_words if cfg.keep == "longest" else np.zeros(n, np.int64), roots))
        first_of_root = np.zeros(roots.max() + 1 if n else 0, dtype=np.int64)
        starts = np.concatenate([[True], roots[order][1:] != roots[order][:-1]]) if n else np.zeros(0, bool)
        first_of_root[roots[order][starts]] = order[starts]
        group = first_of_root[roots] if n else np.zeros(0, np.int64)
        keep = group == np.arange(n)
        sizes = np.bincount(group, minlength=n)
        removed_exact = ~keep & (exact == exact[group])
        by_source = {}
        for k, name in enumerate(self.sources):
            mine = src == k
            by_source[name] = {"documents": int(mine.sum()), "removed": int((mine & ~keep).sum()),
                               "removed_exact": int((mine & removed_exact).sum()),
                               "words_removed": int(n_words[mine & ~keep].sum())}
        examples = []
        for i, j, sim, method in sorted(edges, key=lambda e: (e[2], e[0], e[1]))[: cfg.examples]:
            (wa, ta), (wb, tb) = self.note(i), self.note(j)
            examples.append({"a": wa, "b": wb, "source_a": self.sources[src[i]], "source_b": self.sources[src[j]],
                             "jaccard": round(sim, 4), "method": method, "a_text": ta, "b_text": tb})
        recall_report = None
        if cfg.recall_sample and recall:
            hit = len(truth & found_sampled)
            grouped = sum(int(group[a] == group[b]) for a, b in truth)
            recall_report = {"sampled_documents": sampled, "true_pairs": len(truth), "found": hit,
                      "recall": hit / len(truth) if truth else None,
                      "recall_grouped": grouped / len(truth) if truth else None,
                      "found_pairs": len(found_sampled),
                      "precision": hit / len(found_sampled) if found_sampled else None}
        report = {
            "settings": cfg.model_dump(mode="json"),
            "documents": n,
            "removed": int((~keep).sum()),
            "groups": int((sizes >= 2).sum()),
            "documents_in_groups": int(sizes[sizes >= 2].sum()),
            "largest_group": int(sizes.max()) if n else 0,
            "exact_duplicates": int(removed_exact.sum()),
            "methods": {m: {**methods[m], **extra.get(m, {})} for m in methods},
            "by_source": by_source,
            "examples": examples,
            "recall": recall_report,
            "seconds": {k: round(v, 3) for k, v in seconds.items() if v}
            | {"total": round(time.perf_counter() - t_start, 3)},
        }
        return DedupResult(keep, group, _pairs([links]), report)

    def _scope_name(self, members: np.ndarray) -> str:
        if self.cfg.scope != "per_source":
            return "all sources"
        return self.sources[self.source_ids[int(members[0])]]

    def _recall(self, members: np.ndarray, rep: np.ndarray, found: set[tuple[int, int]], sample: np.ndarray
                ) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
        """(true pairs touching the sample, found pairs touching the sample), as (i, j) i < j over local indices. A
        pair (x, y) is found when x and y are exact copies of each other or their representatives are a found
        pair."""
        truth = {tuple(p) for p in self._sample_pairs(members, sample).tolist()}
        members_of: dict[int, list[int]] = {}
        for x, r in enumerate(rep.tolist()):
            members_of.setdefault(r, []).append(x)
        neighbours: dict[int, list[int]] = {}
        for a, b in found:
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
        found_pairs = set()
        for x in sample.tolist():
            r = int(rep[x])
            for y in members_of[r] + [y for b in neighbours.get(r, []) for y in members_of[b]]:
                if y != x:
                    found_pairs.add((min(x, y), max(x, y)))
        return truth, found_pairs

    def _sample_pairs(self, members: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The exact search of :func:`all_pairs` with ``rows=sample``, streaming: the sampled documents' shingles in
        memory as a sparse (sample x their distinct shingles) matrix, the documents of the scope read back from the
        spill ``RECALL_CHUNK_SHINGLES`` shingles at a time and their shared-shingle counts with the sample taken by
        one sparse product per chunk.

        Returns:
            (m, 2) int64 pairs a < b of local indices (positions in ``members``) with J >= threshold, one of them
            sampled.
        """
        from scipy import sparse

        threshold = self.cfg.threshold
        lengths = self._shingles.lengths()[members]
        sampled = [self.shingles(int(members[s])) for s in sample]
        vocab = np.unique(np.concatenate(sampled)) if sampled else np.zeros(0, np.uint32)
        if not len(vocab):
            return np.zeros((0, 2), dtype=np.int64)

        def rows(sets: list[np.ndarray]) -> sparse.csr_matrix:  # (len(sets), len(vocab)) 0/1 over the vocabulary
            cols = [np.searchsorted(vocab, s) for s in sets]
            hits = [c[(c < len(vocab)) & (vocab[np.minimum(c, len(vocab) - 1)] == s)] for c, s in zip(cols, sets)]
            indptr = np.concatenate([[0], np.cumsum([len(h) for h in hits])])
            flat = np.concatenate(hits) if hits else np.zeros(0, np.int64)
            return sparse.csr_matrix((np.ones(len(flat), np.int32), flat, indptr), shape=(len(sets), len(vocab)))

        xs_t = rows(sampled).T.tocsr()  # (vocab, sample)
        del sampled
        cum = np.cumsum(lengths)  # (members,) shingles up to and with each document
        out, start = [], 0
        while start < len(members):  # the next documents whose shingles fit in the chunk (at least one)
            base = int(cum[start - 1]) if start else 0
            end = max(start + 1, int(np.searchsorted(cum, base + RECALL_CHUNK_SHINGLES, side="right")))
            inter = (rows([self.shingles(int(m)) for m in members[start:end]]) @ xs_t).tocoo()
            i = start + inter.row.astype(np.int64)  # (pairs,) local index of the scope document
            j = sample[inter.col]  # its sampled partner
            c = inter.data.astype(np.float64)
            ok = (i != j) & (c / (lengths[i] + lengths[j] - c) >= threshold)
            out.append(np.column_stack([i[ok], j[ok]]))
            start = end
        return _pairs(out)

    def remove(self) -> None:
        """Delete the spilled data."""
        for spill in (self._shingles, self._notes, self._signatures, self._embeddings):
            if spill is not None:
                spill.remove()

    def __enter__(self) -> DedupIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _Lazy(Sequence):
    """A read-only sequence whose items are computed (read back) on access."""

    def __init__(self, get: Callable[[int], np.ndarray], n: int):
        self._get, self._n = get, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._get(i)


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


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


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
