"""The streaming dedup index: each document's features (exact hash, MinHash signature, shingles, an excerpt) added as
they are read, ``num_perm * 4`` bytes per document in memory while deciding, the shingles and excerpts spilled to
disk; duplicates decided over all of them, with the measured recall."""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmft.config.data import Dedup
from llmft.data.dedup.embedding import (
    _normalize,
    cluster_candidates,
    hashed_embedding,
    hashed_min_cosine,
    load_embedder,
)
from llmft.data.dedup.similarity import Shingler, _pairs, jaccard_pairs, minhash_candidates, minhash_signatures
from llmft.data.sources import DataError
from llmft.data.units import ArraySpill

EXCERPT_CHARS = 160


RECALL_CHUNK_SHINGLES = 1 << 21  # the recall search reads back this many shingles at a time (16 MB of int64)


@dataclass
class DedupResult:
    """What :func:`deduplicate` decided."""

    keep: np.ndarray  # (n,) bool: False for removed documents
    group: np.ndarray  # (n,) int: the index of the document kept for this one's group (itself if alone)
    pairs: np.ndarray  # (m, 2) int64 i < j: the pairs found (exact copies: each with the first of its text)
    report: dict  # see :func:`deduplicate`


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


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"
