"""Data sources -> tokenized examples, with a held-out tail of each source for validation.

Each document (:mod:`llmft.data.sources`) becomes one :class:`~llmft.data.packing.Example`,
``[BOS] prompt text [EOS]``, trained on ``text [EOS]`` (plain text has no prompt, so every token is trained);
:mod:`llmft.data.packing` then lays the examples out in rows (``data.packing``: concat or isolated) and
:mod:`llmft.data.loader` serves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from transformers import PreTrainedTokenizerBase

from llmft.config import DataConfig
from llmft.data.packing import Example, special_ids
from llmft.data.sources import SourceError, SourceReport, SourceSpec, read_source


class DataError(Exception):
    """Bad input data under ``on_error: stop``, or no usable data (message names file and line)."""


@dataclass
class DataReport:
    """Documents read and malformed records met, over all sources (first examples as "file:line: reason")."""

    documents: int = 0
    bad_records: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, source: SourceReport) -> None:
        self.documents += source.documents
        self.bad_records += source.bad_records
        self.examples += source.examples[: max(0, 20 - len(self.examples))]


def tokenize_source(spec: SourceSpec, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                    report: DataReport) -> list[Example]:
    """Every document of one source as an Example ``[BOS] prompt text [EOS]``, trained on ``text [EOS]``.

    Raises:
        DataError: a malformed record under ``on_error: stop`` (names file and line).
    """
    bos, eos = special_ids(tokenizer, cfg.add_eos)
    out, source_report = [], SourceReport()
    try:
        for doc in read_source(spec, cfg.on_error, source_report):
            prompt = tokenizer(doc.prompt, add_special_tokens=False)["input_ids"] if doc.prompt else []
            text = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            out.append(Example.from_parts(bos, prompt, text, eos))
    except SourceError as e:
        raise DataError(str(e)) from None
    finally:
        report.add(source_report)
    return out


def split_tail(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Hold out the last ``fraction`` of the tokens; the example at the cut is split in two."""
    total = sum(len(e) for e in examples)
    keep = total - int(total * fraction)
    head, tail, seen = [], [], 0
    for e in examples:
        if seen + len(e) <= keep:
            head.append(e)
        elif seen >= keep:
            tail.append(e)
        else:
            k = keep - seen
            head.append(Example(e.tokens[:k], e.loss_mask[:k]))
            tail.append(Example(e.tokens[k:], e.loss_mask[k:]))
        seen += len(e)
    return head, tail


def load_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[list[Example], np.ndarray, DataReport]:
    """Tokenize the training and validation text.

    The last ``validation_fraction`` of each *source*'s tokens (all of its files, in reading order) is held out
    and joined with the ``validation`` sources into one validation token stream.

    Returns:
        (training examples, validation tokens, report)

    Raises:
        DataError: malformed data under ``on_error: stop``, or no training tokens at all.
    """
    report = DataReport()
    train: list[Example] = []
    val: list[Example] = []
    for src in cfg.sources:
        head, tail = split_tail(tokenize_source(src, tokenizer, cfg, report), cfg.validation_fraction)
        train += head
        val += tail
    for src in cfg.validation:
        val += tokenize_source(src, tokenizer, cfg, report)
    if not any(len(e) for e in train):
        raise DataError("the training sources contain no usable text")
    val_tokens = np.concatenate([e.tokens for e in val]) if val else np.zeros(0, np.int32)
    return train, val_tokens, report
