"""Transforms applied to documents before packing: UL2 denoising and Natural Instructions few-shot packing.

UL2 (Tay et al. 2022), in its decoder-only form: a document becomes an input (a mode token and the corrupted
text, context only) and a target (trained on). The work is done on the text, so the sentinels are ordinary
text that the tokenizer encodes with tokens it really has. Nothing is added to the vocabulary, and nothing
like ``eos_id - 100 + i`` is used. For ``<extra_id_0>`` a T5-style tokenizer has one token; others spell it
with several real ones::

    R / X (span corruption, mean span mu, corruption rate r):
        prompt  "[NLU] The cat <extra_id_0> on the <extra_id_1>"    (X uses [NLG])
        text    "<extra_id_0> sat <extra_id_1> mat."
    S (prefix LM):
        prompt  "[S2S] The cat sat"
        text    " on the mat."

Spans are whole whitespace-delimited words with their trailing whitespace, so filling each sentinel with
its span restores the original text byte for byte.

NI few-shot packing (Together's instruction data): the instances of one task are packed into one sequence
after a single task header (definition + demonstrations). Each later instance sees the earlier ones as
extra demonstrations, and the loss is on every answer::

    [BOS] Definition ... demos | Input: x1 Output: y1 | Input: x2 Output: y2 | ...   [EOS]
          context               context      trained    context      trained
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from llmft.config.data import UL2Config
from llmft.data.packing import Example, special_ids
from llmft.data.sources import Document

_PIECE = re.compile(r"\S+\s*")  # a word with the whitespace after it


def _segments(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """``total`` split into ``parts`` random positive lengths (T5's random segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def ul2(doc: Document, rng: np.random.Generator, cfg: UL2Config) -> Document:
    """One UL2 denoising example from a document (see module doc). Documents under 2 words are returned as is."""
    pieces = _PIECE.findall(doc.text)
    lead = doc.text[: len(doc.text) - len(doc.text.lstrip())]
    n = len(pieces)
    if n < 2:
        return doc
    weights = np.array([d.weight for d in cfg.denoisers])
    d = cfg.denoisers[rng.choice(len(cfg.denoisers), p=weights / weights.sum())]
    mode = cfg.mode_tokens[d.kind]
    if d.kind == "S":
        cut = int(rng.integers(1, n))
        return Document(text="".join(pieces[cut:]), where=doc.where, meta={**doc.meta, "ul2": "S"},
                        prompt=f"{mode} {lead}{''.join(pieces[:cut])}")
    noise = min(n - 1, max(1, round(n * d.rate)))
    spans = min(noise, n - noise, max(1, round(noise / d.mean_span)))
    noise_lengths, keep_lengths = _segments(noise, spans, rng), _segments(n - noise, spans, rng)
    inputs, targets, at = [lead], [], 0
    for i, (keep, drop) in enumerate(zip(keep_lengths, noise_lengths)):  # keep, then corrupt, alternately
        sentinel = cfg.sentinel.format(i=i)
        inputs.append("".join(pieces[at : at + keep]) + sentinel + " ")
        targets.append(sentinel + " " + "".join(pieces[at + keep : at + keep + drop]))
        at += keep + drop
    return Document(
        text="".join(targets),
        where=doc.where,
        meta={**doc.meta, "ul2": f"{d.kind}{d.mean_span:g}/{d.rate:g}"},
        prompt=f"{mode} {''.join(inputs)}",
    )


def ul2_reconstruct(doc: Document, cfg: UL2Config) -> str:
    """The original text from a UL2 example: fill each sentinel of the input with its span from the target."""
    kind = next(k for k, m in cfg.mode_tokens.items() if doc.prompt.startswith(m + " "))
    body = doc.prompt[len(cfg.mode_tokens[kind]) + 1 :]
    if kind == "S":
        return body + doc.text
    count = 0
    while cfg.sentinel.format(i=count) + " " in doc.text:
        count += 1
    marks = re.compile("|".join(re.escape(cfg.sentinel.format(i=i) + " ") for i in range(count)))
    kept, spans = marks.split(body), marks.split(doc.text)[1:]  # count + 1 kept parts, count spans
    return "".join(k + s for k, s in zip(kept, [*spans, ""]))


def ni_fewshot(docs: Iterable[Document], tokenizer, seq_len: int, add_eos: bool = True) -> list[Example]:
    """Pack the instances of each NI task into sequences of at most ``seq_len`` tokens after one header.

    Args:
        docs: Documents from the natural_instructions source (their meta carries ni_head and ni_query).
        tokenizer: the tokenizer.
        seq_len: the row length; a sequence is closed before an instance that would not fit.
        add_eos: end each sequence with EOS.

    Returns:
        One Example per sequence: header and queries are context, answers (and their separators) trained.
    """
    bos, eos = special_ids(tokenizer, add_eos)

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out: list[Example] = []
    ids: list[int] = []
    mask: list[bool] = []
    task = None

    def close():
        if ids and any(mask):
            out.append(Example(np.asarray(ids + eos, np.int32), np.asarray(mask + [True] * len(eos), bool)))

    def start(doc: Document) -> tuple[list[int], list[bool]]:  # a new sequence: BOS and the task header
        head = bos + enc(doc.meta["ni_head"])
        return list(head), [False] * len(head)

    for doc in docs:
        if doc.meta.get("task") != task or not ids:
            close()
            task = doc.meta.get("task")
            ids, mask = start(doc)
        query, answer = enc(doc.meta["ni_query"]), enc(doc.text + "\n\n")
        if len(ids) + len(query) + len(answer) + len(eos) > seq_len and any(mask):
            close()
            ids, mask = start(doc)
        ids += query + answer
        mask += [False] * len(query) + [True] * len(answer)
    close()
    return out
