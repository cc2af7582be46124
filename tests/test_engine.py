"""The data engine (``engine:`` in a mix): the per-file stages as datatrove tasks in worker processes build the same
rows as the build's own process, count the same when sources are read whole, stop a sampled source near its need,
report a malformed record under on_error: stop with its file and line, and reject what it cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_sampled_reading import TOKENIZER, write_corpus
from transformers import AutoTokenizer

from llmft.config import RecipeError
from llmft.data.build import build
from llmft.data.mix import load_mix
from llmft.data.sources import DataError

pytestmark = pytest.mark.slow  # worker processes


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture
def corpus(tmp_path, book_text) -> dict[str, Path]:
    """40 shards of 8 tagged documents (``big``), one file of 16 (``small``); shard 9 has a malformed line, shard 5
    a ninth document that is the decontamination target (the others are windows of one book, which overlap)."""
    c = write_corpus(tmp_path, book_text, lambda doc, s: [doc(f"shard {s} doc {d}") for d in range(8)])
    with open(c["big"] / "009.jsonl", "a") as f:
        f.write("{not json\n")
    target = " ".join(f"zebra{i} quartz{i * 7}" for i in range(40))
    with open(c["big"] / "005.jsonl", "a") as f:
        f.write(json.dumps({"text": target}) + "\n")
    (tmp_path / "target.txt").write_text(target)
    return c | {"target": tmp_path / "target.txt"}


def mix(path: Path, corpus: dict[str, Path], **extra):
    m = {"tokenizer": str(TOKENIZER), "seq_len": 256, "seed": 3, "packing": "isolated", "validation_fraction": 0.1,
         "decontaminate": {"n": 8, "targets": [str(corpus["target"])]},
         "filters": [{"kind": "keywords", "words": ["shard 3 doc", "small doc 4"]}],
         "sources": [{"name": "big", "weight": 0.5, "transform": "ul2",
                      "source": {"format": "jsonl", "path": str(corpus["big"])}},
                     {"name": "small", "weight": 0.5, "max_epochs": 4,
                      "source": {"format": "jsonl", "path": str(corpus["small"])}}], **extra}
    path.write_text(yaml.safe_dump(m, sort_keys=False))
    return load_mix(path)


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "rows").iterdir())
    assert names == sorted(p.name for p in (b / "rows").iterdir())
    for name in names:
        assert (a / "rows" / name).read_bytes() == (b / "rows" / name).read_bytes(), name
    assert (a / "validation.parquet").read_bytes() == (b / "validation.parquet").read_bytes()


ENGINE = {"workers": 2, "files_per_task": 3}


def test_sampled_engine_build_equals_the_in_process_build(tmp_path, corpus, tok):
    """A source needing about 1/20 of its shards: the same rows and validation tokens, byte for byte, from engine
    tasks in two worker processes (UL2 draws per document, decontamination and filters in the tasks); the engine
    prepares little more than the source's need."""
    plain = build(mix(tmp_path / "a.yaml", corpus, total_tokens=16_000), tmp_path / "a", tok, 256)
    engine = build(mix(tmp_path / "b.yaml", corpus, total_tokens=16_000, engine=ENGINE), tmp_path / "b", tok, 256)
    same_files(tmp_path / "a", tmp_path / "b")
    assert plain.stats["fingerprint"] == engine.stats["fingerprint"]  # the engine is how, not what
    big = engine.stats["sources"]["big"]
    assert not big["read_whole"] and big["selected_tokens"] == plain.stats["sources"]["big"]["selected_tokens"]
    # the need is ~8,000 of ~190,000 tokens: the waves prepare a few of the 40 shards, not the source
    assert big["bytes_read"] <= big["bytes_prepared"] <= 0.2 * big["bytes_total"]
    assert not (tmp_path / "b" / "engine").exists() and (tmp_path / "b" / "engine-logs" / "wave-1").is_dir()


def test_whole_engine_build_counts_what_the_in_process_build_counts(tmp_path, corpus, tok):
    """Every file read: the same rows, and the same counts of documents, malformed records, decontaminated and
    filtered documents (per filter, with examples) as one process."""
    plain = build(mix(tmp_path / "a.yaml", corpus), tmp_path / "a", tok, 256)
    engine = build(mix(tmp_path / "b.yaml", corpus, engine=ENGINE), tmp_path / "b", tok, 256)
    same_files(tmp_path / "a", tmp_path / "b")
    for name in ("big", "small"):
        a, b = plain.stats["sources"][name], engine.stats["sources"][name]
        b.pop("bytes_prepared")
        assert a == b, name
    big = plain.stats["sources"]["big"]
    assert big["bad_records"] == 1 and big["decontaminated"] == 1 and big["filtered"] == 8
    assert plain.stats["filters"] == engine.stats["filters"]
    assert plain.stats["decontamination"] == engine.stats["decontamination"]
    assert plain.stats["decontamination"]["targets"][0]["hits_by_source"] == {"big": 1}


def test_a_malformed_record_under_stop_names_its_line_and_keeps_the_previous_build(tmp_path, corpus, tok):
    build(mix(tmp_path / "a.yaml", corpus, engine=ENGINE, on_error="skip"), tmp_path / "out", tok, 256)
    before = (tmp_path / "out" / "stats.json").read_bytes()
    with pytest.raises(DataError, match=r"009\.jsonl:9: .*on_error is 'stop'"):
        build(mix(tmp_path / "b.yaml", corpus, engine=ENGINE, on_error="stop", seed=4), tmp_path / "out", tok, 256)
    assert (tmp_path / "out" / "stats.json").read_bytes() == before
    assert not list((tmp_path / "out").glob(".staging-*"))


@pytest.mark.parametrize("extra, expected", [
    ({"dedup": {}, "engine": {}}, "engine: the engine does not run dedup yet"),
    ({"engine": {"executor": "slurm"}}, "engine.options: the slurm executor needs time, partition"),
    ({"engine": {"options": {"workers": 3}}}, "engine.options.workers: workers is set by the build"),
    ({"engine": {"options": {"partition": "cpu"}}}, "engine.options.partition: LocalPipelineExecutor takes no "
                                                    "'partition'"),
])
def test_what_the_engine_cannot_run_is_a_recipe_error(tmp_path, corpus, extra, expected):
    with pytest.raises(RecipeError) as e:
        mix(tmp_path / "m.yaml", corpus, **extra)
    assert expected in str(e.value)
