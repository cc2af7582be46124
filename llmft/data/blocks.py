"""Local text files -> one token stream -> fixed-length training blocks, in a seeded, resumable order.

Legend: b = micro batch, s = sequence length.

Documents are tokenized without special tokens, wrapped as ``[BOS] doc [EOS]`` and concatenated (attention
crosses document boundaries, as in Together's long-context pre-training). The stream is cut into blocks of
``s`` tokens; the tail shorter than ``s`` is reported, not used. Every batch is a dict::

    input_ids     (b, s)  int64
    labels        (b, s)  int64   = input_ids (the model shifts them)
    position_ids  (b, s)  int64   0 .. s-1

The data recipes / packing system yields the same dict, so it drops into the training loop unchanged.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from llmft.config import DataConfig, DataSource

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
                    report: DataReport) -> np.ndarray:
    """All documents of one file as one int32 token stream, each ``[BOS] doc [EOS]``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    pieces = []
    for doc in read_documents(source, cfg.on_error, report):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        pieces.append(np.asarray(bos + ids + eos, dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def load_token_streams(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray, DataReport]:
    """Tokenize the training and validation text.

    The last ``validation_fraction`` of each training file's tokens is held out and joined with the
    ``validation`` files.

    Returns:
        (train tokens, validation tokens, report)

    Raises:
        DataError: malformed data under ``on_error: stop``, or no training tokens at all.
    """
    report = DataReport()
    train, val = [], []
    for src in cfg.sources:
        tokens = tokenize_source(src, tokenizer, cfg, report)
        cut = len(tokens) - int(len(tokens) * cfg.validation_fraction)
        train.append(tokens[:cut])
        val.append(tokens[cut:])
    for src in cfg.validation:
        val.append(tokenize_source(src, tokenizer, cfg, report))
    train_tokens = np.concatenate(train)
    if len(train_tokens) == 0:
        raise DataError("the training sources contain no usable text")
    return train_tokens, np.concatenate(val) if val else np.zeros(0, np.int32), report


class TokenBlocks:
    """Fixed-length blocks of a token stream, served in a seeded order that can be saved and resumed.

    Each epoch visits every block once in a fresh permutation (``seed + epoch``). With several data-parallel
    ranks, rank r takes positions r, r + world, r + 2*world, ... of that permutation, so ranks never share a
    block. The state is (epoch, batches served in the epoch): restoring it continues at the exact next batch.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_blocks = len(tokens) // seq_len
        self.dropped_tokens = len(tokens) - self.num_blocks * seq_len
        self.blocks = torch.from_numpy(tokens[: self.num_blocks * seq_len].astype(np.int64)).view(-1, seq_len)  # (n, s)
        self.batches_per_epoch = self.num_blocks // world_size // micro_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{len(tokens)} training tokens make {self.num_blocks} blocks of {seq_len}: fewer than "
                f"micro_batch_size x ranks = {micro_batch_size * world_size}. Add data or lower model.max_seq_len"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_blocks, generator=g)
        return perm[self.rank :: self.world_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        b = self.micro_batch_size
        idx = self._order[self.cursor * b : (self.cursor + 1) * b]
        self.cursor += 1
        input_ids = self.blocks[idx]  # (b, s)
        position_ids = torch.arange(self.seq_len).expand(b, -1)  # (b, s)
        return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": position_ids.contiguous()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_blocks": self.num_blocks}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`.

        Raises:
            DataError: the data changed since the checkpoint (different block count or seed).
        """
        if state["num_blocks"] != self.num_blocks or state["seed"] != self.seed:
            raise DataError(
                f"the training data changed since the checkpoint ({state['num_blocks']} blocks, seed "
                f"{state['seed']} then; {self.num_blocks} blocks, seed {self.seed} now): resume needs the same "
                "data, or start fresh with --no-resume"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()
