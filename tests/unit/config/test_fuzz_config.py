"""Fuzzed recipes: hypothesis mutates valid training and data-mix recipes into invalid ones (unknown keys, wrong
types, out-of-range numbers, missing required keys, missing files, incompatible combinations, one to three at a
time). Every case must exit 2 through the CLI with one ``file:line: yaml.path: ...`` message per problem naming
each mutated path, print no traceback, and write nothing."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from conftest import REPO, tiny_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmft.cli import main

# numeric fields and a value range every mutation below violates (all need > 0 or >= 0 or >= 1)
NUMERIC = ["train.lr", "train.warmup_steps", "train.micro_batch_size", "train.gradient_accumulation_steps",
           "train.max_steps", "model.max_seq_len", "model.rope.factor", "checkpoint.every_steps",
           "checkpoint.keep_last", "data.validation_fraction", "logging.every_steps", "train.eps"]
SECTIONS = ["", "model", "model.rope", "train", "data", "checkpoint", "logging"]
REQUIRED = ["model.name", "train.lr", "checkpoint.dir", "model", "train", "checkpoint"]
BAD_TEXT = st.text(alphabet="abcxyz_-", min_size=1, max_size=8).map(lambda s: "v" + s)
NOT_A_NUMBER = st.one_of(BAD_TEXT, st.lists(st.integers(), min_size=1, max_size=2),
                         st.dictionaries(BAD_TEXT, st.integers(), min_size=1, max_size=1))


def _get(d: dict, path: str) -> dict:
    for part in [p for p in path.split(".") if p]:
        d = d[part]
    return d


def _set(d: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    _get(d, ".".join(parents))[leaf] = value


def _delete(d: dict, path: str) -> None:
    *parents, leaf = path.split(".")
    del _get(d, ".".join(parents))[leaf]


@st.composite
def mutation(draw) -> tuple[str, str, object]:
    """(kind, yaml path the error must name, value)."""
    kind = draw(st.sampled_from(["unknown_key", "wrong_type", "out_of_range", "missing", "missing_file",
                                 "combination"]))
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS))
        key = "zz_" + draw(BAD_TEXT)
        return kind, f"{section}.{key}".lstrip("."), draw(st.integers())
    if kind == "wrong_type":
        return kind, draw(st.sampled_from(NUMERIC)), draw(NOT_A_NUMBER)
    if kind == "out_of_range":
        return kind, draw(st.sampled_from(NUMERIC)), draw(st.one_of(st.integers(-10**6, -1),
                                                                     st.floats(-1e9, -1e-3)))
    if kind == "missing":
        return kind, draw(st.sampled_from(REQUIRED)), None
    if kind == "missing_file":
        return kind, "data.sources", "/nonexistent/" + draw(BAD_TEXT) + ".txt"
    return kind, draw(st.sampled_from(["lora", "model.rope", "qlora.quant_storage_dtype", "lora_full"])), None


def apply(recipe: dict, kind: str, path: str, value) -> str:
    """Mutate ``recipe`` in place; returns the YAML path the error message must contain."""
    if kind == "unknown_key":
        _set(recipe, path, value)
    elif kind in ("wrong_type", "out_of_range"):
        _set(recipe, path, value)
    elif kind == "missing":
        _delete(recipe, path)
    elif kind == "missing_file":
        recipe["data"]["sources"][0]["path"] = value
        return "data.sources.0.path"
    elif path == "lora":  # a lora section with method: full
        recipe["lora"] = {"rank": 4}
    elif path == "model.rope":  # RoPE scaling on a randomly initialised model
        recipe["model"]["init"] = "random"
        recipe["model"].pop("produced_by", None)
    elif path == "qlora.quant_storage_dtype":  # QLoRA + ZeRO-3 with uint8 storage
        recipe.update(method="qlora", deepspeed={"stage": 3})
        recipe["model"]["init"] = "pretrained"
    else:  # lora_full: lora fields at the wrong level
        recipe["train"]["rank"] = 8
        return "train.rank"
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, text_file):
    return tiny_recipe(tiny_model, text_file, tmp_path_factory.mktemp("fuzz") / "never-written")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation(), min_size=1, max_size=3,  # one mutation per section, one combination
                          unique_by=lambda m: "combination" if m[0] == "combination" else m[1].split(".")[0]))
def test_fuzzed_training_recipes_exit_2_naming_each_path(base, tmp_path_factory, capsys, mutations):
    recipe = copy.deepcopy(base)
    expected = []  # (path, checked across sections)
    for kind, path, value in mutations:
        try:
            expected.append((apply(recipe, kind, path, value), kind == "combination" and path != "lora_full"))
        except (KeyError, TypeError):  # an earlier mutation removed the parent: nothing to do
            continue
    # cross-section rules are checked once every section is valid on its own: expect them only then
    only_cross = all(cross for _, cross in expected)
    expected = [p for p, cross in expected if only_cross or not cross]
    tmp = tmp_path_factory.mktemp("case")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2, mutations
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip(), mutations
    lines = err.strip().splitlines()
    assert all(line.startswith(f"llmft: error: {path}") for line in lines), err
    for p in expected:
        section = p.split(".")[0]
        assert p in err or f": {section}" in err or f" {section}." in err, (p, err)
    assert not (tmp / "never-written").exists() and sorted(x.name for x in tmp.iterdir()) == ["recipe.yaml"]


MIX_NUMERIC = ["seq_len", "total_tokens", "validation_fraction", "sources.0.weight", "sources.0.max_epochs",
               "sources.0.filters.min_tokens", "decontaminate.n"]


@st.composite
def mix_mutation(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["unknown", "type", "range", "file", "format"]))
    if kind == "unknown":
        return draw(st.sampled_from(["", "sources.0", "sources.0.source", "sources.0.filters"])) + ".zz_" + \
            draw(BAD_TEXT), 1
    if kind == "type":
        return draw(st.sampled_from(MIX_NUMERIC)), draw(NOT_A_NUMBER)
    if kind == "range":
        return draw(st.sampled_from(MIX_NUMERIC)), draw(st.integers(-10**6, -1))
    if kind == "file":
        return "sources.0.source.path", "/nonexistent/" + draw(BAD_TEXT) + ".jsonl"
    return "sources.0.source.format", draw(BAD_TEXT)


def _set_list_path(d, path: str, value) -> None:
    *parents, leaf = [p for p in path.split(".") if p]
    for part in parents:
        d = d[int(part)] if isinstance(d, list) else d.setdefault(part, {})
    d[leaf] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mix_mutation(), min_size=1, max_size=2, unique_by=lambda m: m[0]))
def test_fuzzed_data_recipes_exit_2_naming_each_path(text_file, tmp_path_factory, capsys, mutations):
    jsonl = tmp_path_factory.getbasetemp() / "mix-docs.jsonl"
    if not jsonl.exists():
        jsonl.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(5)))
    mix = {
        "tokenizer": str(REPO / "llmft/assets/tiny-llama"),
        "seq_len": 256,
        "decontaminate": {"targets": [str(jsonl)]},
        "sources": [{"name": "a", "weight": 1.0, "source": {"format": "jsonl", "path": str(jsonl)}}],
    }
    for path, value in mutations:
        _set_list_path(mix, path.lstrip("."), value)
    tmp = tmp_path_factory.mktemp("mix")
    path = tmp / "mix.yaml"
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    capsys.readouterr()
    assert main(["data", "validate", str(path)]) == 2, mutations
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(line.startswith(f"llmft: error: {path}") for line in err.strip().splitlines())
    for p, _ in mutations:
        p = p.lstrip(".")
        parent = p.rsplit(".", 1)[0]
        assert p in err or parent in err, (p, err)
    assert sorted(x.name for x in tmp.iterdir()) == ["mix.yaml"]
