"""Recipe schema: every shipped recipe validates; bad recipes exit 2 with file, YAML path and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_recipe, write_recipe

from llmft.cli import main
from llmft.config import RecipeError, apply_overrides, load_recipe

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml"))


def test_recipes_found():
    names = {p.relative_to(REPO).as_posix() for p in RECIPES}
    assert {"recipes/llama2_32k.yaml", "recipes/cpu/tiny_base.yaml", "recipes/cpu/tiny_pi8x.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_recipe_validates(recipe, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["validate", str(recipe.relative_to(REPO))]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "tokens per step" in out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_a_recipe_written_out_with_its_defaults_reads_back_the_same(recipe, monkeypatch, tmp_path):
    """What a run writes to its recipe.yaml (every default filled in) is itself a valid recipe, and the same one: a
    default written out is no setting "given where it has no effect" (e.g. a local source's ``split: train``)."""
    from llmft.config.recipe import recipe_to_yaml

    monkeypatch.chdir(REPO)
    rec = load_recipe(recipe.relative_to(REPO))
    written = tmp_path / "recipe.yaml"
    written.write_text(recipe_to_yaml(rec))
    assert load_recipe(written).model_dump() == rec.model_dump()


def test_a_recipe_reading_a_data_mix_written_out_reads_back_the_same(tmp_path, tiny_model, text_file):
    from llmft.config.recipe import recipe_to_yaml

    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run")
    recipe["data"] = {"recipe": str(REPO / "data_recipes" / "cpu_books_ni.yaml")}  # packing etc. are the mix's
    rec = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    written = tmp_path / "recipe.yaml"
    written.write_text(recipe_to_yaml(rec))
    assert load_recipe(written).model_dump() == rec.model_dump()
    assert "packing" not in yaml.safe_load(written.read_text())["data"]  # the mix's applies
    recipe["data"]["packing"] = "concat"  # given in the recipe, even at its default: the mix's applies, so refused
    (message,) = _errors(write_recipe(tmp_path / "bad.yaml", recipe))
    assert "packing belong in the data recipe when data.recipe is set; move them there" in message


def test_a_setting_with_no_effect_is_still_refused_when_it_differs_from_its_default(tmp_path, tiny_model, text_file):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run")
    for key, value in (("split", "train"), ("streaming", True)):  # the defaults: harmless, accepted
        recipe["data"]["sources"][0][key] = value
    load_recipe(write_recipe(tmp_path / "ok.yaml", recipe))
    recipe["data"]["sources"][0]["split"] = "validation"
    (message,) = _errors(write_recipe(tmp_path / "bad.yaml", recipe))
    assert "split apply only to hub sources, not to path; remove them" in message


def test_llama2_32k_recipe_matches_the_paper_settings(monkeypatch):
    monkeypatch.chdir(REPO)
    r = load_recipe("recipes/llama2_32k.yaml")
    assert r.model.name == "meta-llama/Llama-2-7b-hf"
    assert (r.model.rope.type, r.model.rope.factor) == ("linear", 8.0)
    assert r.model.max_seq_len == 32768 and r.model.attention == "flash_attention_2"
    assert r.train.lr == 2e-5 and r.train.betas == (0.9, 0.95) and r.train.weight_decay == 0.0
    assert r.train.warmup_steps == 20 and r.deepspeed.stage == 3 and r.train.precision == "bf16"


def test_validate_prints_derived_numbers(tiny_model, text_file, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, text_file, tmp_path / "run"))
    assert main(["validate", str(path), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    # 2 micro x 2 accum x 2 ranks x 128 tokens
    assert "tokens per step         1,024" in out
    assert "effective batch         8 sequences of 128 tokens" in out
    assert "linear x4" in out
    assert "parameters              " in out and "(all trainable" in out


def _errors(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.messages


@pytest.fixture
def good(tiny_model, text_file, tmp_path) -> Path:
    return write_recipe(tmp_path / "good.yaml", tiny_recipe(tiny_model, text_file, tmp_path / "run"))


def test_unknown_key_names_path_line_and_suggestion(good):
    text = good.read_text().replace("  lr: 0.003", "  lr: 0.003\n  learning_rate: 0.1")
    good.write_text(text)
    (msg,) = _errors(good)
    line = 1 + next(i for i, t in enumerate(text.splitlines()) if "learning_rate" in t)
    assert msg.startswith(f"{good}:{line}: train.learning_rate: unknown key")


def test_negative_factor(good):
    good.write_text(good.read_text().replace("factor: 4.0", "factor: -8"))
    (msg,) = _errors(good)
    assert "model.rope.factor: got -8; expected a number greater than 1" in msg
    assert "Fix: set it to target_len / original_len" in msg


def test_wrong_type_and_every_error_at_once(good):
    raw = yaml.safe_load(good.read_text())
    raw["train"]["micro_batch_size"] = "two"
    raw["model"]["attention"] = "flash"
    raw["deepspeed"] = {"stage": 4}
    write_recipe(good, raw)
    msgs = _errors(good)
    assert len(msgs) == 3
    joined = "\n".join(msgs)
    assert "train.micro_batch_size: got \"two\"" in joined
    assert "model.attention: got \"flash\"; expected 'auto', 'flash_attention_2', 'sdpa' or 'eager'" in joined
    assert "deepspeed.stage: got 4" in joined


def test_missing_data_file(good):
    good.write_text(good.read_text().replace("book.txt", "nope.txt"))
    (msg,) = _errors(good)
    assert "data.sources.0.path: " in msg and "nope.txt" in msg and "does not exist" in msg


def test_missing_local_model_dir(good, tmp_path):
    raw = yaml.safe_load(good.read_text())
    raw["model"]["name"] = str(tmp_path / "no-such-model")
    write_recipe(good, raw)
    (msg,) = _errors(good)
    assert "model.name: " in msg and "not an existing directory" in msg


def test_required_key_missing(good):
    raw = yaml.safe_load(good.read_text())
    del raw["model"]["max_seq_len"]
    write_recipe(good, raw)
    (msg,) = _errors(good)
    assert "model.max_seq_len: required key is missing" in msg


def test_rope_params_must_match_type(good):
    (msg,) = _errors(good, "model.rope.beta_fast=32")
    assert "model.rope" in msg and "beta_fast" in msg and "do not apply to rope type 'linear'" in msg


def test_exactly_one_budget(good):
    (msg,) = _errors(good, "train.max_tokens=1000")
    assert "train: set exactly one of max_steps and max_tokens" in msg


def test_overrides_are_typed_and_applied_before_validation(good):
    r = load_recipe(good, ["train.lr=1e-5", "model.rope.factor=5.5", "train.betas=[0.9,0.99]",
                           "data.sources.0.format=jsonl", "data.sources.0.text_field=body",
                           "logging.wandb.mode=offline"])
    assert r.train.lr == 1e-5 and r.model.rope.factor == 5.5 and r.train.betas == (0.9, 0.99)
    assert r.data.sources[0].format == "jsonl" and r.data.sources[0].text_field == "body"
    assert r.logging.wandb.mode == "offline"
    msgs = _errors(good, "model.rope.factor=0.5")
    assert msgs[0].startswith(f"{good} (command-line override): model.rope.factor: got 0.5")


def test_override_syntax_error():
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])


def test_deepspeed_json_conflict(good, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    rc = main(["validate", str(good), f"deepspeed.config={ds}"])
    assert rc == 2


def test_bad_recipe_exits_2_without_traceback(good, tmp_path):
    good.write_text(good.read_text().replace("factor: 4.0", "factor: -8") + "\nbogus: 1\n")
    proc = subprocess.run([sys.executable, "-m", "llmft.cli", "validate", str(good)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"llmft: error: {good}:") for line in lines)
    assert any("bogus: unknown key" in line for line in lines)


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    (msg,) = _errors(bad)
    assert msg.startswith(f"{bad}:") and "not valid YAML" in msg


def test_validate_prints_qlora_trainable_count_offline(python):
    # the hub is never asked: the count comes from the published LLaMA-2-7B config shipped in llmft/assets/configs
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([python, "-m", "llmft.cli", "validate", "recipes/llama2_32k_qlora.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # r=64 on all 7 projections of 32 layers: 32 x 64 x (4 x (4096 + 4096) + 3 x (4096 + 11008))
    assert "# parameters              6,738,415,616 (159,907,840 trainable = 2.37%: method qlora)" in out.stdout
    # 159,907,840 x 2 bytes (bf16) + safetensors header + adapter_config.json
    assert "# adapter on disk         ~319.9 MB (bf16, model.dtype)" in out.stdout
    assert "llmft/assets/configs/meta-llama--Llama-2-7b-hf/config.json" in out.stderr
