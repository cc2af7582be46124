"""Synthetic data in public formats: stand-ins for the two applications (`llmft repro mdqa`, the tests) and the
retrieval tasks that teach a small model to look things up in its context (`llmft repro pi`).

- Multi-document QA: each question asks for one made-up fact ("the code of Orlan Vess"); k passages each state
  such a fact about a different name, exactly one (the gold passage, at a chosen position) about the asked name.
  Written as ``nq-open-{k}_total_documents_gold_at_{i}.jsonl.gz`` with ``question``, ``answers`` and ``ctxs``
  (``title``, ``text``, ``isgold``), the layout of the "Lost in the Middle" release, so the same loader and
  metric run on both.
- Summarization: a "chapter" of sentences in which one is marked as the point of it ("In short, ..."); the summary
  is that sentence. Rows ``{"chapter", "summary_text"}`` as in BookSum.
- Retrieval (:func:`retrieval_records`): prompt/completion pairs of a given token length in three shapes: the
  passkey prompt of llmft/eval/passkey.py, RULER's single needle in noise (niah_single_1's template), and a list of
  name: number pairs of which one is asked. Trained either on the answer only (``prompt_completion``) or, for
  pre-training, as whole documents (:func:`write_retrieval` with ``whole=True``): a model trained only on answers
  of prompts it cannot yet read learns the answers' format, not the lookup.
- Copying (:func:`copy_records`): a segment of random words and numbers repeated, optionally with book text between
  the repeats. Predicting the second copy needs attention to the first one (an induction head); a small model that
  never sees such text does not learn to look back, and then no retrieval task can be learned on top.
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
    names: list[str] = []  # in the order drawn: a set's order changes with the process's string hashing
    while len(names) < k:
        if (name := _name(rng)) not in names:
            names.append(name)
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


RETRIEVAL_KINDS = ("passkey", "niah", "kv")
KV_HEAD = "Remember the number of each name in this list."


def _kv_text(rng: random.Random, pairs: int, key) -> tuple[str, str]:
    names: dict[str, str] = {}
    while len(names) < pairs:
        names[key(rng)] = str(rng.randint(10**6, 10**7 - 1))
    asked = rng.choice(list(names))
    lines = "\n".join(f"{n}: {v}" for n, v in names.items())
    return f"{KV_HEAD}\n{lines}\nWhat is the number of {asked}? The number of {asked} is", names[asked]


def retrieval_records(tokenizer, count: int, min_len: int, max_len: int, seed: int = 0,
                      kinds: tuple[str, ...] = RETRIEVAL_KINDS, avoid: frozenset[str] = frozenset()) -> list[dict]:
    """``count`` retrieval examples ``{"prompt", "completion", "kind", "tokens"}``, kinds in turn, each prompt
    about a uniform random length in [min_len, max_len] tokens (at most ``max_len`` with the completion, at least
    the smallest prompt of its kind) with the answer at a uniform random place.

    ``avoid``: answers never used (e.g. the keys an evaluation draws), so nothing is learned by heart.

    Raises:
        ValueError: an unknown kind, or ``max_len`` too short for the smallest prompt of a kind.
    """
    from llmft.eval.passkey import KEY_HIGH, KEY_LOW, passkey_prompt, prompt_text
    from llmft.eval.ruler_tasks import TASKS, gen_niah, haystack_words

    bad = [k for k in kinds if k not in RETRIEVAL_KINDS]
    if bad:
        raise ValueError(f"retrieval kinds {bad}; expected some of {RETRIEVAL_KINDS}")
    rng = random.Random(f"retrieval-{seed}")
    niah_args = TASKS["niah_single_1"].args
    count_tokens = lambda text: len(tokenizer(text).input_ids)  # noqa: E731

    def niah(n: int, r: random.Random) -> tuple[str, str]:
        text, (value,) = gen_niah(niah_args, n, r, [])
        return text, value

    def kv(n: int, r: random.Random) -> tuple[str, str]:
        return _kv_text(r, n, haystack_words().key)

    # tokens of the fixed part and per haystack unit, from two sizes (noise lines and pairs cost about the same each)
    rates = {}
    for name, make in (("niah", niah), ("kv", kv)):
        lo, hi = (count_tokens(make(n, random.Random(0))[0]) for n in (2, 12))
        rates[name] = (lo - 2 * (hi - lo) / 10, (hi - lo) / 10)
    answer_tokens = {"passkey": 4, "niah": 5, "kv": 5}  # room for " 1234567." beyond the prompt, roughly
    smallest = {"passkey": count_tokens(prompt_text(KEY_HIGH, 0, 0.0)[0]),
                "niah": count_tokens(niah(1, random.Random(0))[0]), "kv": count_tokens(kv(2, random.Random(0))[0])}
    for kind in kinds:
        if smallest[kind] + answer_tokens[kind] + 2 > max_len:
            raise ValueError(f"retrieval {kind}: {max_len} tokens cannot hold the smallest prompt "
                             f"({smallest[kind]} tokens and the answer)")
    out = []
    while len(out) < count:
        kind = kinds[len(out) % len(kinds)]
        target = max(rng.randint(min_len, max_len) - answer_tokens[kind] - 2, smallest[kind])
        if kind == "passkey":
            key = rng.randint(KEY_LOW, KEY_HIGH)
            if str(key) in avoid:
                continue
            p = passkey_prompt(tokenizer, target, rng.random(), key=key)
            prompt, answer = p.text, str(key)
        else:
            base, per = rates[kind]
            n = max(int((target - base) / per), 1 if kind == "niah" else 2)
            prompt, answer = (niah if kind == "niah" else kv)(n, rng)
            if answer in avoid:
                continue
            while n > (1 if kind == "niah" else 2) and count_tokens(prompt) > target:
                n -= 1
                prompt, answer = (niah if kind == "niah" else kv)(n, rng)
        tokens = count_tokens(prompt)
        out.append({"prompt": prompt, "completion": f" {answer}.", "kind": kind, "tokens": tokens})
    return out


def write_retrieval(path: Path, records: list[dict], whole: bool = False) -> Path:
    """Records as prompt/completion jsonl (the ``prompt_completion`` source format), or with ``whole`` as
    ``{"text": prompt + completion}`` documents (the ``jsonl`` format: every token trained)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            row = {"text": r["prompt"] + r["completion"]} if whole else {"prompt": r["prompt"],
                                                                         "completion": r["completion"]}
            f.write(json.dumps(row) + "\n")
    return path


def vocabulary_words(tokenizer, min_chars: int = 2) -> list[str]:
    """The whole words of ``tokenizer``'s vocabulary that are one token with their leading space (BPE's ``Ġ``,
    SentencePiece's ``▁``) and at least ``min_chars`` letters, sorted: copy segments made of them cost one token an
    item, so a segment's length in tokens is known.

    Raises:
        ValueError: the vocabulary has fewer than 50 such words.
    """
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t[:1] in ("Ġ", "▁") and t[1:].isalpha()
                    and t[1:].isascii() and len(t) > min_chars})
    if len(words) < 50:
        raise ValueError(f"the tokenizer's vocabulary has {len(words)} single-token words of {min_chars}+ letters; "
                         "copy segments need at least 50")
    return words


COPY_NUMBERS = (100, 9_999_999)


def copy_records(words: list[str], count: int, seed: int = 0, items: tuple[int, int] = (4, 12), repeats: int = 4,
                 number_share: float = 0.4, numbers: tuple[int, int] = COPY_NUMBERS, gap: list[str] | None = None,
                 gap_words: tuple[int, int] = (0, 600)) -> list[dict]:
    """``count`` documents ``{"text"}`` teaching a model to copy what came before: a segment of ``items`` random
    items (words from ``words``, or with probability ``number_share`` a number drawn uniformly from ``numbers``)
    repeated ``repeats`` times, one copy a line.

    The default numbers are mostly 7 digits long (90% of 100..9,999,999): copying a long digit string with repeated
    digits needs more than the previous token to find the place (after "8 7 1 6", which "6" comes next?), which is
    what a passkey asks. Measured on the PI repro's base (C = 128, 2500 steps): passkey 95% at C with these, 35%
    with the digit count drawn uniformly from 3..7 (and 3+ letter words).

    With ``gap`` (words of a book), a long-range copy: the segment, then a random run of ``gap_words`` consecutive
    book words, then the segment ``repeats - 1`` more times; the second copy must be found far back.

    Raises:
        ValueError: ``repeats`` < 2, an empty or inverted range, or ``gap`` shorter than ``gap_words``' maximum.
    """
    if (repeats < 2 or not 1 <= items[0] <= items[1] or not 0 <= gap_words[0] <= gap_words[1]
            or not 0 <= numbers[0] <= numbers[1]):
        raise ValueError(f"copy_records: repeats {repeats} (>= 2), items {items} and gap_words {gap_words} "
                         f"(1 <= low <= high) and numbers {numbers} (0 <= low <= high) are required")
    if gap is not None and len(gap) <= gap_words[1]:
        raise ValueError(f"copy_records: the gap text has {len(gap)} words, fewer than gap_words' {gap_words[1]}")
    rng = random.Random(f"copy-{seed}")
    out = []
    for _ in range(count):
        segment = " ".join(str(rng.randint(*numbers)) if rng.random() < number_share else rng.choice(words)
                           for _ in range(rng.randint(*items)))
        if gap is None:
            out.append({"text": "\n".join([segment] * repeats)})
            continue
        n = rng.randint(*gap_words)
        start = rng.randrange(len(gap) - n + 1)
        middle = " ".join(gap[start : start + n])
        out.append({"text": "\n".join([segment, middle, *[segment] * (repeats - 1)])})
    return out


def write_texts(path: Path, records: list[dict]) -> Path:
    """``{"text"}`` records as jsonl (the ``jsonl`` source format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": r["text"]}) + "\n")
    return path
