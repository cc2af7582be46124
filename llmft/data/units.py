"""A source's tokenized units on disk while a build selects from them.

The build cuts every document into units of at most ``seq_len`` tokens, then takes each source's share of units
and shuffles the units of all sources together before packing. Holding the units in memory costs about 5 bytes
per token read (int32 ids and a bool loss mask); at Together's scale that is tens of gigabytes. A
:class:`UnitSpill` appends them to two flat files in the build's staging directory instead (token ids as uint16
when the vocabulary allows, else int32; the loss mask one byte per token) and keeps only each unit's offset,
length and reweighting weight in memory: 16 bytes per unit, whatever its length. Units are read back one at a
time with a positional read (:func:`llmft.data.store.read_at`) into fresh arrays, so that a read unit is released
once it is packed (no memory map: mapped pages would count against the build's resident memory, see
:mod:`llmft.data.store`).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmft.data.packing import Example
from llmft.data.store import read_at


@dataclass
class Unit(Example):
    """A chunk of a document, with the document's reweighting weight."""

    weight: float = 1.0


class UnitSpill:
    """Units appended to ``<path>.tokens`` and ``<path>.mask``, read back by index once :meth:`close` is called;
    a context manager that removes the files on exit.

    Args:
        path: the files' common stem, in a directory that exists (the build's staging directory).
        vocab_size: the tokenizer's size; ids are stored as uint16 up to 65,536 ids.

    Raises:
        OSError: the files cannot be created or written (e.g. a full disk).
    """

    def __init__(self, path: Path, vocab_size: int):
        self.path = Path(path)
        self.dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)
        self._tokens = open(self.path.with_suffix(".tokens"), "wb")
        self._mask = open(self.path.with_suffix(".mask"), "wb")
        self.starts = array("q")  # (units,) offset of each unit, in tokens
        self.lengths = array("i")  # (units,)
        self.weights = array("f")  # (units,)
        self.tokens = 0
        self._readers: tuple | None = None  # (tokens, mask) opened for reading by close()

    def __len__(self) -> int:
        return len(self.lengths)

    def append(self, tokens: np.ndarray, loss_mask: np.ndarray, weight: float = 1.0) -> None:
        """Write one unit: ``tokens`` (n,) ids and ``loss_mask`` (n,) bool."""
        self._tokens.write(memoryview(np.ascontiguousarray(tokens, self.dtype)))
        self._mask.write(memoryview(np.ascontiguousarray(loss_mask, np.bool_).view(np.uint8)))
        self.starts.append(self.tokens)
        self.lengths.append(len(tokens))
        self.weights.append(weight)
        self.tokens += len(tokens)

    def set_weights(self, weights: np.ndarray) -> None:
        """Every unit's reweighting weight ((units,), in order): known only once the whole source is read.

        Raises:
            ValueError: not one weight per unit.
        """
        if len(weights) != len(self):
            raise ValueError(f"{len(weights)} weights for {len(self)} units")
        self.weights = array("f")
        self.weights.frombytes(np.ascontiguousarray(weights, np.float32).tobytes())

    def close(self) -> None:
        """Finish writing and open the files for reading."""
        self._tokens.close()
        self._mask.close()
        self._open()

    def seal(self) -> None:
        """Finish writing and write the units' lengths and weights beside the data (``<path>.index.npz``), so
        that another process can :meth:`load` the spill: how the build's engine tasks hand over their output."""
        self._tokens.close()
        self._mask.close()
        np.savez(self.path.with_suffix(".index.npz"), lengths=np.frombuffer(self.lengths, np.int32),
                 weights=np.frombuffer(self.weights, np.float32))

    @classmethod
    def load(cls, path: Path, vocab_size: int) -> UnitSpill:
        """A spill written and :meth:`seal`-ed by another process, opened for reading.

        Raises:
            OSError: its files are missing or unreadable.
        """
        self = cls.__new__(cls)
        self.path = Path(path)
        self.dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)
        self._tokens = self._mask = None
        with np.load(self.path.with_suffix(".index.npz")) as index:
            lengths = index["lengths"]
            self.lengths, self.weights = array("i"), array("f")
            self.lengths.frombytes(lengths.astype(np.int32).tobytes())
            self.weights.frombytes(index["weights"].astype(np.float32).tobytes())
        starts = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        self.starts = array("q")
        self.starts.frombytes(starts.tobytes())
        self.tokens = int(lengths.sum())
        self._open()
        return self

    def _open(self) -> None:
        self._readers = (open(self.path.with_suffix(".tokens"), "rb", buffering=0),  # noqa: SIM115 (kept open)
                         open(self.path.with_suffix(".mask"), "rb", buffering=0))

    def __getitem__(self, i: int) -> Unit:
        """Unit ``i``: (n,) int32 ids, (n,) bool mask, its weight."""
        start, n = self.starts[i], self.lengths[i]
        return Unit(self._read(0, start, n, self.dtype).astype(np.int32),
                    self._read(1, start, n, np.dtype(np.uint8)).view(np.bool_), float(self.weights[i]))

    def tokens_of(self, first: int, last: int) -> np.ndarray:
        """The token ids of units ``first`` to ``last - 1``, concatenated: (tokens,) int32."""
        if first >= last:
            return np.zeros(0, np.int32)
        start = self.starts[first]
        end = self.starts[last - 1] + self.lengths[last - 1]
        return self._read(0, start, end - start, self.dtype).astype(np.int32)

    def _read(self, which: int, start: int, n: int, dtype: np.dtype) -> np.ndarray:
        out = np.empty(n, dtype)
        if read_at(self._readers[which], out.view(np.uint8), start * dtype.itemsize) != out.nbytes:
            raise OSError(f"{self.path}: unit data ends early (the staging directory was changed during the build)")
        return out

    def __enter__(self) -> UnitSpill:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def release(self) -> None:
        """Close the files, keeping them."""
        for f in (self._tokens, self._mask, *(self._readers or ())):
            if f is not None:
                f.close()

    def remove(self) -> None:
        """Close and delete the files."""
        self.release()
        for suffix in (".tokens", ".mask", ".index.npz"):
            self.path.with_suffix(suffix).unlink(missing_ok=True)


class ArraySpill:
    """Variable-length arrays of one dtype appended to a file and read back by index: the per-document data a
    build needs again later but must not hold (a document's dedup shingles, its report excerpt). In memory: one
    8-byte offset per array. A context manager that deletes the file on exit.

    Args:
        path: the file, in a directory that exists (created, truncated).
        dtype: the arrays' dtype.

    Raises:
        OSError: the file cannot be created or written (e.g. a full disk).
    """

    def __init__(self, path: Path, dtype: np.dtype | type):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._out = open(self.path, "wb")  # noqa: SIM115 (kept open until close)
        self._in = None
        self._dirty = False  # written since the last flush
        self.offsets = array("q", [0])  # (arrays + 1,) in items

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def append(self, values: np.ndarray) -> None:
        """Write one array (flattened)."""
        values = np.ascontiguousarray(values, self.dtype).reshape(-1)
        self._out.write(memoryview(values).cast("B"))
        self._dirty = True
        self.offsets.append(self.offsets[-1] + len(values))

    def extend(self, flat: np.ndarray, counts: np.ndarray) -> None:
        """Write ``len(counts)`` arrays given as one flat array and each one's length."""
        flat = np.ascontiguousarray(flat, self.dtype)
        self._out.write(memoryview(flat).cast("B"))
        self._dirty = True
        self.offsets.extend((self.offsets[-1] + np.cumsum(counts, dtype=np.int64)).tolist())

    def lengths(self) -> np.ndarray:
        """(arrays,) int64: the length of every array."""
        return np.diff(np.frombuffer(self.offsets, np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        """Array ``i`` (what was written is flushed first: reads and appends may alternate).

        Raises:
            OSError: the spill file is shorter than what was written to it.
        """
        if self._dirty:
            self._out.flush()
            self._dirty = False
        if self._in is None:
            self._in = open(self.path, "rb", buffering=0)  # noqa: SIM115
        start, end = self.offsets[i], self.offsets[i + 1]
        out = np.empty(end - start, self.dtype)
        if read_at(self._in, out.view(np.uint8), start * self.dtype.itemsize) != out.nbytes:
            raise OSError(f"{self.path}: spilled data ends early (the staging directory was changed during the build)")
        return out

    def span(self, first: int, last: int) -> np.ndarray:
        """Arrays ``first`` to ``last - 1`` concatenated, in one read (their lengths: :meth:`lengths`).

        Raises:
            OSError: the spill file is shorter than what was written to it.
        """
        if self._dirty:
            self._out.flush()
            self._dirty = False
        if self._in is None:
            self._in = open(self.path, "rb", buffering=0)  # noqa: SIM115
        start, end = self.offsets[first], self.offsets[last]
        out = np.empty(end - start, self.dtype)
        if read_at(self._in, out.view(np.uint8), start * self.dtype.itemsize) != out.nbytes:
            raise OSError(f"{self.path}: spilled data ends early (the staging directory was changed during the build)")
        return out

    def __enter__(self) -> ArraySpill:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Close and delete the file."""
        self._out.close()
        if self._in is not None:
            self._in.close()
        self.path.unlink(missing_ok=True)
