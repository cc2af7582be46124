"""The built training rows on disk, shared by every training rank, read a batch at a time.

``llmft data build`` writes the packed rows once into ``<out>/rows/``, a flat binary store in the nanoGPT /
Megatron style (raw little-endian arrays plus a JSON index). Training opens the files read-only and reads only the
rows of the batches it serves, with positional reads (``preadv``) straight into the batch's buffer: the kernel's
page cache holds one copy of what the ranks of a node read (clean pages, dropped under memory pressure), and a
rank's own memory holds one batch. This is what memory-mapping buys without its cost: a mapping's resident pages
grow towards the whole file over an epoch of random rows and count in every rank's RSS (kernels that map page cache
in large folios map 2 MiB for one row), which is why nanoGPT re-creates its ``np.memmap`` every batch.
Legend: n = rows, s = sequence length, b = micro batch.

=============  ===============================  ==========================================================
file           shape, type                      what
=============  ===============================  ==========================================================
index.json     JSON                             ``{"format": "llmft-rows", "version": 1, "rows": n, "seq_len": s,
                                                "token_dtype": "uint16" | "int32", "mode", "weights": bool,
                                                "weight_mean" (over trained tokens), "real_tokens",
                                                "dropped_tokens", "split_examples", "bytes"}``
tokens.bin     (n, s) uint16 (vocabulary        token ids
               < 65536) or int32
trained.bin    (n, ceil(s / 8)) uint8           bit t of a row (``np.packbits`` order: most significant bit
                                                first) set where token t is trained, i.e. its label is itself
starts.bin     (n, ceil(s / 8)) uint8           bit t set where a segment starts (position id 0): each row's
                                                first token, each isolated example, the padding segment
weight.bin     (n, s) float32                   per-token loss weights (only with the mix's ``reweight``)
=============  ===============================  ==========================================================

What training needs is derived per batch, exactly as the packer laid it out (:mod:`llmft.data.packing`)::

    input_ids    = tokens[rows]                                     (b, s) int64
    labels       = where(trained, input_ids, -100)                  (b, s)
    position_ids = t - (last segment start at or before t)          (b, s)

2.25 bytes per token with a 16-bit vocabulary (4.25 with int32 ids; +4 with weights), against 24 for the three
int64 tensors the rows used to be loaded as: 1.5 B tokens are 3.4 GB on disk, shared by the ranks of a node.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmft.data.packing import IGNORE, PackedRows

if TYPE_CHECKING:  # imported where tensors are made (the build's spills read with read_at, without torch)
    import torch

FORMAT, VERSION = "llmft-rows", 1


def read_at(f, buf: memoryview | np.ndarray, offset: int) -> int:
    """Read into ``buf`` from byte ``offset`` of ``f``, an unbuffered binary file: one positional read (``preadv``,
    where the OS has it: no shared file position, no copy), else seek + readinto. Returns the bytes read (fewer only
    at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [buf], offset)
    f.seek(offset)  # no preadv (Windows, older macOS)
    return f.readinto(buf)


class StoreError(ValueError):
    """A directory that is not a complete row store (missing files, sizes that disagree with the index)."""


class StoreWriter:
    """Append packed rows to a new row store, chunk by chunk, so that a build need not hold all its rows.

    Each file is written under a temporary name and renamed into place by :meth:`close`, ``index.json`` last: a
    store whose index exists is complete. Use as a context manager, or call :meth:`close`; a writer left without
    closing (an error) removes its temporary files.

    Args:
        out: the store directory (created).
        seq_len: tokens per row.
        vocab_size: the tokenizer's vocabulary size: ids are stored as uint16 up to 65536, else int32.
        mode: the packing mode of the rows ("isolated" or "concat").
        weights: whether per-token loss weights are written (a reweighted build).
    """

    def __init__(self, out: Path, seq_len: int, vocab_size: int, mode: str, weights: bool = False):
        self.out, self.seq_len, self.vocab_size, self.mode, self.weights = Path(out), seq_len, vocab_size, mode, weights
        self.token_dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)
        self.out.mkdir(parents=True, exist_ok=True)
        names = ["tokens.bin", "trained.bin", "starts.bin"] + (["weight.bin"] if weights else [])
        self._files = {name: open(self.out / f"{name}.tmp", "wb") for name in names}  # noqa: SIM115 (closed in close)
        self.rows = self.real_tokens = self.dropped_tokens = self.split_examples = 0
        self._weight_sum, self._weight_count = 0.0, 0

    def append(self, rows: PackedRows, weights: torch.Tensor | None = None) -> None:
        """Write ``rows`` (n, s) (and their per-token ``weights`` (n, s)) after the rows written so far.

        Raises:
            ValueError: rows of another length or mode, token ids outside the vocabulary, weights missing, unexpected
                or of another shape than the rows.
            OSError: a write failed (a full disk).
        """
        n, s = rows.input_ids.shape
        if s != self.seq_len or rows.mode != self.mode:
            raise ValueError(f"rows of {s} tokens ({rows.mode}) in a store of {self.seq_len} ({self.mode})")
        if (weights is not None) != self.weights or (weights is not None and tuple(weights.shape) != (n, s)):
            raise ValueError(f"per-token weights {None if weights is None else tuple(weights.shape)} for rows {(n, s)} "
                             f"in a store {'with' if self.weights else 'without'} weights")
        ids = rows.input_ids.numpy()
        if n and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids outside [0, {self.vocab_size}) in the rows; the vocabulary size is wrong")
        self._files["tokens.bin"].write(np.ascontiguousarray(ids.astype(self.token_dtype)).data)
        self._files["trained.bin"].write(np.packbits(rows.labels.numpy() != IGNORE, axis=1).data)  # (n, ceil(s/8))
        self._files["starts.bin"].write(np.packbits(rows.position_ids.numpy() == 0, axis=1).data)
        if weights is not None:
            self._files["weight.bin"].write(np.ascontiguousarray(weights.numpy(), dtype=np.float32).data)
            scored = (rows.labels[:, 1:] != IGNORE) & (weights[:, 1:] > 0)  # (n, s-1): the predicted tokens
            self._weight_sum += float(weights[:, 1:][scored].double().sum())
            self._weight_count += int(scored.sum())
        self.rows += n
        self.real_tokens += rows.real_tokens
        self.dropped_tokens += rows.dropped_tokens
        self.split_examples += rows.split_examples

    def close(self) -> dict:
        """Publish the files and write the index.

        Returns:
            The index written to ``index.json``.

        Raises:
            OSError: a write failed (a full disk).
        """
        sizes = {}
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            sizes[name] = (self.out / f"{name}.tmp").stat().st_size
            os.replace(self.out / f"{name}.tmp", self.out / name)
        self._files = {}
        index = {"format": FORMAT, "version": VERSION, "rows": self.rows, "seq_len": self.seq_len,
                 "token_dtype": self.token_dtype.name, "mode": self.mode, "weights": self.weights,
                 "weight_mean": self._weight_sum / self._weight_count if self._weight_count else None,
                 "real_tokens": self.real_tokens, "dropped_tokens": self.dropped_tokens,
                 "split_examples": self.split_examples, "bytes": sizes}
        (self.out / "index.json.tmp").write_text(json.dumps(index, indent=1))
        os.replace(self.out / "index.json.tmp", self.out / "index.json")
        return index

    def abort(self) -> None:
        """Close and remove the temporary files (after an error)."""
        for name, f in self._files.items():
            f.close()
            (self.out / f"{name}.tmp").unlink(missing_ok=True)
        self._files = {}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.index = self.close()
        else:
            self.abort()


def write_store(rows: PackedRows, out: Path, vocab_size: int, weights: torch.Tensor | None = None) -> dict:
    """Write ``rows`` (and per-token ``weights``) as a row store in the directory ``out``, in one go.

    Returns:
        The index written to ``index.json``.

    Raises:
        ValueError, OSError: as :meth:`StoreWriter.append`.
    """
    with StoreWriter(out, rows.input_ids.shape[1], vocab_size, rows.mode, weights is not None) as writer:
        writer.append(rows, weights)
    return writer.index


class RowStore:
    """A row store opened read-only: nothing is read until a batch asks for its rows, and then only those rows.

    Raises:
        StoreError: (on open) no index, another format or version, or a file whose size disagrees with the index.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise StoreError(
                f"{self.path} is not a row store (no index.json); rebuild the data with `llmft data build`"
            )
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise StoreError(f"{index_path}: format {self.index.get('format')!r} version {self.index.get('version')} "
                             f"is not {FORMAT!r} version {VERSION}; rebuild the data with this llmft")
        n, s = self.index["rows"], self.index["seq_len"]
        self.num_rows, self.seq_len, self.mode = n, s, self.index["mode"]
        packed = (s + 7) // 8
        shapes = {"tokens.bin": (np.dtype(self.index["token_dtype"]), (n, s)), "trained.bin": (np.uint8, (n, packed)),
                  "starts.bin": (np.uint8, (n, packed))}
        if self.index["weights"]:
            shapes["weight.bin"] = (np.float32, (n, s))
        self._files = {}  # name -> (open file, dtype, values per row)
        for name, (dtype, shape) in shapes.items():
            f = self.path / name
            want = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not f.is_file() or f.stat().st_size != want:
                have = f.stat().st_size if f.is_file() else "no file"
                raise StoreError(f"{f}: {have} bytes, the index says {want} ({n} rows x {s}); the store is damaged, "
                                 "rebuild the data with `llmft data build --force`")
            self._files[name] = (open(f, "rb", buffering=0), np.dtype(dtype), shape[1])  # noqa: SIM115 (kept open)

    def _rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        """(b, values per row) of file ``name``: one positional read per row into the result's buffer.

        Raises:
            IndexError: a row index outside [0, n).
            StoreError: a read came back short (the file shrank since it was opened).
        """
        f, dtype, width = self._files[name]
        out = np.empty((len(idx), width), dtype)
        row_bytes = width * dtype.itemsize
        raw = out.view(np.uint8).reshape(len(idx), row_bytes)
        for k, r in enumerate(idx.tolist()):
            if not 0 <= r < self.num_rows:
                raise IndexError(f"row {r} of a store of {self.num_rows} rows")
            got = read_at(f, raw[k], r * row_bytes)
            if got != row_bytes:
                raise StoreError(f"{self.path / name}: row {r} read {got} of {row_bytes} bytes; the file changed "
                                 "while training read it. Rebuild the data with `llmft data build --force`")
        return out

    def __len__(self) -> int:
        return self.num_rows

    @property
    def has_weights(self) -> bool:
        return "weight.bin" in self._files

    @property
    def efficiency(self) -> float:
        """Non-pad tokens / token slots."""
        return self.index["real_tokens"] / max(1, self.num_rows * self.seq_len)

    @property
    def dropped_tokens(self) -> int:
        return self.index["dropped_tokens"]

    @property
    def split_examples(self) -> int:
        return self.index["split_examples"]

    def batch(self, idx: torch.Tensor | np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """input_ids, labels, position_ids (and weight, when stored) of rows ``idx``, each (b, s); reads only them.

        Args:
            idx: row indices, in the order wanted.

        Raises:
            IndexError, StoreError: as :meth:`_rows`.
        """
        import torch

        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        ids = torch.from_numpy(self._rows("tokens.bin", idx).astype(np.int64))  # (b, s)
        s = self.seq_len
        trained = torch.from_numpy(np.unpackbits(self._rows("trained.bin", idx), axis=1, count=s).astype(bool))
        starts = np.unpackbits(self._rows("starts.bin", idx), axis=1, count=s).astype(bool)  # (b, s)
        t = np.arange(s)
        last_start = np.maximum.accumulate(np.where(starts, t, 0), axis=1)  # (b, s): index of the segment's start
        batch = {"input_ids": ids, "labels": torch.where(trained, ids, IGNORE),
                 "position_ids": torch.from_numpy(t - last_start)}
        if self.has_weights:
            batch["weight"] = torch.from_numpy(self._rows("weight.bin", idx))
        return batch

    def materialize(self) -> tuple[PackedRows, torch.Tensor | None]:
        """Every row in memory as :class:`PackedRows` (and the weights): for inspection and tests on small data;
        training reads batches."""
        full = self.batch(np.arange(self.num_rows))
        rows = PackedRows(full["input_ids"], full["labels"], full["position_ids"], self.mode, self.index["real_tokens"],
                          self.index["dropped_tokens"], self.index["split_examples"])
        return rows, full.get("weight")


def describe_rows(rows, tokenizer, n: int, chars: int) -> list[str]:
    """The first ``n`` rows decoded, one block per row, with each segment's span and trained-token count marked and
    its text cut to ``chars`` characters (``llmft data inspect``)."""
    import torch

    blocks = []
    for r in range(min(n, len(rows))):
        row = rows.batch([r])
        pos, ids_row, labels_row = row["position_ids"][0], row["input_ids"][0], row["labels"][0]
        # a segment starts where position ids restart (isolated) or at a BOS token (a document, in concat rows)
        is_start = (pos == 0) | (ids_row == tokenizer.bos_token_id if tokenizer.bos_token_id is not None else False)
        starts = torch.nonzero(is_start).flatten().tolist() + [len(pos)]
        pieces = []
        for a, b in zip(starts[:-1], starts[1:]):
            ids, labels = ids_row[a:b], labels_row[a:b]
            trained = tokenizer.decode(ids[labels != IGNORE])
            pieces.append(f"<<segment {a}:{b}, {int((labels != IGNORE).sum())} tokens trained>> "
                          + tokenizer.decode(ids)[:chars] + ("" if len(trained) else " <<context only>>"))
        blocks.append(f"===== row {r} ({rows.mode}) =====\n" + "\n".join(pieces))
    return blocks
