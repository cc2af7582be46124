"""Synthetic stand-ins for the two applications, in the public formats, for `llmft repro mdqa` and the tests.

- Multi-document QA: each question asks for one made-up fact ("the code of Orlan Vess"); k passages each state
  such a fact about a different name, exactly one (the gold passage, at a chosen position) about the asked name.
  Written as ``nq-open-{k}_total_documents_gold_at_{i}.jsonl.gz`` with ``question``, ``answers`` and ``ctxs``
  (``title``, ``text``, ``isgold``), the layout of the "Lost in the Middle" release, so the same loader and
  metric run on both.
- Summarization: a "chapter" of sentences in which one is marked as the point of it ("In short, ..."); the summary
  is that sentence. Rows ``{"chapter", "summary_text"}`` as in BookSum.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

_SYLLABLES = ("ar", "ben", "cor", "dal", "el", "fen", "gor", "hal", "is", "jor", "kel", "lum", "mor", "nel", "or",
              "pel", "quin", "ros", "sel", "tor", "ul", "var", "wen", "yor", "zan")
_FILLER = ("The river was high that spring.", "Nobody remembered the old road.", "The letters came in autumn.",
           "Snow covered the pass for weeks.", "The mill had closed long before.", "Lamps burned late in the town.",
           "The harvest was poor that year.", "Ships waited in the harbour.")


def _name(rng: random.Random) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize() for _ in range(2))


def _code(rng: random.Random) -> str:
    return str(rng.randrange(1000, 10000))


def mdqa_example(rng: random.Random, k: int, gold: int) -> dict:
    """One question with ``k`` passages, the answer in passage ``gold`` (0-based)."""
    names = set()
    while len(names) < k:
        names.add(_name(rng))
    names = list(names)
    codes = [_code(rng) for _ in names]
    asked = names[gold]
    ctxs = []
    for i, (name, code) in enumerate(zip(names, codes, strict=True)):
        text = f"{rng.choice(_FILLER)} The code of {name} is {code}. {rng.choice(_FILLER)}"
        ctxs.append({"title": name, "text": text, "isgold": i == gold})
    return {"question": f"What is the code of {asked}?", "answers": [codes[gold]], "ctxs": ctxs}


def write_mdqa(out: Path, ks: tuple[int, ...] = (3, 5), examples: int = 20, seed: int = 0,
               positions: str = "ends_and_middle") -> list[Path]:
    """Files ``nq-open-{k}_total_documents_gold_at_{i}.jsonl.gz`` in ``out``: gold at the first, middle and last
    passage (``positions`` "all": every position)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in ks:
        golds = range(k) if positions == "all" else sorted({0, (k - 1) // 2, k - 1})
        for i in golds:
            rng = random.Random(f"{seed}-{k}-{i}")
            path = out / f"nq-open-{k}_total_documents_gold_at_{i}.jsonl.gz"
            with gzip.open(path, "wt", encoding="utf-8") as f:
                for _ in range(examples):
                    f.write(json.dumps(mdqa_example(rng, k, i)) + "\n")
            paths.append(path)
    return paths


def mdqa_training_records(n: int, ks: tuple[int, ...] = (3, 5), seed: int = 1) -> list[dict]:
    """Training examples in the same layout, the gold passage at a random position (other names and codes than
    the evaluation files, which use other seeds)."""
    rng = random.Random(f"train-{seed}")
    return [mdqa_example(rng, k, rng.randrange(k)) for k in (rng.choice(ks) for _ in range(n))]


def write_summaries(path: Path, examples: int = 20, sentences: int = 6, seed: int = 0) -> Path:
    """Rows ``{"chapter", "summary_text"}``: the summary is the chapter's "In short, ..." sentence."""
    rng = random.Random(f"summ-{seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(examples):
            key = f"In short, {_name(rng)} kept the code {_code(rng)}."
            body = [rng.choice(_FILLER) for _ in range(sentences)]
            body.insert(rng.randrange(sentences + 1), key)
            f.write(json.dumps({"chapter": " ".join(body), "summary_text": key}) + "\n")
    return path
