"""LoRA (method: lora) on a tiny LLaMA through the real entry points: the loss falls, only the adapters and the
requested extra modules change, the trainable count matches the closed form, the adapter reloads with plain
transformers + peft, ``llmft merge`` gives the same logits, and a re-run resumes to the identical adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmft.cli import main
from llmft.config import LoraConfig, RecipeError, load_recipe
from llmft.model.adapters import (
    adapter_size_bytes,
    apply_lora,
    export_adapter,
    lora_parameter_count,
    trained_adapter_size_bytes,
)
from llmft.model.load import count_parameters
from llmft.train import checkpoint as ckpt
from llmft.train.loop import train

LONGLORA = {"rank": 8, "alpha": 16, "target_modules": "attention", "trainable_extra": ["embed", "norm"]}


def lora_run(tmp_path: Path, tiny_model: Path, text_file: Path, name: str = "lora", lora=None, overrides=(),
             **sections):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / name, method="lora", lora=lora or dict(LONGLORA),
                         **sections)
    recipe["train"]["lr"] = 1e-2  # LoRA on the random tiny model needs a high lr to move in 10 steps
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    return train(load_recipe(path, list(overrides))), path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, text_file):
    """One LongLoRA-style run (r=8, alpha=16, q/k/v/o, embed + norm trained), 10 steps at a constant lr,
    checkpoint at step 5."""
    tmp = tmp_path_factory.mktemp("lora")
    result, path = lora_run(tmp, tiny_model, text_file, train={"max_steps": 10, "schedule": "constant"},
                            checkpoint={"every_steps": 5})
    return result, path


def peft_key(base_key: str, model) -> str:
    """Where a base weight lives in the PeftModel: wrapped by a LoRA layer, a trainable copy, or untouched."""
    names = dict(model.named_parameters())
    prefix, leaf = base_key.rsplit(".", 1)
    for key in (f"base_model.model.{prefix}.modules_to_save.default.{leaf}",
                f"base_model.model.{prefix}.base_layer.{leaf}", f"base_model.model.{base_key}"):
        if key in names:
            return key
    raise KeyError(base_key)


def test_lora_loss_falls(trained):
    result, _ = trained
    losses = result.losses
    assert len(losses) == 10 and all(x == x for x in losses)
    # the random tiny model starts near ln(512) = 6.238 (6.22-6.29 over the batches of the book), so any fall
    # below that is learning (measured: -0.09)
    assert losses[0] == pytest.approx(6.238, abs=0.05)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert max(losses[-3:]) < losses[0] - 0.05, losses


def test_only_adapters_and_requested_extras_change(trained, tiny_model):
    result, _ = trained
    model = result.model
    names = dict(model.named_parameters())
    base = load_file(tiny_model / "model.safetensors")
    changed, frozen = set(), set()
    for key, before in base.items():
        after = names[peft_key(key, model)].detach().cpu()
        (frozen if torch.equal(after, before) else changed).add(key)
    expect_changed = {k for k in base if "embed_tokens" in k or "norm" in k}
    assert changed == expect_changed, sorted(changed ^ expect_changed)
    assert any("q_proj" in k for k in frozen) and any("lm_head" in k for k in frozen)
    # the frozen originals of the trained copies stay as they were
    for key in expect_changed:
        prefix, leaf = key.rsplit(".", 1)
        assert torch.equal(names[f"base_model.model.{prefix}.original_module.{leaf}"].detach(), base[key])
    # every LoRA B left zero-init and moved
    lora_b = [p for n, p in names.items() if "lora_B" in n]
    assert len(lora_b) == 2 * 4 and all(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.parametrize("lora", [
    LONGLORA,
    {"rank": 4, "target_modules": "all_linear"},
    {"rank": 2, "target_modules": ["q_proj", "v_proj"], "trainable_extra": ["lm_head"]},
])
def test_trainable_count_matches_closed_form(tmp_path, tiny_model, text_file, lora, capsys):
    result, path = lora_run(tmp_path, tiny_model, text_file, lora=lora, overrides=["train.max_steps=1"])
    recipe = load_recipe(path)
    config = AutoConfig.from_pretrained(tiny_model)
    expected = lora_parameter_count(config, recipe.lora)
    trainable, _ = count_parameters(result.model)
    assert trainable == expected
    # by hand for the LongLoRA case: 2 layers x 4 projections x r(64 + 64), embed 512 x 64, 5 norms x 64
    if lora == LONGLORA:
        assert expected == 2 * 4 * 8 * (64 + 64) + 512 * 64 + 5 * 64
    base_total = sum(t.numel() for t in load_file(tiny_model / "model.safetensors").values())
    out = capsys.readouterr().out
    assert f"{base_total:,} base, frozen; {expected:,} trainable ({100 * expected / base_total:.2f}% of base" in out
    size = adapter_size_bytes(config, recipe.lora, torch.float32)
    assert f"adapter on disk    ~{size / 1e6:.1f} MB per export in float32" in out


def test_saved_adapter_reloads_with_plain_peft(trained, tiny_model):
    result, _ = trained
    final = result.final_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= \
        {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    saved = load_file(final / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in saved) and any("input_layernorm" in k for k in saved)
    config = AutoConfig.from_pretrained(final)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.max_position_embeddings == 128
    base = AutoModelForCausalLM.from_pretrained(tiny_model, config=config, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, final).eval()
    x = torch.randint(0, 500, (2, 128))
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, result.model(x).logits, atol=1e-5, rtol=0)


def test_merge_gives_base_plus_adapter_logits(trained, tiny_model, tmp_path, capsys):
    result, _ = trained
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model), "--adapter", str(result.final_dir), "--out", str(out),
                 "--dtype", "float32"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.max_position_embeddings == 128
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, config=AutoConfig.from_pretrained(result.final_dir),
                                                dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, result.final_dir).eval()
    x = torch.randint(0, 500, (2, 128))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, reference(x).logits, atol=1e-4, rtol=0)
    # user errors: one line, exit 2
    assert main(["merge", "--base", str(tiny_model), "--adapter", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_rerun_resumes_from_checkpoint_to_identical_adapter(trained, tiny_model, text_file):
    result, path = trained
    straight = load_file(result.final_dir / "adapter_model.safetensors")
    step5 = ckpt.latest_complete(result.run_dir)
    assert step5 is not None and step5.name == ckpt.step_dir_name(5)
    assert (step5 / "model" / "adapter_model.safetensors").is_file() and (step5 / "model" / "config.json").is_file()
    state = load_file(step5 / "state" / "model.safetensors")  # only the trainable parameters
    assert sum(t.numel() for t in state.values()) == count_parameters(result.model)[0]
    shutil.rmtree(result.final_dir)

    resumed = train(load_recipe(path))
    assert resumed.resumed_from == 5 and len(resumed.losses) == 5
    again = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert again.keys() == straight.keys()
    assert all(torch.equal(again[k], straight[k]) for k in straight)  # bitwise
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-5:] == [6, 7, 8, 9, 10]


def test_lora_recipe_rules(tmp_path, tiny_model, text_file):
    base = tiny_recipe(tiny_model, text_file, tmp_path / "r")
    with pytest.raises(RecipeError, match=r"lora: the lora section applies only to method: lora"):
        load_recipe(write_recipe(tmp_path / "a.yaml", {**base, "lora": {"rank": 4}}))
    # method: qlora (tests/unit/model/test_qlora.py) takes its adapter settings from the same lora section
    assert load_recipe(write_recipe(tmp_path / "b.yaml", {**base, "method": "qlora"})).lora.rank == 8
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path / "c.yaml", {**base, "method": "lora",
                                                       "lora": {"rank": 0, "dropout": 1.0, "trainable_extra": ["emb"],
                                                                "target_modules": "mlp"}}))
    assert len(e.value.messages) >= 4, e.value.messages
    defaults = load_recipe(write_recipe(tmp_path / "d.yaml", {**base, "method": "lora"}))
    assert defaults.lora.rank == 8 and defaults.lora.alpha == 16 and defaults.lora.targets == [
        "q_proj", "k_proj", "v_proj", "o_proj"] and defaults.lora.trainable_extra == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adapter_size_estimate_matches_the_export(tmp_path, tiny_model, dtype):
    cfg = LoraConfig(**LONGLORA)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), cfg)
    export_adapter(tmp_path, model, AutoTokenizer.from_pretrained(tiny_model), dtype)
    estimate = adapter_size_bytes(AutoConfig.from_pretrained(tiny_model), cfg, dtype)
    weights = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert abs(estimate - weights) / weights < 0.05, (estimate, weights)
    # what it estimates: the weights file plus adapter_config.json, here within 1%
    both = weights + (tmp_path / "adapter_config.json").stat().st_size
    assert abs(estimate - both) / both < 0.01, (estimate, both)
    # the tensor bytes dominate: 41,280 trainable parameters (2 x 4 x 8 x 128 + 512 x 64 + 5 x 64)
    assert weights > 41_280 * dtype.itemsize
    assert trained_adapter_size_bytes(model, dtype) == estimate  # what training prints at start, from the model
