"""The memory-mapped row store of a data build (llmft/data/store.py) and how a build publishes it.

Round trip: what training reads back equals what the packer produced, token for token (labels and position ids derived
per batch), in uint16 and int32, with and without weights. The loader serves the same batches from the store as from
rows in memory, per rank, across a resume. Serving batches reads only their rows: bytes read and resident memory
(/proc/self/io, /proc/self/status) grow by the batches, not the file. A damaged or old-format store is a clear error; a
build that fails while writing leaves the previous build loadable and unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

from llmft.cli import main
from llmft.config.data import load_mix
from llmft.data.build import build, load_built
from llmft.data.loader import PackedLoader
from llmft.data.packing import Example, PackedRows, pack_concat, pack_isolated
from llmft.data.sources import DataError
from llmft.data.store import RowStore, StoreError, StoreWriter, write_store

TOKENIZER = "llmft/assets/tiny-llama"


def examples(vocab: int, count: int = 300, seed: int = 0) -> list[Example]:
    """Random examples of 1..60 tokens with a random loss mask (prompt tokens untrained)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in rng.integers(1, 60, count):
        mask = np.ones(n, dtype=bool)
        mask[: rng.integers(0, n)] = False  # a prompt of 0..n-1 tokens
        out.append(Example(rng.integers(0, vocab, n).astype(np.int64), mask))
    return out


@pytest.mark.parametrize("mode", ["isolated", "concat"])
@pytest.mark.parametrize("vocab", [1000, 70_000])
def test_round_trip_equals_the_packed_rows(tmp_path, mode, vocab):
    ex = examples(vocab)
    rows = pack_isolated(ex, 37, pad_id=vocab - 1) if mode == "isolated" else pack_concat(ex, 37)  # s % 8 != 0
    weights = torch.rand(rows.input_ids.shape) * (rows.labels != -100)
    index = write_store(rows, tmp_path / "rows", vocab, weights)
    assert index["token_dtype"] == ("uint16" if vocab <= 65536 else "int32")
    assert (tmp_path / "rows" / "tokens.bin").stat().st_size == rows.input_ids.numel() * (2 if vocab <= 65536 else 4)
    assert (tmp_path / "rows" / "starts.bin").stat().st_size == len(rows) * 5  # ceil(37 / 8) bytes per row
    store = RowStore(tmp_path / "rows")
    back, w = store.materialize()
    for name in ("input_ids", "labels", "position_ids"):
        assert torch.equal(getattr(back, name), getattr(rows, name)), name
    assert torch.equal(w, weights)
    assert (back.mode, back.real_tokens, back.dropped_tokens, back.split_examples) == \
        (rows.mode, rows.real_tokens, rows.dropped_tokens, rows.split_examples)
    assert store.efficiency == rows.efficiency
    some = torch.tensor([5, 0, 17, 5])  # any order, repeats allowed
    got = store.batch(some)
    assert torch.equal(got["labels"], rows.labels[some]) and torch.equal(got["position_ids"], rows.position_ids[some])
    assert torch.equal(got["weight"], weights[some])


def test_appending_chunks_writes_the_same_store_as_one_write(tmp_path):
    rows = pack_isolated(examples(1000), 40, pad_id=0)
    weights = torch.rand(rows.input_ids.shape) * (rows.labels != -100)
    whole = write_store(rows, tmp_path / "whole", 1000, weights)
    cut = len(rows) // 3
    with StoreWriter(tmp_path / "chunks", 40, 1000, "isolated", weights=True) as writer:
        for part in (slice(0, cut), slice(cut, None)):
            chunk = PackedRows(rows.input_ids[part], rows.labels[part], rows.position_ids[part], "isolated", 0, 0, 0)
            writer.append(chunk, weights[part])
    for name in ("tokens.bin", "trained.bin", "starts.bin", "weight.bin"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "chunks" / name).read_bytes(), name
    assert writer.index["rows"] == whole["rows"] and writer.index["weight_mean"] == pytest.approx(whole["weight_mean"])
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == sorted([*whole["bytes"], "index.json"])
    with pytest.raises(ValueError, match="rows of 16 tokens"), StoreWriter(tmp_path / "bad", 40, 1000, "concat") as w:
        w.append(pack_concat(examples(1000), 16))
    assert not (tmp_path / "bad" / "index.json").exists() and not list((tmp_path / "bad").glob("*.tmp"))


def test_write_refuses_ids_outside_the_vocabulary(tmp_path):
    rows = pack_concat(examples(1000), 16)
    with pytest.raises(ValueError, match="outside"):
        write_store(rows, tmp_path / "rows", 500)


def test_loader_serves_the_same_batches_from_the_store_per_rank_and_across_resume(tmp_path):
    rows = pack_isolated(examples(1000, count=600), 32, pad_id=0)
    write_store(rows, tmp_path / "rows", 1000)
    store = RowStore(tmp_path / "rows")
    for rank in range(2):
        mem = PackedLoader(rows, 3, seed=7, rank=rank, world_size=2)
        mapped = PackedLoader(store, 3, seed=7, rank=rank, world_size=2)
        for _ in range(mem.batches_per_epoch + 2):  # into the second epoch
            a, b = mem.next_batch(), mapped.next_batch()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        resumed = PackedLoader(RowStore(tmp_path / "rows"), 3, seed=7, rank=rank, world_size=2)
        resumed.load_state_dict(mapped.state_dict())
        a, b = mem.next_batch(), resumed.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a)


def _proc(file: str, key: str) -> int:
    """A counter of this process from /proc/self/<file> (``rchar`` in io: bytes read by syscalls, page cache
    included; ``VmRSS`` in status: resident KiB, file mappings included)."""
    line = next(x for x in Path(f"/proc/self/{file}").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc")
def test_serving_batches_reads_only_their_rows(tmp_path):
    """1024 rows of 8192 tokens (16 MiB of ids): serving 20 batches of 2 rows reads 40 rows, and resident memory
    grows by about a batch, whether the store reads its files or maps them."""
    n, s = 1024, 8192
    ids = torch.arange(n * s, dtype=torch.int64).remainder_(60000).view(n, s)
    rows = PackedRows(ids, ids.clone(), torch.arange(s).expand(n, s).contiguous(), "concat", n * s, 0, 0)
    write_store(rows, tmp_path / "rows", 65536)
    del rows, ids
    file_bytes = (tmp_path / "rows" / "tokens.bin").stat().st_size
    loader = PackedLoader(RowStore(tmp_path / "rows"), 2, seed=0)
    loader.next_batch()  # first-use allocations
    read0, rss0 = _proc("io", "rchar"), _proc("status", "VmRSS")
    for _ in range(20):
        batch = loader.next_batch()
        assert batch["input_ids"].shape == (2, s)
    read, grown = _proc("io", "rchar") - read0, (_proc("status", "VmRSS") - rss0) * 1024
    row_bytes = s * 2 + 2 * s // 8  # ids + trained and start bits
    assert read <= 40 * row_bytes + 64 * 1024, read
    assert grown < file_bytes // 4, grown  # not the file (16 MiB)


def test_damaged_or_old_stores_are_clear_errors(tmp_path, capsys):
    rows = pack_concat(examples(1000), 16)
    write_store(rows, tmp_path / "rows", 1000)
    with open(tmp_path / "rows" / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match=r"tokens.bin: 100 bytes, the index says .*damaged"):
        RowStore(tmp_path / "rows")
    index = json.loads((tmp_path / "rows" / "index.json").read_text())
    (tmp_path / "rows" / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(StoreError, match="version 99"):
        RowStore(tmp_path / "rows")
    # a build directory from before the row store
    old = tmp_path / "old"
    old.mkdir()
    (old / "stats.json").write_text(json.dumps({"seq_len": 16, "packing": {"rows": 1}}))
    (old / "train-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="older llmft"):
        load_built(old)
    assert main(["data", "inspect", str(old)]) == 2
    assert "older llmft" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO / TOKENIZER))


def _mix(tmp_path: Path, book_text: str, docs: int) -> Path:
    words = book_text.split()
    texts = [" ".join(words[i : i + 120]) for i in range(0, 120 * docs, 120)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    mix = {"seq_len": 128, "seed": 0, "packing": "isolated",
           "sources": [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    return tmp_path / "mix.yaml"


def test_a_build_that_fails_while_writing_keeps_the_previous_build(tmp_path, book_text, tok, monkeypatch, capsys):
    out = tmp_path / "out"
    first = build(load_mix(_mix(tmp_path, book_text, 30)), out, tok, 128)
    assert first.stats["packing"]["store_bytes"]["tokens.bin"] == len(first.rows) * 128 * 2
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert Path("rows/tokens.bin") in before and Path("stats.json") in before

    import llmft.data.build.pipeline as build_module

    class FillsTheDisk(StoreWriter):  # the store is written in full, then the next write fails
        def close(self) -> dict:
            super().close()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(build_module, "StoreWriter", FillsTheDisk)
    with pytest.raises(DataError, match=r"No space left on device.*previous build in .* is untouched"):
        build(load_mix(_mix(tmp_path, book_text, 40)), out, tok, 128)  # a changed input: a real rebuild
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # nothing staged is left, nothing published
    again = load_built(out)
    assert torch.equal(again.rows.materialize()[0].input_ids, first.rows.materialize()[0].input_ids)

    monkeypatch.setattr(build_module, "StoreWriter", StoreWriter)
    second = build(load_mix(tmp_path / "mix.yaml"), out, tok, 128)
    assert not second.cached and len(second.rows) > len(first.rows)
    assert sorted(p.name for p in out.iterdir()) == sorted(["rows", "validation.parquet", "stats.json", "mix.png",
                                                            "length_histogram.png"])
    assert main(["data", "inspect", str(out), "--rows", "1"]) == 0
    shown = capsys.readouterr().out
    assert "===== row 0 (isolated) =====" in shown and "tokens trained>>" in shown
