"""Corpora for tests and benches, built from real prose (the bundled public-domain books in ``llmft/assets``).

- :func:`shift_corpus`: two classes of documents whose keyword frequencies a content filter shifts (the
  reweighting tests);
- :func:`write_sharded_corpus`: a source of many jsonl shards beside a small one (the sampled-reading tests).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmft.testing.tiny import ASSETS

SHARDS = 40  # shards of write_sharded_corpus's big source


def _sentences(name: str) -> list[str]:
    """The sentences of a bundled book of 5-60 words."""
    with gzip.open(ASSETS / name, "rt", encoding="utf-8") as f:
        text = " ".join(f.read().split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if 5 <= len(s.split()) <= 60]


def shift_corpus(n: int, seed: int = 0, rates: tuple[float, float] = (0.14, 0.06), topic: float = 0.7):
    """(texts, class (n,) 0 = woman, 1 = man, (n,) bool: has the word 'damn')."""
    rng = np.random.default_rng(seed)
    books = _sentences("frankenstein.txt.gz"), _sentences("mobydick.txt.gz")
    texts, cls, marked = [], [], []
    for i in range(n):
        c = i % 2
        words = []
        for _ in range(rng.integers(3, 7)):
            pool = books[c] if rng.random() < topic else books[1 - c]
            words += pool[rng.integers(len(pool))].split()
        for _ in range(2):
            words.insert(rng.integers(len(words) + 1), ("woman", "man")[c])
        m = rng.random() < rates[c]
        if m:
            words.insert(rng.integers(len(words) + 1), "damn")
        texts.append(" ".join(words))
        cls.append(c)
        marked.append(m or re.search(r"(?<!\w)damn(?!\w)", texts[-1], re.IGNORECASE) is not None)  # Moby Dick has a few
    return texts, np.array(cls), np.array(marked)


def write_sharded_corpus(tmp_path: Path, book_text: str, shard: Callable[[Callable[[str], str], int], list[str]]
                 ) -> dict[str, Path]:
    """``big``: 40 jsonl shards, shard ``s`` holding ``shard(doc, s)``, where ``doc(tag)`` is ~400 words of the book
    after ``tag .``; ``small``: one file of 16 such documents."""
    words = book_text.split()
    rng = np.random.default_rng(0)

    def doc(tag: str) -> str:
        start = int(rng.integers(0, len(words) - 400))
        return f"{tag} . " + " ".join(words[start : start + 400])

    big = tmp_path / "big"
    big.mkdir()
    for s in range(SHARDS):
        (big / f"{s:03d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in shard(doc, s)))
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": doc(f"small doc {d}")}) + "\n" for d in range(16)))
    return {"big": big, "small": small}
