"""A corpus with planted near-duplicates and known lineage, built from real prose (the bundled books), for the
tests and ``bench/dedup.py``.

Base documents are mosaics of real passages: paragraphs, each a run of 1-3 consecutive sentences taken from a
shuffled partition of the sentences of Frankenstein and Moby Dick (``llmft/assets``; sentences of 3-30 words,
about 10,000), until 200-500 words. They read like prose, and two base documents share no passage until the
partition is used up (about 1,000 documents); past that they share one passage now and then (J < 0.2). Then:

- **variants** of some base documents (a family is the base and 1-3 variants, placed apart in the output):

  - ``edit``: a fraction (default 5-15%) of the words substituted, deleted or followed by an inserted word;
  - ``reorder``: paragraphs shuffled, and the sentences of one paragraph shuffled, plus 0-3% word edits;
  - ``exact``: the same words with case, spacing and punctuation changed (equal after normalization);
- **boilerplate**: a share of the base documents (and so their variants) get one of three shared header +
  footer blocks (a license notice, a site footer, a newsletter banner: 45-60 words). Two *different*
  documents with the same boilerplate are not duplicates; their Jaccard similarity is well below the
  thresholds used with this corpus.

Lineage is known (``family``, ``kind``), but the ground truth of a deduplication run is the exact all-pairs
Jaccard similarity (:func:`llmft.data.dedup.all_pairs`): a *true pair* is a pair at or above the threshold.
:attr:`PlantedCorpus.variant_pairs` (base, variant) and :attr:`PlantedCorpus.boilerplate_pairs` let a test
check that the planted structure lands on the intended side of the threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from llmft.testing.tiny import ASSETS, read_text

BOOKS = ("frankenstein.txt.gz", "mobydick.txt.gz")
BOILERPLATE = [
    ("This text is provided free of charge under an open license. You may copy it, give it away or reuse it "
     "under the terms of the license included with this file or online.",
     "End of the text. If you are not located in the United States, check the laws of the country where you "
     "are located before using this file. Updated editions replace the previous one."),
    ("Home | Books | Authors | Reading lists | About us | Contact | Sign in to save your place and sync it "
     "across devices.",
     "Copyright the library project. All rights reserved. Privacy policy. Terms of use. Cookie settings. Report "
     "a problem with this page or send us feedback."),
    ("Subscribe to our weekly newsletter for the best classic stories delivered to your inbox every Sunday "
     "morning, free.",
     "You received this because you subscribed on our website. Unsubscribe at any time with one click. Forward "
     "this email to a friend who loves reading."),
]
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+")


@dataclass
class PlantedCorpus:
    """Documents with their lineage."""

    texts: list[str]
    family: list[int]  # the base document each text derives from (a base is its own family)
    kind: list[str]  # "base", "edit", "reorder" or "exact"
    boilerplate: list[int]  # index into BOILERPLATE, or -1
    edit_rate: list[float] = field(default_factory=list)  # word-edit rate of each text (0 for bases)

    @property
    def variant_pairs(self) -> set[tuple[int, int]]:
        """(i, j), i < j: a base and one of its variants."""
        base = {f: i for i, (f, k) in enumerate(zip(self.family, self.kind)) if k == "base"}
        return {tuple(sorted((base[f], i))) for i, (f, k) in enumerate(zip(self.family, self.kind)) if k != "base"}

    @property
    def boilerplate_pairs(self) -> set[tuple[int, int]]:
        """(i, j), i < j: documents of different families with the same boilerplate."""
        by_plate: dict[int, list[int]] = {}
        for i, b in enumerate(self.boilerplate):
            if b >= 0:
                by_plate.setdefault(b, []).append(i)
        return {(i, j) for docs in by_plate.values() for a, i in enumerate(docs) for j in docs[a + 1 :]
                if self.family[i] != self.family[j]}


def sentences() -> list[str]:
    """The sentences of 3-30 words of the bundled books (whitespace collapsed), in order."""
    out = []
    for name in BOOKS:
        for para in re.split(r"\n\s*\n", read_text(ASSETS / name)):
            para = " ".join(para.split())
            if len(para.split()) >= 4:  # sentences of 3-30 words: one shared passage stays a small part of a document
                out += [s for s in _SENTENCE_END.split(para) if 3 <= len(s.split()) <= 30]
    return out


def planted_corpus(n_docs: int, seed: int = 0, variant_fraction: float = 0.3,
                   edit_rate: tuple[float, float] = (0.05, 0.15), boilerplate_fraction: float = 0.25,
                   doc_words: tuple[int, int] = (250, 500), pool: list[str] | None = None) -> PlantedCorpus:
    """Generate ``n_docs`` documents, about ``variant_fraction`` of them variants of the others.

    Args:
        n_docs: documents in the corpus.
        seed: seeds everything.
        variant_fraction: share of the documents that are variants (edit 55%, reorder 30%, exact 15%).
        edit_rate: (low, high) of the uniform word-edit rate of ``edit`` variants.
        boilerplate_fraction: share of base documents that carry one of the shared header/footer blocks.
        doc_words: (low, high) of the uniform target length of a base document in words (its last paragraph
            may go past it).
        pool: sentences to build from (default: :func:`sentences`); pass it to reuse it across calls.

    Returns:
        The corpus, shuffled (variants are not next to their base).
    """
    rng = np.random.default_rng(seed)
    pool = pool if pool is not None else sentences()
    vocab = sorted({w for s in pool[:: max(1, len(pool) // 3000)] for w in s.split()})
    n_variants = int(round(n_docs * variant_fraction))
    n_base = n_docs - n_variants
    passages = _passages(pool, rng)
    docs: list[tuple[list[list[str]], int, str, int, float]] = []  # (paragraphs, family, kind, plate, rate)
    for f in range(n_base):
        paragraphs, words, target = [], 0, int(rng.integers(*doc_words))
        while words < target:
            paragraphs.append(next(passages))
            words += sum(len(s.split()) for s in paragraphs[-1])
        plate = int(rng.integers(len(BOILERPLATE))) if rng.random() < boilerplate_fraction else -1
        docs.append((paragraphs, f, "base", plate, 0.0))
    # variants: each picks a base at random (so families have 1 to a few variants)
    kinds = rng.choice(["edit", "reorder", "exact"], size=n_variants, p=[0.55, 0.30, 0.15])
    for kind in kinds:
        paragraphs, f, _, plate, _ = docs[int(rng.integers(n_base))]
        if kind == "edit":
            rate = float(rng.uniform(*edit_rate))
            new = [[_edit(s, rate, vocab, rng) for s in p] for p in paragraphs]
        elif kind == "reorder":
            rate = float(rng.uniform(0, 0.03))
            new = [list(p) for p in paragraphs]
            rng.shuffle(new)
            k = int(rng.integers(len(new)))
            new[k] = [new[k][i] for i in rng.permutation(len(new[k]))]
            new = [[_edit(s, rate, vocab, rng) for s in p] for p in new]
        else:
            rate = 0.0
            new = [[_restyle(s, rng) for s in p] for p in paragraphs]
        docs.append((new, f, str(kind), plate, rate))
    order = rng.permutation(len(docs))
    texts, family, kind, plates, rates = [], [], [], [], []
    for i in order:
        paragraphs, f, k, plate, rate = docs[i]
        body = "\n\n".join(" ".join(p) for p in paragraphs)
        if plate >= 0:
            head, foot = BOILERPLATE[plate]
            body = f"{head}\n\n{body}\n\n{foot}"
        texts.append(body)
        family.append(f)
        kind.append(k)
        plates.append(plate)
        rates.append(rate)
    return PlantedCorpus(texts, family, kind, plates, rates)


def _passages(pool: list[str], rng: np.random.Generator):
    """Endless stream of disjoint runs of 1-3 consecutive sentences, in random order; a new order each pass."""
    bounds = np.cumsum(rng.integers(1, 4, size=len(pool)))
    bounds = np.concatenate([[0], bounds[bounds < len(pool)], [len(pool)]])
    runs = [pool[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    while True:
        for k in rng.permutation(len(runs)):
            yield runs[k]


def _edit(sentence: str, rate: float, vocab: list[str], rng: np.random.Generator) -> str:
    """Substitute (60%), delete (20%) or insert after (20%) each word with probability ``rate``."""
    out = []
    for w in sentence.split():
        if rng.random() >= rate:
            out.append(w)
            continue
        op = rng.random()
        if op < 0.6:
            out.append(vocab[int(rng.integers(len(vocab)))])
        elif op < 0.8:
            continue
        else:
            out += [w, vocab[int(rng.integers(len(vocab)))]]
    return " ".join(out) if out else sentence


def _restyle(sentence: str, rng: np.random.Generator) -> str:
    """Same normalized words: change case, double some spaces, add or drop punctuation at word ends."""
    out = []
    for w in sentence.split():
        r = rng.random()
        if r < 0.1:
            w = w.upper()
        elif r < 0.2:
            w = w + ","
        elif r < 0.25 and w.strip(".,;:!?"):
            w = w.strip(".,;:!?")
        out.append(w)
    return "  ".join(out) if rng.random() < 0.3 else " ".join(out)
