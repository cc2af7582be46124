"""Data mixes: token shares met, every unit placed as often as its epochs say, filters exact,
decontamination applied, cache hits, and training straight from a data recipe."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_recipe, write_recipe
from transformers import AutoTokenizer

from llmft.cli import main
from llmft.config import RecipeError, load_recipe
from llmft.config.data import load_mix
from llmft.data.build import build, load_built
from llmft.data.sources import DataError
from llmft.train.loop import train

TOKENIZER = "llmft/assets/tiny-llama"
DATA_RECIPES = sorted((REPO / "data_recipes").rglob("*.yaml"))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(REPO / TOKENIZER)


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def mix_file(tmp_path: Path, **mix) -> Path:
    mix = {"tokenizer": str(REPO / TOKENIZER), "seq_len": 256, "seed": 0, **mix}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    return path


@pytest.fixture
def two_sources(tmp_path, book_text):
    words = book_text.split()
    docs = [" ".join(words[i : i + n]) for i, n in zip(range(0, 8000, 160), [20, 150, 60, 400, 90] * 10)]
    return jsonl(tmp_path / "a.jsonl", docs[:25]), jsonl(tmp_path / "b.jsonl", docs[25:])


@pytest.mark.parametrize("recipe", DATA_RECIPES, ids=lambda p: p.name)
def test_every_shipped_data_recipe_validates(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["data", "validate", str(recipe.relative_to(REPO)), "--schema-only"]) == 0


def test_a_share_is_whole_passes_plus_a_part_pass_overshooting_by_less_than_one_unit():
    from llmft.data.build.pipeline import _select

    lengths = np.random.default_rng(0).integers(1, 500, 40).astype(np.int32)
    for target in (1, 137, int(lengths.sum()), 3 * int(lengths.sum()) + 5, 12_345):
        idx = _select(lengths, target, np.random.default_rng(1))
        assert target <= int(lengths[idx].sum()) < target + int(lengths.max()), target
        passes = np.bincount(idx, minlength=len(lengths))
        assert passes.max() - passes.min() <= 1  # no unit repeated before every unit has been taken once more


def test_cpu_mix_builds_with_shares_within_one_percent(tmp_path, monkeypatch, tok, shared_data):
    monkeypatch.chdir(REPO)
    mix = load_mix("data_recipes/cpu_books_ni.yaml", [f"sources.0.source.path={shared_data / 'gutenberg'}",
                                                      f"sources.1.source.path={shared_data / 'natural_instructions'}"])
    t0 = time.perf_counter()
    built = build(mix, tmp_path / "out", tok, 1024)
    t1 = time.perf_counter()
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert build(mix, tmp_path / "out", tok, 1024).cached  # the first cached call pays one-off imports
    t2 = time.perf_counter()
    assert build(mix, tmp_path / "out", tok, 1024).cached
    assert time.perf_counter() - t2 < 0.1 * (t1 - t0)  # a rebuild with unchanged inputs: < 10% of the first
    assert {
        p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()
    } == written  # nothing rewritten
    for name, src in built.stats["sources"].items():
        assert abs(src["realized_share"] - src["target_share"]) < 0.01, (name, src)
    assert built.stats["packing"]["efficiency"] == 1.0
    # the recipe's dedup section ran: its report is in stats.json; the shared data holds no duplicates (the NI
    # instances share their task header but stay below J 0.8), so nothing is removed
    dedup = json.loads((tmp_path / "out" / "stats.json").read_text())["dedup"]
    assert dedup["settings"]["methods"] == ["exact", "minhash"] and dedup["documents"] == 2 + 30
    assert dedup["removed"] == 0 and dedup["by_source"].keys() == {"books", "natural_instructions"}
    assert dedup["recall"]["sampled_documents"] == 32 and dedup["methods"]["minhash"]["candidates"] > 0
    assert all(src["deduplicated"] == 0 for src in built.stats["sources"].values())
    assert (tmp_path / "out" / "mix.png").stat().st_size > 5000
    assert (tmp_path / "out" / "length_histogram.png").stat().st_size > 5000
    again = load_built(tmp_path / "out")
    assert torch.equal(again.rows.materialize()[0].input_ids, built.rows.materialize()[0].input_ids)


def test_cpu_mix_dedup_removes_a_planted_near_copy_of_a_book(tmp_path, monkeypatch, tok, shared_data):
    """The shipped recipe's dedup section on the shared books plus an edited copy of one (1 word in 200 changed,
    so not an exact copy: MinHash must find it): the copy is removed and reported."""
    monkeypatch.chdir(REPO)
    books = tmp_path / "gutenberg"
    books.mkdir()
    for f in (shared_data / "gutenberg").glob("*.txt"):
        (books / f.name).write_bytes(f.read_bytes())
    words = (books / "84.txt").read_text(encoding="utf-8").split(" ")
    edited = [w + "x" if i % 200 == 0 else w for i, w in enumerate(words)]
    (books / "99984.txt").write_text(" ".join(edited), encoding="utf-8")
    mix = load_mix("data_recipes/cpu_books_ni.yaml", [f"sources.0.source.path={books}",
                                                      f"sources.1.source.path={shared_data / 'natural_instructions'}"])
    built = build(mix, tmp_path / "out", tok, 1024)
    dedup = json.loads((tmp_path / "out" / "stats.json").read_text())["dedup"]
    assert dedup["documents"] == 3 + 30 and dedup["removed"] == 1 and dedup["exact_duplicates"] == 0
    assert dedup["groups"] == 1 and dedup["methods"]["minhash"]["pairs"] == 1
    assert dedup["by_source"]["books"]["removed"] == 1 and built.stats["sources"]["books"]["deduplicated"] == 1
    assert dedup["by_source"]["books"]["tokens_removed"] > 100_000  # the whole book
    assert dedup["recall"]["true_pairs"] == dedup["recall"]["found"] == 1
    pair = dedup["examples"][0]
    assert {Path(pair["a"]).name, Path(pair["b"]).name} == {"84.txt", "99984.txt"} and 0.8 <= pair["jaccard"] < 1


def test_each_unit_appears_exactly_as_often_as_its_epochs(tmp_path, two_sources, tok):
    a, b = two_sources
    path = mix_file(tmp_path, packing="isolated", sources=[
        {"name": "a", "weight": 0.5, "source": {"format": "jsonl", "path": str(a)}},
        {"name": "b", "weight": 0.5, "source": {"format": "jsonl", "path": str(b)}, "max_epochs": 3}])
    built = build(load_mix(path), tmp_path / "out", tok, 256)
    rows, stats = built.rows.materialize()[0], built.stats["sources"]
    placed = Counter()  # every packed segment (an isolated unit), by its tokens
    for r in range(len(rows)):
        pos = rows.position_ids[r]
        starts = torch.nonzero(pos == 0).flatten().tolist() + [len(pos)]
        for s, e in zip(starts[:-1], starts[1:]):
            if (rows.labels[r, s:e] != -100).any():
                placed[tuple(rows.input_ids[r, s:e].tolist())] += 1

    def units(path):
        out = []
        for line in path.read_text().splitlines():
            ids = (
                [tok.bos_token_id]
                + tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
                + [tok.eos_token_id]
            )
            out += [tuple(ids[i : i + 256]) for i in range(0, len(ids), 256)]
        return out

    assert stats["a"]["epochs"] == pytest.approx(1.0)  # the limiting source: every unit exactly once
    assert all(placed[u] == 1 for u in units(a))
    e = stats["b"]["epochs"]  # whole passes plus a part-pass: each unit floor(e) or ceil(e) times
    assert 1 < e <= 3 and all(int(e) <= placed[u] <= int(e) + 1 for u in units(b))
    assert sum(placed.values()) == sum(1 for _ in units(a)) + sum(placed[u] for u in set(units(b)))
    assert built.stats["packing"]["split_examples"] == 0  # units are already at most seq_len


def test_min_tokens_drops_exactly_the_short_documents(tmp_path, two_sources, tok):
    a, _ = two_sources
    lengths = [len(tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]) + 2
               for line in a.read_text().splitlines()]
    path = mix_file(tmp_path, sources=[{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(a)},
                                        "filters": {"min_tokens": 100}}])
    built = build(load_mix(path), tmp_path / "out", tok, 256)
    assert built.stats["sources"]["a"]["dropped_min_tokens"] == sum(n < 100 for n in lengths) > 0
    assert built.stats["sources"]["a"]["available_tokens"] == sum(n for n in lengths if n >= 100)


def test_second_build_is_a_cache_hit(tmp_path, two_sources, tok):
    a, b = two_sources
    path = mix_file(tmp_path, validation_fraction=0.1, sources=[
        {"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(a)}},
        {"name": "b", "weight": 1, "source": {"format": "jsonl", "path": str(b)}}])
    mix = load_mix(path)
    t0 = time.perf_counter()
    first = build(mix, tmp_path / "out", tok, 256)
    t1 = time.perf_counter()
    second = build(mix, tmp_path / "out", tok, 256)
    t2 = time.perf_counter()
    assert not first.cached and second.cached
    first_rows, second_rows = first.rows.materialize()[0], second.rows.materialize()[0]
    for name in ("input_ids", "labels", "position_ids"):  # the cached store reads back as built
        assert torch.equal(getattr(first_rows, name), getattr(second_rows, name))
    assert second.validation_tokens.dtype == np.int32 and len(second.validation_tokens) > 0
    assert np.array_equal(first.validation_tokens, second.validation_tokens)
    stats_only = build(mix, tmp_path / "out", tok, 256, load_rows=False)  # what `llmft data build` does
    assert stats_only.cached and stats_only.rows is None and stats_only.stats == first.stats
    assert t2 - t1 < 0.5 * (t1 - t0)  # the cached path only hashes inputs and reads the shards
    b.write_text(b.read_text() + json.dumps({"text": "one more document " * 20}) + "\n")
    assert not build(mix, tmp_path / "out", tok, 256).cached  # an input changed: rebuilt


def test_decontamination_removes_the_planted_document(tmp_path, two_sources, tok, book_text):
    a, _ = two_sources
    eval_text = "the quick brown fox jumps over the lazy dog while seven sleepy cats watch from a sunny windowsill"
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "book.txt").write_text(eval_text)
    docs = [json.loads(line)["text"] for line in a.read_text().splitlines()]
    docs[3] = docs[3] + " " + eval_text
    jsonl(a, docs)
    path = mix_file(tmp_path, decontaminate={"targets": [str(tmp_path / "eval")], "n": 13},
                    sources=[{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(a)}}])
    built = build(load_mix(path), tmp_path / "out", tok, 256)
    assert built.stats["sources"]["a"]["decontaminated"] == 1
    assert built.stats["decontamination"]["documents_removed"] == 1
    assert built.stats["sources"]["a"]["documents"] == len(docs)
    planted = tok(eval_text, add_special_tokens=False)["input_ids"][:8]
    flat = built.rows.materialize()[0].input_ids.flatten().tolist()
    assert not any(flat[i : i + 8] == planted for i in range(len(flat) - 8))


def test_a_share_beyond_max_epochs_is_a_clear_error(tmp_path, two_sources, tok):
    a, b = two_sources
    path = mix_file(tmp_path, total_tokens=10_000_000, sources=[
        {"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(a)}}])
    with pytest.raises(DataError, match="needs .* passes > max_epochs 1"):
        build(load_mix(path), tmp_path / "out", tok, 256)


def test_bad_mix_recipe_names_the_yaml_path(tmp_path, two_sources):
    a, _ = two_sources
    path = mix_file(tmp_path, sources=[{"name": "a", "weight": -1, "source": {"format": "jsonl", "path": str(a)}},
                                       {"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(a)}}])
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    assert any("sources.0.weight: got -1; expected a number greater than 0" in m for m in info.value.messages)
    assert main(["data", "build", str(path), "--out", str(tmp_path / "o")]) == 2


def test_on_error_stop_exits_2_with_file_and_line(tmp_path, tok, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    path = mix_file(
        tmp_path, on_error="stop", sources=[{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(bad)}}]
    )
    assert main(["data", "build", str(path), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_training_from_a_data_recipe(tmp_path, tiny_model, two_sources, capsys):
    a, b = two_sources
    path = mix_file(
        tmp_path,
        packing="isolated",
        validation_fraction=0.1,
        sources=[
            {"name": "a", "weight": 0.7, "source": {"format": "jsonl", "path": str(a)}},
            {"name": "b", "weight": 0.3, "source": {"format": "jsonl", "path": str(b)}, "max_epochs": 4},
        ],
    )
    raw = yaml.safe_load(path.read_text())
    del raw["seq_len"], raw["tokenizer"]
    path.write_text(yaml.safe_dump(raw))
    recipe = tiny_recipe(tiny_model, a, tmp_path / "run", train={"max_steps": 3},
                         eval={"every_steps": 3, "lengths": [64, 128], "max_windows": 2})
    recipe["data"] = {"recipe": str(path)}
    rpath = write_recipe(tmp_path / "r.yaml", recipe)
    result = train(load_recipe(rpath))
    assert len(result.losses) == 3 and (tmp_path / "run" / "data" / "stats.json").is_file()
    assert "packing            isolated" in capsys.readouterr().out
    evals = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "eval/ppl@64" in line
    ]
    assert len(evals) == 1
    recipe["data"]["packing"] = "concat"
    with pytest.raises(RecipeError, match="belong in the data recipe"):
        load_recipe(write_recipe(tmp_path / "r2.yaml", recipe))


def test_training_from_a_built_directory_and_mismatch_errors(tmp_path, tiny_model, two_sources):
    a, _ = two_sources
    source = [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(a)}}]
    path = mix_file(tmp_path, seq_len=128, tokenizer=str(tiny_model), sources=source)
    assert main(["data", "build", str(path), "--out", str(tmp_path / "built")]) == 0
    recipe = tiny_recipe(tiny_model, a, tmp_path / "run", train={"max_steps": 2})
    recipe["data"] = {"built": str(tmp_path / "built")}
    result = train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert len(result.losses) == 2

    other = mix_file(tmp_path, seq_len=128, sources=source)  # the bundled 2048-token tokenizer
    assert main(["data", "build", str(other), "--out", str(tmp_path / "other")]) == 0
    recipe["data"] = {"built": str(tmp_path / "other")}
    with pytest.raises(RecipeError, match="which is not the model's"):
        train(load_recipe(write_recipe(tmp_path / "r2.yaml", recipe)))
    recipe["data"] = {"built": str(tmp_path / "built")}
    recipe["model"]["max_seq_len"] = 64
    with pytest.raises(RecipeError, match="built for seq_len 128"):
        train(load_recipe(write_recipe(tmp_path / "r3.yaml", recipe)))
    recipe["data"] = {"built": str(tmp_path / "nothing")}
    with pytest.raises(RecipeError, match="not a built data directory"):
        load_recipe(write_recipe(tmp_path / "r4.yaml", recipe))


def test_num_proc_workers_build_the_same_rows_and_stats(tmp_path, two_sources, tok, capsys, shared_data):
    """Two tokenizer worker processes (CLI --num-proc 2) give byte-identical rows and stats to one process, over
    plain, UL2 (seeded in the reading process) and NI few-shot sources; num_proc is not part of the cache key."""
    a, b = two_sources
    path = mix_file(tmp_path, packing="isolated", sources=[
        {"name": "a", "weight": 0.4, "source": {"format": "jsonl", "path": str(a)}},
        {"name": "b", "weight": 0.3, "source": {"format": "jsonl", "path": str(b)}, "transform": "ul2"},
        {"name": "ni", "weight": 0.3, "max_epochs": 50, "transform": "ni_fewshot",
         "source": {"format": "natural_instructions", "path": str(shared_data / "natural_instructions")}}])
    one = build(load_mix(path), tmp_path / "one", tok, 256)
    assert main(["data", "build", str(path), "--out", str(tmp_path / "two"), "--num-proc", "2"]) == 0
    two = load_built(tmp_path / "two")
    one_rows, two_rows = one.rows.materialize()[0], two.rows.materialize()[0]
    for field in ("input_ids", "labels", "position_ids"):
        assert torch.equal(getattr(one_rows, field), getattr(two_rows, field)), field
    for f in ("tokens.bin", "trained.bin", "starts.bin", "index.json"):  # byte-identical for any num_proc
        assert (tmp_path / "one" / "rows" / f).read_bytes() == (tmp_path / "two" / "rows" / f).read_bytes(), f
    drop = lambda s: {k: v for k, v in s.items() if k != "build_seconds"}  # noqa: E731
    assert drop(one.stats) == drop(two.stats)
    assert main(["data", "build", str(path), "--out", str(tmp_path / "one")]) == 0  # same fingerprint
    assert "cache hit" in capsys.readouterr().out


def test_a_build_does_not_import_pandas(tmp_path, two_sources):
    """pyarrow's ``pa.array`` and ``pq.read_table`` import pandas (about half a second of every build); the build
    writes and reads its parquet through buffers instead."""
    a, _ = two_sources
    path = mix_file(tmp_path, sources=[{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(a)}}])
    code = ("import sys; from llmft.cli import main; "
            f"rc = main(['data', 'build', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}]); "
            "print(rc, 'pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout + done.stderr
    assert (tmp_path / "out" / "stats.json").is_file() and (tmp_path / "out" / "mix.png").is_file()


def test_data_sources_build_as_an_inline_mix_of_every_source_whole(tmp_path, two_sources, tok, book_text):
    """data.sources is a mix with natural shares: every unit of every source exactly once, the recipe's held-out
    tail per source plus the validation sources whole, built by the same builder; weights are refused with it."""
    from llmft.config import DataConfig
    from llmft.config.data import inline_mix
    from llmft.config.sources import SourceSpec

    a, b = two_sources
    (tmp_path / "sub").mkdir()
    b_docs = [json.loads(x)["text"] for x in b.read_text().splitlines()][:8]  # a third of a's size
    b2 = jsonl(tmp_path / "sub" / "a.jsonl", b_docs)  # the same stem as a
    held = tmp_path / "held.txt"
    held.write_text(book_text[-3000:])
    data = DataConfig(sources=[SourceSpec(format="jsonl", path=a), SourceSpec(format="jsonl", path=b2)],
                      validation=[SourceSpec(format="text", path=held)], validation_fraction=0.1, packing="isolated")
    mix = inline_mix(data)
    assert [s.name for s in mix.sources] == ["a", "a-2"] and mix.shares == "natural"
    built = build(mix, tmp_path / "out", tok, 64)
    stats = built.stats
    for name, src in stats["sources"].items():
        assert src["epochs"] == 1.0 and src["selected_tokens"] == src["available_tokens"], name  # all, once
        assert abs(src["realized_share"] - src["available_tokens"] / stats["total_tokens"]) < 1e-12
    assert stats["total_tokens"] == sum(s["available_tokens"] for s in stats["sources"].values())
    assert stats["sources"]["a"]["available_tokens"] > 2 * stats["sources"]["a-2"]["available_tokens"]
    rows = built.rows.materialize()[0]
    assert rows.real_tokens == stats["total_tokens"]  # isolated packing places every selected token
    held_tokens = len(tok(book_text[-3000:], add_special_tokens=False)["input_ids"]) + 2  # BOS + EOS
    assert stats["validation_tokens"][f"validation:{held}"] == held_tokens
    tails = [stats["validation_tokens"][n] for n in ("a", "a-2")]
    for name, tail in zip(("a", "a-2"), tails):
        whole = tail + stats["sources"][name]["available_tokens"]
        assert 0.1 * whole - 64 <= tail <= 0.1 * whole  # the tail, in whole units of at most 64 tokens
    assert len(built.validation_tokens) == held_tokens + sum(tails)
    from llmft.data.build import encode_documents
    from llmft.data.sources import read_source
    a_tokens = np.concatenate([e.tokens for e in encode_documents(list(read_source(SourceSpec(format="jsonl", path=a))),
                                                                  tok)])
    assert np.array_equal(built.validation_tokens[: tails[0]], a_tokens[len(a_tokens) - tails[0] :])  # a's last tokens

    path = mix_file(tmp_path, shares="natural", sources=[
        {"name": "a", "weight": 2, "source": {"format": "jsonl", "path": str(a)}}])
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    assert any("sources.0.weight" in m and "shares: natural" in m for m in info.value.messages)
