"""The data engine (``engine:`` in a mix): the per-file stages as datatrove tasks in worker processes build the same
rows as the build's own process, count the same when sources are read whole, stop a sampled source near its need,
report a malformed record under on_error: stop with its file and line, and reject what it cannot run."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TOKENIZER
from transformers import AutoTokenizer

from llmft.config import RecipeError
from llmft.config.data import load_mix
from llmft.data.build import build
from llmft.data.build import common as build_module
from llmft.data.sources import DataError
from llmft.testing.corpora import write_sharded_corpus

pytestmark = pytest.mark.slow  # worker processes


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture
def corpus(tmp_path, book_text) -> dict[str, Path]:
    """40 shards of 8 tagged documents (``big``), one file of 16 (``small``); shard 9 has a malformed line, shard 5
    a ninth document that is the decontamination target (the others are windows of one book, which overlap)."""
    c = write_sharded_corpus(tmp_path, book_text, lambda doc, s: [doc(f"shard {s} doc {d}") for d in range(8)])
    with open(c["big"] / "009.jsonl", "a") as f:
        f.write("{not json\n")
    target = " ".join(f"zebra{i} quartz{i * 7}" for i in range(40))
    with open(c["big"] / "005.jsonl", "a") as f:
        f.write(json.dumps({"text": target}) + "\n")
    (tmp_path / "target.txt").write_text(target)
    return c | {"target": tmp_path / "target.txt"}


def mix(path: Path, corpus: dict[str, Path], **extra):
    m = {"tokenizer": str(TINY_TOKENIZER), "seq_len": 256, "seed": 3, "packing": "isolated", "validation_fraction": 0.1,
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
    ({"reweight": {}, "dedup": {}, "engine": {}}, "engine: the engine does not run reweight with dedup yet"),
    ({"dedup": {"methods": ["clusters"], "embedder": "sentence-transformers:x", "candidate_cosine": 0.8},
      "engine": {}}, "engine: the engine's tasks compute hashed embeddings only"),
    ({"engine": {"executor": "slurm"}}, "engine.options: the slurm executor needs time, partition"),
    ({"engine": {"options": {"workers": 3}}}, "engine.options.workers: workers is set by the build"),
    ({"engine": {"options": {"partition": "cpu"}}}, "engine.options.partition: LocalPipelineExecutor takes no "
                                                    "'partition'"),
])
def test_what_the_engine_cannot_run_is_a_recipe_error(tmp_path, corpus, extra, expected):
    with pytest.raises(RecipeError) as e:
        mix(tmp_path / "m.yaml", corpus, **extra)
    assert expected in str(e.value)


@pytest.mark.parametrize("total_tokens", [16_000, None], ids=["sampled", "whole"])
def test_reweighted_engine_build_equals_the_in_process_build(tmp_path, corpus, tok, total_tokens, monkeypatch):
    """``reweight`` on the engine: the jobs filter and embed every document they read; the build replays the
    filters' batches over their records, so the probe sees the same documents as when one process reads them. The
    same rows and per-token weights, byte for byte, and the same reweighting report."""
    # small filter batches, ended by either limit (5 documents, or 6,000 characters: about 3 of these documents)
    monkeypatch.setattr(build_module, "FILTER_BATCH", 5)
    monkeypatch.setattr(build_module, "TOKENIZE_BATCH_CHARS", 6000)
    extra = {"reweight": {"components": 4}, "filters": [{"kind": "keywords", "words": ["friend", "small doc 4"]}]}
    extra |= {"total_tokens": total_tokens} if total_tokens else {}
    plain = build(mix(tmp_path / "a.yaml", corpus, **extra), tmp_path / "a", tok, 256)
    engine = build(mix(tmp_path / "b.yaml", corpus, engine=ENGINE, **extra), tmp_path / "b", tok, 256)
    same_files(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "rows" / "weight.bin").is_file()
    rw = engine.stats["reweight"]["by_source"]
    assert rw == plain.stats["reweight"]["by_source"]
    assert rw["big"]["documents"] > rw["big"]["kept"] > 0 and rw["big"]["weight_max"] > rw["big"]["weight_min"]
    assert engine.stats["sources"]["big"]["read_whole"] == (total_tokens is None)
    if total_tokens is None:
        assert plain.stats["filters"] == engine.stats["filters"]


@pytest.mark.parametrize("total_tokens", [16_000, None], ids=["sampled", "whole"])
def test_deduplicated_engine_build_equals_the_in_process_build(tmp_path, book_text, tok, total_tokens, caplog):
    """Half of big's documents are copies (3 exact, 1 near per shard): the engine's tasks compute the features,
    the scan replays over them (the same budget, estimate, length filter and top-up), the second reading takes the
    kept documents from the prepared files. Same rows, same dedup report, same per-source counts."""

    def shard(doc, s: int) -> list[str]:
        docs = [doc(f"shard {s} doc {d}") for d in range(4)]
        near = docs[1].split(" ")
        return docs + [docs[0], docs[2], docs[3], " ".join(w + "x" if i % 50 == 49 else w for i, w in enumerate(near))]

    c = write_sharded_corpus(tmp_path, book_text, shard)
    dedup = {"methods": ["exact", "minhash"], "threshold": 0.8, "shingle_size": 5, "keep": "longest"}

    def recipe(path: Path, **extra):
        m = {"tokenizer": str(TINY_TOKENIZER), "seq_len": 256, "seed": 1, "packing": "concat", "dedup": dedup,
             "total_tokens": total_tokens, "validation_fraction": 0.05,
             "sources": [{"name": "big", "weight": 0.5, "filters": {"min_tokens": 640},
                          "source": {"format": "jsonl", "path": str(c["big"])}},
                         {"name": "small", "weight": 0.5, "transform": "ul2", "max_epochs": 8,
                          "source": {"format": "jsonl", "path": str(c["small"])}}], **extra}
        path.write_text(yaml.safe_dump(m, sort_keys=False))
        return load_mix(path)

    caplog.set_level(logging.INFO, logger="llmft.data.build")
    plain = build(recipe(tmp_path / "a.yaml"), tmp_path / "a", tok, 256)
    engine = build(recipe(tmp_path / "b.yaml", engine={"workers": 2}), tmp_path / "b", tok, 256)  # auto tasks
    same_files(tmp_path / "a", tmp_path / "b")
    top_ups = sum("kept after dedup: reading on" in r.getMessage() for r in caplog.records)
    assert top_ups == (0 if total_tokens is None else 2)  # the sampled scan fell short, in both builds
    plain.stats["dedup"].pop("seconds"), engine.stats["dedup"].pop("seconds")
    assert plain.stats["dedup"] == engine.stats["dedup"]
    big = plain.stats["sources"]["big"]
    assert big["deduplicated"] > 0 and big["dropped_min_tokens"] > 0  # both steps ran
    for name in ("big", "small"):
        a, b = plain.stats["sources"][name], engine.stats["sources"][name]
        for key in ("deduplicated", "dropped_min_tokens", "selected_tokens", "available_tokens", "read_whole"):
            assert a[key] == b[key], (name, key)
    if total_tokens is None:
        assert {k: v for k, v in engine.stats["sources"]["big"].items() if k != "bytes_prepared"} == big


SBATCH = """#!/bin/bash
# A one-machine stand-in for Slurm's sbatch: copies the job script and starts every task of its array in the
# background (SLURM_ARRAY_TASK_ID set), as a scheduler would, then answers as sbatch does.
script="$(mktemp "$FAKE_SLURM_DIR/job-XXXX.sh")"
cp "${@: -1}" "$script"
array=$(grep -o -- '--array=[0-9]*-[0-9]*' "$script" | head -1 | sed 's/--array=//')
lo=${array%-*}; hi=${array#*-}
if [ -z "$array" ]; then lo=0; hi=0; fi
for i in $(seq "$lo" "$hi"); do
  (SLURM_ARRAY_TASK_ID=$i SLURM_NODELIST=localhost SLURM_JOB_ID=4242 bash "$script" > "$script.$i.log" 2>&1 &)
done
echo "Submitted batch job 4242"
"""
SRUN = """#!/bin/bash
exec "${@: -2}"
"""
SCONTROL = """#!/bin/bash
echo localhost
"""


def test_slurm_executor_runs_the_same_tasks_through_sbatch(tmp_path, corpus, tok, monkeypatch):
    """The slurm executor as a cluster runs it: datatrove writes the sbatch script and pickles the tasks; a
    stand-in sbatch starts the array's tasks in the background on this machine (it, srun and scontrol are the only
    parts not real); the build
    waits for every file's output and writes the rows the build's own process writes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    monkeypatch.setattr("llmft.data.engine.POLL_SECONDS", 0.2)
    slurm = {"executor": "slurm", "files_per_task": 4,
             "options": {"partition": "cpu", "time": "1:00:00", "cpus_per_task": 1}}
    build(mix(tmp_path / "a.yaml", corpus, total_tokens=16_000), tmp_path / "a", tok, 256)
    engine = build(mix(tmp_path / "b.yaml", corpus, total_tokens=16_000, engine=slurm), tmp_path / "b", tok, 256)
    same_files(tmp_path / "a", tmp_path / "b")
    logs = tmp_path / "b" / "engine-logs"
    assert (logs / "wave-1" / "launch_script.slurm").read_text().count("#SBATCH --partition=cpu") == 1
    waves = sorted(logs.glob("wave-*"))
    submitted = sum(len(json.loads((w / "ranks_to_run.json").read_text())) for w in waves)
    deadline = time.time() + 60  # datatrove marks a task complete just after its output is written
    while len(list(logs.glob("wave-*/completions/*"))) < submitted and time.time() < deadline:
        time.sleep(0.2)
    assert submitted >= 1 and len(list(logs.glob("wave-*/completions/*"))) == submitted  # every task submitted ran
    assert engine.stats["sources"]["big"]["bytes_prepared"] <= 0.3 * engine.stats["sources"]["big"]["bytes_total"]
