"""A source much larger than its share is read only as far as its share needs, from shards in a seeded random
order; shares, determinism and num_proc identity still hold; a file removed or cut short while it is read is a
clear error that leaves the previous build as it was."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TOKENIZER, sharded_mix_file
from transformers import AutoTokenizer

from llmft.cli import main
from llmft.config.data import load_mix
from llmft.data import sources
from llmft.data.build import build, load_built
from llmft.testing.corpora import SHARDS, write_sharded_corpus


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture
def corpus(tmp_path, book_text) -> dict[str, Path]:
    """``big``: 40 jsonl shards of 8 documents (~400 words of the book, each tagged ``shard N doc M``); ``small``:
    one file of 16 such documents."""
    return write_sharded_corpus(tmp_path, book_text, lambda doc, s: [doc(f"shard {s} doc {d}") for d in range(8)])


def shards_in(built, tok) -> set[int]:
    text = tok.decode(built.rows.materialize()[0].input_ids.flatten().tolist())
    return {int(m) for m in re.findall(r"shard (\d+) doc", text)}


def test_a_share_needing_a_twentieth_reads_about_a_twentieth(tmp_path, corpus, tok):
    built = build(load_mix(sharded_mix_file(tmp_path / "mix.yaml", corpus)), tmp_path / "out", tok, 256)
    big = built.stats["sources"]["big"]
    assert big["target_tokens"] == 8000
    assert not big["read_whole"]
    big_tokens = sum(len(ids) for f in corpus["big"].iterdir() for line in f.read_text().splitlines()
                     for ids in [tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]])
    need = 8000 / big_tokens  # ~4% of big
    assert big["bytes_total"] == sum(f.stat().st_size for f in corpus["big"].iterdir())
    # what the share needs, plus the 2% budget margin and the rest of the last shard started (< 1/40)
    assert 0.9 * need < big["read_fraction"] < 1.05 * need + 1 / SHARDS, (need, big)
    assert big["files_read"] < SHARDS / 4
    assert big["available_tokens"] >= big["target_tokens"] and big["epochs"] <= 1.0
    for st in built.stats["sources"].values():
        assert abs(st["realized_share"] - st["target_share"]) < 0.01, st
    # shards come in a seeded random order, not the first ones; only the shards read are in the rows
    seen = shards_in(built, tok)
    assert len(seen) <= big["files_read"] and seen != set(range(len(seen)))
    other = build(load_mix(sharded_mix_file(tmp_path / "mix2.yaml", corpus, seed=1)), tmp_path / "out2", tok, 256)
    assert shards_in(other, tok) != seen


def test_sampled_reading_is_the_same_for_any_num_proc(tmp_path, corpus, tok, monkeypatch, capsys):
    """The reader works to character budgets and every tokenizing job before a budget is done before reading on, so
    what is read, and so the rows and stats, do not depend on the worker processes."""
    monkeypatch.setattr("llmft.data.build.common.TOKENIZE_BATCH", 3)  # many jobs in flight at each budget
    path = sharded_mix_file(tmp_path / "mix.yaml", corpus, packing="isolated")
    one = build(load_mix(path), tmp_path / "one", tok, 256)
    assert main(["data", "build", str(path), "--out", str(tmp_path / "two"), "--num-proc", "2"]) == 0
    two = load_built(tmp_path / "two")
    assert not one.stats["sources"]["big"]["read_whole"]
    big = one.stats["sources"]["big"]
    assert (f"stopped reading at its share's need ({big['files_read']} of {SHARDS} files, "
            f"{big['read_fraction']:.1%} of the bytes)") in capsys.readouterr().out
    for f in ("tokens.bin", "trained.bin", "starts.bin", "index.json"):
        assert (tmp_path / "one" / "rows" / f).read_bytes() == (tmp_path / "two" / "rows" / f).read_bytes(), f
    drop = lambda s: {k: v for k, v in s.items() if k != "build_seconds"}  # noqa: E731
    assert drop(one.stats) == drop(two.stats)
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "one").iterdir())  # the spills are gone


def test_each_stage_logs_its_progress_without_a_terminal(tmp_path, corpus, tok, monkeypatch, caplog):
    """In a log (no terminal), reading and tokenizing each source and packing show tokens, rate and ETA."""
    monkeypatch.setattr("llmft.data.build.common.PROGRESS_LOG_SECONDS", 0)
    caplog.set_level("INFO", logger="llmft.data.build")
    build(load_mix(sharded_mix_file(tmp_path / "mix.yaml", corpus)), tmp_path / "out", tok, 256)
    lines = [r.getMessage() for r in caplog.records]
    for stage in ("read and tokenize big (to its need of 8,000 tokens)", "read and tokenize small",
                  "pack (concat) and write"):
        logged = [m for m in lines if m.startswith(stage)]
        assert logged, (stage, lines)
        assert any(re.search(r"\d+(\.\d+)?k?/\d+(\.\d+)?k? \[.*<.*tok/s", m) for m in logged), (
            logged
        )  # done/total [elapsed<ETA, rate]
    assert any(re.search(r"read and tokenize big.*, \d+ docs\]", m) for m in lines)


def test_without_a_total_every_source_is_read_whole(tmp_path, corpus, tok):
    raw = yaml.safe_load(sharded_mix_file(tmp_path / "mix.yaml", corpus).read_text())
    del raw["total_tokens"]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(raw))
    built = build(load_mix(tmp_path / "mix.yaml"), tmp_path / "out", tok, 256)
    big = built.stats["sources"]["big"]
    assert big["read_whole"] and big["read_fraction"] == 1.0 and big["files_read"] == SHARDS


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_a_file_damaged_during_the_build_is_one_clear_error_and_the_previous_build_stays(
        tmp_path, corpus, tok, monkeypatch, capsys, damage):
    path = sharded_mix_file(tmp_path / "mix.yaml", corpus, on_error="stop")
    assert main(["data", "build", str(path), "--out", str(tmp_path / "out")]) == 0
    before = {p: p.is_file() and p.read_bytes() for p in (tmp_path / "out").rglob("*")}
    (corpus["small"]).touch()  # a new fingerprint: the next run builds again
    victim = corpus["small"]
    real = sources._READERS["jsonl"]

    def reader(p, spec, on_error, report):  # another process damages the small source while big is read
        if damage == "removed":
            victim.unlink(missing_ok=True)
        elif victim.stat().st_size > 100:
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
        yield from real(p, spec, on_error, report)

    monkeypatch.setitem(sources._READERS, "jsonl", reader)
    capsys.readouterr()
    assert main(["data", "build", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if damage == "removed":
        assert f"{victim}: the file was removed while the build was reading the source" in err
    else:
        assert re.search(rf"{re.escape(str(victim))}:\d+: malformed JSON", err), err
    after = {p: p.is_file() and p.read_bytes() for p in (tmp_path / "out").rglob("*")}
    assert after == before  # no staging directory left, the previous build byte-identical
    assert load_built(tmp_path / "out").rows is not None
