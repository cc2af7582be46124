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


Modules: :mod:`~llmft.data.dedup.similarity` (shingles, MinHash, LSH, exact pairs), :mod:`~.embedding` (semantic
candidates), :mod:`~.index` (the streaming index), :mod:`~.corpus` (one call over a list of texts, the report).
"""

from llmft.data.dedup.corpus import deduplicate, report_markdown
from llmft.data.dedup.embedding import embed_documents, hashed_embedding, load_embedder
from llmft.data.dedup.index import DedupIndex, DedupResult, Features, features
from llmft.data.dedup.similarity import Shingler, all_pairs, jaccard, minhash_signatures

__all__ = ["DedupIndex", "DedupResult", "Features", "Shingler", "all_pairs", "deduplicate", "embed_documents",
           "features", "hashed_embedding", "jaccard", "load_embedder", "minhash_signatures", "report_markdown"]
