"""Dedup and filters without the texts in memory: dedup keeps per-document features (signatures, hashes,
offsets) and reads the sources twice; filters score batches as they are read. So a mix with dedup or filters is
sampled too: a source much larger than its share is read about as far as its share needs after the duplicates and
filtered documents are taken out (reading on when the first estimate falls short), with every guarantee kept."""

from __future__ import annotations

import json
import logging
import re
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_TOKENIZER, sharded_mix_file
from transformers import AutoTokenizer

from llmft.config.data import Dedup, load_mix
from llmft.data.build import build, load_built
from llmft.data.build.curate import _Dedup
from llmft.data.dedup import DedupIndex, features, minhash_signatures
from llmft.data.dedup.similarity import _same_key_pairs
from llmft.data.sources import DataError
from llmft.data.units import ArraySpill
from llmft.testing.corpora import SHARDS, write_sharded_corpus

DEDUP = {"methods": ["exact", "minhash"], "threshold": 0.8, "shingle_size": 5, "keep": "first"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture
def corpus(tmp_path, book_text) -> dict[str, Path]:
    """``big``: 40 jsonl shards of 8 documents of ~400 words, each tagged ``shard S doc D``; in every shard docs
    4, 5 and 6 are exact copies of docs 0, 2 and 3, and doc 7 a near copy of doc 1 (1 word in 50 changed, tag kept),
    so half the documents are duplicates. ``small``: one file of 16 such documents, no duplicates."""

    def shard(doc, s: int) -> list[str]:
        docs = [doc(f"shard {s} doc {d}") for d in range(4)]
        near = docs[1].split(" ")
        return docs + [docs[0], docs[2], docs[3], " ".join(w + "x" if i % 50 == 49 else w for i, w in enumerate(near))]

    return write_sharded_corpus(tmp_path, book_text, shard)


def tags(built, tok) -> Counter:
    text = tok.decode(built.rows.materialize()[0].input_ids.flatten().tolist())
    return Counter(re.findall(r"shard \d+ doc \d+", text))


def tokens_of(corpus: dict[str, Path], tok, keep=lambda d: True) -> int:
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for f in corpus["big"].iterdir()
               for d, line in enumerate(f.read_text().splitlines()) if keep(d) for t in [json.loads(line)["text"]])


def test_a_deduplicated_share_is_sampled_and_has_no_duplicates(tmp_path, corpus, tok, caplog, monkeypatch):
    """Half of big's documents are copies, so the first scan (the need + 15%) keeps too few tokens: the build
    reads on, decides again over everything scanned, and ends with big's share, no document twice, and about the
    bytes its share needs after dedup. The same rows and stats with 2 worker processes."""
    caplog.set_level(logging.INFO, logger="llmft.data.build")
    monkeypatch.setattr("llmft.data.build.common.TOKENIZE_BATCH", 3)  # many jobs in flight
    path = sharded_mix_file(tmp_path / "mix.yaml", corpus, dedup=DEDUP)
    built = build(load_mix(path), tmp_path / "one", tok, 256)
    big = built.stats["sources"]["big"]
    assert not big["read_whole"] and big["epochs"] <= 1.0
    assert any("kept after dedup: reading on" in r.getMessage() for r in caplog.records)  # the top-up ran
    for st in built.stats["sources"].values():
        assert abs(st["realized_share"] - st["target_share"]) < 0.01, st
    seen = tags(built, tok)
    assert len(seen) >= 10 and max(seen.values()) == 1, seen.most_common(3)  # copies removed, nothing repeated
    dedup = built.stats["dedup"]
    assert dedup["documents"] == sum(st["documents"] for st in built.stats["sources"].values())  # those scanned
    assert dedup["by_source"]["big"]["removed"] == big["deduplicated"]
    # every scanned shard gave its four copies (the scan may end inside a shard)
    assert 4 * (big["files_read"] - 1) <= big["deduplicated"] <= 4 * big["files_read"], big
    assert dedup["exact_duplicates"] >= 3 * (big["files_read"] - 1) and dedup["methods"]["minhash"]["pairs"] >= 1
    # bytes read: what the share needs once half the documents are gone, within the scan margin
    need = 8000 / tokens_of(corpus, tok, keep=lambda d: d < 4)
    assert 0.9 * need < big["read_fraction"] < 1.3 * need + 1 / SHARDS, (need, big)

    monkeypatch.setattr("llmft.data.build.common.TOKENIZE_BATCH", 3)
    two = build(load_mix(path, ["num_proc=2"]), tmp_path / "two", tok, 256)
    for f in ("tokens.bin", "trained.bin", "starts.bin", "index.json"):
        assert (tmp_path / "one" / "rows" / f).read_bytes() == (tmp_path / "two" / "rows" / f).read_bytes(), f
    drop = lambda s: {k: v for k, v in s.items() if k not in ("build_seconds", "dedup", "mix")}  # noqa: E731
    assert drop(built.stats) == drop(two.stats)
    assert {k: v for k, v in dedup.items() if k != "seconds"} == \
        {k: v for k, v in two.stats["dedup"].items() if k != "seconds"}
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert not (tmp_path / "one" / "dedup").exists()  # dedup's spill files went with the staging directory


def test_filters_run_while_reading_and_a_filtered_share_is_sampled(tmp_path, corpus, tok, monkeypatch):
    """A keyword filter removing every "doc 3" (2 in 8, with its copy): big is still read only about as far as its
    share needs after filtering, and the filtered documents and the report's counts are the ones read. (Filtering
    reads one batch ahead: 256 documents or 1 MiB, all of big here; 4 documents for this test.)"""
    monkeypatch.setattr("llmft.data.build.common.FILTER_BATCH", 4)
    path = sharded_mix_file(tmp_path / "mix.yaml", corpus,
                    filters=[{"kind": "keywords", "name": "doc3", "patterns": [r"doc 3 \."], "examples": 2}])
    built = build(load_mix(path), tmp_path / "out", tok, 256)
    big = built.stats["sources"]["big"]
    assert not big["read_whole"]
    seen = tags(built, tok)
    assert seen and not any(t.endswith("doc 3") for t in seen)
    report = built.stats["filters"]
    removed = report["by_filter"]["doc3"]["by_source"]["big"]
    assert big["filtered"] == removed["removed"] == report["by_source"]["big"]["removed"] > 0
    assert removed["documents"] == report["by_source"]["big"]["documents"] == big["documents"]
    assert len(removed["examples"]) == 2 and all("doc 3 ." in e["excerpt"] for e in removed["examples"])
    need = 8000 / tokens_of(corpus, tok, keep=lambda d: d not in (3, 6))
    assert 0.9 * need < big["read_fraction"] < 1.3 * need + 1 / SHARDS, (need, big)


def test_a_file_changed_between_the_two_readings_is_a_clear_error(tmp_path, corpus, tok, monkeypatch):
    path = sharded_mix_file(tmp_path / "mix.yaml", corpus, dedup=DEDUP)
    del_total = yaml.safe_load(path.read_text())
    del del_total["total_tokens"]
    path.write_text(yaml.safe_dump(del_total))
    first = build(load_mix(path), tmp_path / "out", tok, 256)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "rows").iterdir()}
    decide = _Dedup.decide

    def decide_then_edit(self):
        changed = decide(self)
        with open(corpus["small"], "a") as f:
            f.write(json.dumps({"text": "a late addition"}) + "\n")
        return changed

    monkeypatch.setattr(_Dedup, "decide", decide_then_edit)
    with pytest.raises(DataError, match=r"small.jsonl: the file changed while the build was reading it"):
        build(load_mix(path), tmp_path / "out", tok, 256, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "rows").iterdir()} == before
    assert load_built(tmp_path / "out").stats == first.stats
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "out").iterdir())


def held_and_peak(tmp_path: Path, words_per_doc: int, n: int = 2000) -> tuple[int, int]:
    """Python memory the index holds after ``n`` documents of ``words_per_doc`` words, and the peak of finish()."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    cfg = Dedup(**DEDUP, num_perm=128, recall_sample=0)
    with DedupIndex(cfg, tmp_path / "warm") as warm:  # imports and first-call caches, outside the measurement
        warm.add_texts(["a b c d e f", "a b c d e f"], "s", ["0", "1"])
        warm.finish()
    tracemalloc.start()
    try:
        index = DedupIndex(cfg, tmp_path / f"idx{words_per_doc}")
        for start in range(0, n, 100):
            texts = [" ".join(rng.choice(vocab, words_per_doc)) for _ in range(100)]
            index.add(features(texts, cfg, index.shingler), "s", [f"f:{start + i}" for i in range(100)])
            del texts
        index.shingler._values.clear()  # the word-hash cache: bounded (MAX_CACHED_WORDS), the same for both
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        index.finish()
        peak = tracemalloc.get_traced_memory()[1]
        index.remove()
    finally:
        tracemalloc.stop()
    return held, peak


def test_the_index_holds_features_whose_size_does_not_grow_with_the_text(tmp_path):
    """20x longer documents: the same memory held (hashes, counts and offsets, under 100 bytes a document) and the
    same peak while deciding (the signatures, num_perm * 4 bytes a document, and the band being sorted)."""
    short_held, short_peak = held_and_peak(tmp_path, 50)
    long_held, long_peak = held_and_peak(tmp_path, 1000)
    n = 2000
    assert long_held < 1.1 * short_held + 10_000 and long_held < 100 * n + 200_000, (short_held, long_held)
    assert long_peak < 1.2 * short_peak + 100_000 and long_peak < 3 * 128 * 4 * n + 500_000, (short_peak, long_peak)


def test_signatures_bands_and_spills_equal_their_references(tmp_path, monkeypatch):
    from datasketch import MinHash

    rng = np.random.default_rng(0)
    sets = [np.unique(rng.integers(0, 2**32, size, dtype=np.uint64)).astype(np.uint32) for size in (1, 50, 20_000)]
    monkeypatch.setattr("llmft.data.dedup.similarity.SIGNATURE_CHUNK", 7)  # many updates per set
    sig = minhash_signatures(sets, 64, 3)
    for s, row in zip(sets, sig):
        m = MinHash(num_perm=64, seed=3, hashfunc=lambda x: x)
        m.update_batch(s.tolist())  # one hash at a time, datasketch's own way
        assert np.array_equal(m.hashvalues, row)

    keys = np.sort(rng.integers(0, 30, 200)).astype(np.uint64)
    ids = rng.permutation(200)
    got = {tuple(p) for p in _same_key_pairs(keys, ids).tolist()}
    want = {(ids[a], ids[b]) for a in range(200) for b in range(a + 1, 200) if keys[a] == keys[b]}
    assert got == want and len(got) > 200

    with ArraySpill(tmp_path / "s.u32", np.uint32) as spill:
        spill.append(np.arange(5))
        assert spill[0].tolist() == [0, 1, 2, 3, 4]  # read while still writing
        spill.extend(np.arange(10, 16), np.array([2, 0, 4]))
        assert [spill[i].tolist() for i in range(4)] == [[0, 1, 2, 3, 4], [10, 11], [], [12, 13, 14, 15]]
        assert spill.lengths().tolist() == [5, 2, 0, 4]
    assert not (tmp_path / "s.u32").exists()


def test_documents_the_length_filter_drops_cost_no_signature(tmp_path, tok, book_text):
    """A plain source's min_tokens runs in dedup's scan: the short documents (here exact copies of each other) never
    enter the index, are counted as dropped, and the rows are those of the long documents."""
    words = book_text.split()
    long = [f"long {i} . " + " ".join(words[i * 300 : i * 300 + 300]) for i in range(12)]
    short = ["a short note that repeats"] * 20
    lines = [d for pair in zip(long, short[:12]) for d in pair] + short[12:]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    mix = {"tokenizer": str(TINY_TOKENIZER), "seq_len": 256, "seed": 0, "packing": "concat", "dedup": DEDUP,
           "sources": [{"name": "a", "weight": 1, "filters": {"min_tokens": 50},
                        "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    built = build(load_mix(tmp_path / "mix.yaml"), tmp_path / "out", tok, 256)
    st, dedup = built.stats["sources"]["a"], built.stats["dedup"]
    assert st["dropped_min_tokens"] == 20 and st["documents"] == 32
    assert dedup["documents"] == 12 and dedup["removed"] == 0 and st["deduplicated"] == 0
    text = tok.decode(built.rows.materialize()[0].input_ids.flatten().tolist())
    assert "short note" not in text and len(re.findall(r"long \d+ \.", text)) == 12


def test_removed_tokens_are_counted_past_where_tokenizing_stopped(tmp_path, tok, book_text):
    """A sampled source's second reading stops at its need, before the end of what the scan read: the report still
    counts the tokens of every removed document the scan read (one file, read in order: its first documents)."""
    words = book_text.split()
    unique = [f"doc {i} . " + " ".join(words[i * 150 : i * 150 + 150]) for i in range(60)]
    docs = [d for u in unique for d in (u, u)]  # every document followed by its copy
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    mix = {"tokenizer": str(TINY_TOKENIZER), "seq_len": 256, "seed": 0, "packing": "concat", "total_tokens": 4000,
           "dedup": {**DEDUP, "methods": ["exact"]},
           "sources": [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    built = build(load_mix(tmp_path / "mix.yaml"), tmp_path / "out", tok, 256)
    dedup, st = built.stats["dedup"], built.stats["sources"]["a"]
    scanned = dedup["documents"]
    assert not st["read_whole"] and 10 < scanned < len(docs)
    tokens = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs[:scanned]]
    # the kept documents tokenized hold fewer tokens than all those scanned: tokenizing stopped inside the scan
    assert st["available_tokens"] + built.stats["validation_tokens"].get("a", 0) < sum(t + 2 for t in tokens[::2])
    assert dedup["removed"] == scanned // 2
    assert dedup["by_source"]["a"]["tokens_removed"] == sum(tokens[1::2])
