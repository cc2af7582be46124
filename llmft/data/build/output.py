"""A build's output directory: published atomically, its validation tokens in parquet, its plots, and ``load_built``
(the row store, memory-mapped, and the validation tokens)."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmft.data.sources import DataError
from llmft.data.store import RowStore, StoreError


@dataclass
class Built:
    """A built data directory, loaded."""

    rows: RowStore | None  # on disk, read per batch (with per-token weights after reweight); None: load_rows=False
    validation_tokens: np.ndarray | None
    stats: dict
    cached: bool


def _publish(stage: Path, out: Path) -> None:
    """Move a complete build from ``stage`` into ``out``, replacing the previous one.

    ``stats.json``, which marks a build complete, is removed first and put back last, and everything else moves by
    rename on the same file system: an interruption here leaves no loadable build (the next run rebuilds), never old
    rows with new stats.
    """
    (out / "stats.json").unlink(missing_ok=True)
    trash = out / f".old-{os.getpid()}"
    trash.mkdir(exist_ok=True)
    old = [out / "rows", out / "validation.parquet", out / "filters.md", *out.glob("dedup.*"), *out.glob("*.png"),
           *out.glob("train-*.parquet")]  # train-*.parquet: the rows of builds before the row store
    for path in old:
        if path.exists():
            os.replace(path, trash / path.name)
    for path in stage.iterdir():
        if path.name != "stats.json":
            os.replace(path, out / path.name)
    os.replace(stage / "stats.json", out / "stats.json")
    stage.rmdir()
    shutil.rmtree(trash, ignore_errors=True)


def _histogram(lengths: list[int]) -> dict:
    """Document-length counts in power-of-two bins: {"<=64": n, "<=128": n, ...}."""
    if not lengths:
        return {}
    edges = [2**k for k in range(4, max(5, math.ceil(math.log2(max(lengths)))) + 1)]
    counts = np.histogram(lengths, bins=[0, *edges])[0]
    return {f"<={e}": int(c) for e, c in zip(edges, counts)}


def _values(flat: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A flat numpy array as an arrow array of ``dtype`` over the same buffer."""
    flat = np.ascontiguousarray(flat)
    return pa.Array.from_buffers(dtype, len(flat), [None, pa.py_buffer(flat)])


def _offsets(lengths: list[int]) -> pa.Buffer:
    """int32 list/string offsets: 0, then the running sum of ``lengths``."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.py_buffer(offsets)


def _int_lists(parts: list[np.ndarray]) -> pa.ListArray:
    """Variable-length int32 lists."""
    flat = np.concatenate([np.asarray(x, np.int32) for x in parts]) if parts else np.zeros(0, np.int32)
    return pa.Array.from_buffers(pa.list_(pa.int32()), len(parts), [None, _offsets([len(x) for x in parts])],
                                 children=[_values(flat, pa.int32())])


def _strings(items: list[str]) -> pa.StringArray:
    data = [x.encode() for x in items]
    return pa.Array.from_buffers(pa.string(), len(data), [None, _offsets([len(b) for b in data]),
                                                          pa.py_buffer(b"".join(data))])


def _flat_column(path: Path, name: str, dtype: type) -> np.ndarray:
    """The values of a list column of a parquet file, concatenated (no nulls), read without pandas (see above)."""
    values = pq.ParquetFile(path).read(columns=[name]).column(name).combine_chunks().flatten()
    return np.frombuffer(
        values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * np.dtype(dtype).itemsize
    )


def _validation_tokens(out: Path) -> np.ndarray:
    return _flat_column(out / "validation.parquet", "tokens", np.int32).copy()


def load_built(out: Path, cached: bool = False) -> Built:
    """Open a built directory: its row store (nothing read until a batch asks) and its validation tokens.

    Raises:
        DataError: the directory is not a complete build of this llmft's format.
    """
    out = Path(out)
    if not (out / "stats.json").is_file():
        raise DataError(f"{out} is not a built data directory (no stats.json); build it with `llmft data build`")
    stats = json.loads((out / "stats.json").read_text())
    if not (out / "rows").is_dir() and any(out.glob("train-*.parquet")):
        raise DataError(f"{out} was built by an older llmft (parquet rows, not a row store); rebuild it with "
                        "`llmft data build --force`")
    try:
        rows = RowStore(out / "rows")
    except StoreError as e:
        raise DataError(str(e)) from None
    p = stats["packing"]
    if (len(rows), rows.seq_len) != (p["rows"], stats["seq_len"]):
        raise DataError(f"{out}: stats.json lists {p['rows']} rows of {stats['seq_len']} but rows/ holds {len(rows)} "
                        f"of {rows.seq_len}; rebuild it with `llmft data build --force`")
    return Built(rows, _validation_tokens(out), stats, cached)


def _plot(stats: dict, out: Path) -> None:
    """length_histogram.png (documents per length bin, per source) and mix.png (target vs realized shares)."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and half the import time

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    names = list(stats["length_histogram"])
    bins = sorted({b for h in stats["length_histogram"].values() for b in h}, key=lambda b: int(b[2:]))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        h = stats["length_histogram"][name]
        ax.bar([i + k * width for i in range(len(bins))], [h.get(b, 0) for b in bins], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bins))], bins, rotation=45, fontsize=7)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths by source")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "length_histogram.png")

    fig = Figure(figsize=(6, 3.6), dpi=110)
    ax = fig.add_subplot()
    src = stats["sources"]
    xs = np.arange(len(src))
    ax.bar(xs - 0.2, [100 * s["target_share"] for s in src.values()], 0.4, label="target")
    ax.bar(xs + 0.2, [100 * s["realized_share"] for s in src.values()], 0.4, label="realized")
    ax.set_xticks(xs, list(src), fontsize=8)
    ax.set_ylabel("% of training tokens")
    ax.set_title(f"Mix: {stats['total_tokens']:,} tokens, {stats['packing']['mode']} packing "
                 f"({stats['packing']['efficiency']:.1%} full)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mix.png")
