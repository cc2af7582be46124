"""Near-duplicate candidates by words: shingles, Jaccard similarity, MinHash signatures, LSH bands, and the exact
all-pairs reference the recall is measured against."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np

from llmft.data.decontam import normalize_words

LSH_WEIGHTS = (0.1, 0.9)  # datasketch (false positive, false negative) weights: candidates are checked anyway


_BASE = np.uint64(0x9E3779B97F4A7C15)  # polynomial shingle hash multiplier (as in decontam)


SIGNATURE_CHUNK = 8192  # shingles per MinHash update: a (chunk, num_perm) uint32 temporary


MAX_CACHED_WORDS = 1 << 20  # the Shingler's word-hash cache is cleared past this many words (bounded memory)


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
