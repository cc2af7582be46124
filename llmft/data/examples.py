"""Local text files -> tokenized examples, with a held-out tail of each file for validation.

Each document becomes one :class:`~llmft.data.packing.Example`, ``[BOS] doc [EOS]``, trained on every token;
:mod:`llmft.data.packing` then lays the examples out in rows (``data.packing``: concat or isolated) and
:mod:`llmft.data.loader` serves them.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from llmft.config import DataConfig, DataSource
from llmft.data.packing import Example

log = logging.getLogger(__name__)


class DataError(Exception):
    """Bad input data under ``on_error: stop`` (message names file and line)."""


@dataclass
class DataReport:
    """What reading the sources found: documents, tokens and malformed records with their locations."""

    documents: int = 0
    bad_records: int = 0
    examples: list[str] = field(default_factory=list)  # first few "file:line: reason"

    def bad(self, where: str, reason: str, on_error: str) -> None:
        self.bad_records += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")
        if on_error == "stop":
            raise DataError(f"{where}: {reason} (data.on_error is 'stop'; set it to 'skip' to skip such records)")
        log.warning("skipping %s: %s", where, reason)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_documents(source: DataSource, on_error: str, report: DataReport) -> Iterator[str]:
    """Yield the documents of one file: a whole text file is one document; jsonl gives one per line.

    Raises:
        DataError: a malformed record when ``on_error == "stop"``.
    """
    path = Path(source.path)
    fmt = source.format
    if fmt == "auto":
        fmt = "jsonl" if any(s in (".jsonl", ".json") for s in path.suffixes) else "text"
    if fmt == "text":
        try:
            with _open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            report.bad(f"{path}", f"not UTF-8 ({e.reason} at byte {e.start})", on_error)
            return
        report.documents += 1
        yield text.lstrip("\ufeff")
        return
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
        for lineno, line in enumerate(stream, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                report.bad(where, "not UTF-8", on_error)
                continue
            except json.JSONDecodeError as e:
                report.bad(where, f"malformed JSON ({e.msg})", on_error)
                continue
            text = record.get(source.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                report.bad(where, f"no string field {source.text_field!r}", on_error)
                continue
            if not text:
                report.bad(where, "empty text", on_error)
                continue
            report.documents += 1
            yield text


def tokenize_source(source: DataSource, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                    report: DataReport) -> list[Example]:
    """Every document of one file as an Example ``[BOS] doc [EOS]`` (all tokens trained on)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    out = []
    for doc in read_documents(source, cfg.on_error, report):
        ids = np.asarray(bos + tokenizer(doc, add_special_tokens=False)["input_ids"] + eos, dtype=np.int32)
        out.append(Example(ids, np.ones(len(ids), dtype=bool)))
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

    The last ``validation_fraction`` of each training file's tokens is held out and joined with the
    ``validation`` files into one validation token stream.

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
