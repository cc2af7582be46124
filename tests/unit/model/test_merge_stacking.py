"""``llmft merge`` with several weighted adapters: the merged weights are exactly ``W0 + sum_i w_i * delta_i``
(for LoRA layers of different ranks, rsLoRA, negative weights and the trained embed / norm copies), the output
reloads with plain transformers, one unweighted adapter merges as before, overlaps warn, and mismatched RoPE
settings or bad ``--adapter`` values are user errors (exit 2, one line).

The adapters are real PEFT adapters on the tiny LLaMA, with every trainable tensor moved off its init (so B != 0
and the module copies differ from the base), exported in llmft's layout by ``export_adapter``."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmft.cli import main
from llmft.config import LoraConfig, RopeConfig
from llmft.model.adapters import apply_lora, export_adapter, merge_adapters, parse_adapter_spec
from llmft.model.load import ModelLoadError
from llmft.model.rope import apply_rope_scaling

EMBED = "model.embed_tokens.weight"
NORM = "model.layers.0.input_layernorm.weight"

# a: LongLoRA-like (r=4, attention, embed + norms trained); b: r=8 rsLoRA on q/v/gate with the embedding trained;
# c: r=2 on the MLP only, nothing shared with a; far: like c but trained at another RoPE factor
ADAPTERS = {
    "a": (LoraConfig(rank=4, alpha=8, target_modules="attention", trainable_extra=["embed", "norm"]), 4.0),
    "b": (LoraConfig(rank=8, alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"], trainable_extra=["embed"],
                     use_rslora=True), 4.0),
    "c": (LoraConfig(rank=2, alpha=4, target_modules=["up_proj", "down_proj"]), 4.0),
    "far": (LoraConfig(rank=2, alpha=4, target_modules=["up_proj", "down_proj"]), 2.0),
}


def make_adapter(out: Path, base: Path, lora: LoraConfig, factor: float, seed: int) -> Path:
    """A LoRA adapter on ``base`` with RoPE linear x``factor``, every trainable tensor moved by N(0, 0.05^2)."""
    config = AutoConfig.from_pretrained(base)
    apply_rope_scaling(config, RopeConfig(type="linear", factor=factor))
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32), lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    export_adapter(out, model, AutoTokenizer.from_pretrained(base), torch.float32)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, tiny_model, lora, factor, seed)
            for seed, (name, (lora, factor)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def w0(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(tiny_model / "model.safetensors")


@pytest.fixture(scope="module")
def deltas(adapters, tiny_model, w0, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Per adapter, merged alone at weight 1 (the single-adapter path) minus the base, for every weight."""
    out = {}
    for name in ("a", "b"):
        merged = merge_adapters(str(tiny_model), [(adapters[name], 1.0)], tmp_path_factory.mktemp("alone") / name,
                                torch.float32)
        weights = load_file(merged / "model.safetensors")
        out[name] = {k: weights[k] - w0[k] for k in w0}
    return out


def merged_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_alone_deltas_are_nontrivial(deltas):
    """The reference deltas the stacking tests use: each adapter moves its LoRA targets and its module copies."""
    changed = {name: {k for k, d in dd.items() if d.abs().max() > 1e-4} for name, dd in deltas.items()}
    assert changed["a"] == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight")} | {EMBED, "model.norm.weight"}
    assert changed["b"] == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight")} | {EMBED}


@pytest.mark.parametrize("stack", [
    [("a", 0.7), ("b", 0.3)],
    [("a", 1.0), ("b", -1.0)],  # the difference of two adapters
    [("b", -1.0), ("a", 1.0)],  # rsLoRA first: the stacked adapter inherits use_rslora from it
    [("a", 0.5)],  # one adapter at another weight
    [("b", -2.0)],
], ids=["a0.7+b0.3", "a1-b1", "-b1+a1", "a0.5", "-2b"])
def test_stack_is_exact_weighted_sum_of_deltas(stack, adapters, tiny_model, w0, deltas, tmp_path, capsys):
    out = tmp_path / "merged"
    specs = [f"{adapters[name]}:{weight:g}" for name, weight in stack]
    argv = ["merge", "--base", str(tiny_model), "--out", str(out), "--dtype", "float32"]
    assert main(argv + [x for spec in specs for x in ("--adapter", spec)]) == 0
    assert f"merged {' + '.join(specs)} into" in capsys.readouterr().out
    merged = merged_weights(out)
    assert merged.keys() == w0.keys()
    for key in w0:
        expected = w0[key] + sum(weight * deltas[name][key] for name, weight in stack)
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0, msg=key)
    # the check has teeth: a stacked q_proj differs from W0 by far more than the tolerance
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - w0[q]).abs().max() > 1e-2


def test_stacked_merge_reloads_with_reference_logits(adapters, tiny_model, w0, deltas, tmp_path):
    out = merge_adapters(str(tiny_model), [(adapters["a"], 0.7), (adapters["b"], 0.3)], tmp_path / "m",
                         torch.float32)
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.max_position_embeddings == 128
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # reference: the base under the adapters' RoPE-scaled config, with W0 + 0.7 dA + 0.3 dB put in by hand
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, config=AutoConfig.from_pretrained(adapters["a"]),
                                                     dtype=torch.float32).eval()
    reference.load_state_dict({k: w0[k] + 0.7 * deltas["a"][k] + 0.3 * deltas["b"][k] for k in w0})
    base = AutoModelForCausalLM.from_pretrained(tiny_model, config=AutoConfig.from_pretrained(adapters["a"]),
                                                dtype=torch.float32).eval()
    x = torch.randint(0, 500, (2, 128), generator=torch.Generator().manual_seed(0))  # 4x the base's 32 positions
    with torch.no_grad():
        logits = merged(x).logits
        torch.testing.assert_close(logits, reference(x).logits, atol=1e-4, rtol=0)
        assert (logits - base(x).logits).abs().max() > 1e-2


def test_single_adapter_without_weight_is_unchanged(adapters, tiny_model, tmp_path):
    """One ``--adapter DIR`` is PEFT's plain ``merge_and_unload``, bit for bit, as before stacking existed."""
    out = tmp_path / "m"
    assert main(["merge", "--base", str(tiny_model), "--adapter", str(adapters["a"]), "--out", str(out),
                 "--dtype", "float32"]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model, config=AutoConfig.from_pretrained(adapters["a"]),
                                                dtype=torch.float32)
    before = PeftModel.from_pretrained(base, adapters["a"]).merge_and_unload().state_dict()
    merged = merged_weights(out)
    assert merged.keys() == before.keys()
    assert all(torch.equal(merged[k], before[k]) for k in before)


def test_module_copies_are_summed_as_differences(adapters, tiny_model, w0, tmp_path):
    """embed: trained by a and b, E0 + 0.7 (E_a - E0) - 0.4 (E_b - E0); norms: trained by a only."""
    out = merge_adapters(str(tiny_model), [(adapters["a"], 0.7), (adapters["b"], -0.4)], tmp_path / "m",
                         torch.float32)
    merged = merged_weights(out)
    saved = {name: load_file(adapters[name] / "adapter_model.safetensors") for name in ("a", "b")}
    e_a, e_b = (saved[name][f"base_model.model.{EMBED}"] for name in ("a", "b"))
    e0 = w0[EMBED]
    assert (e_a - e0).abs().max() > 1e-2 and (e_b - e0).abs().max() > 1e-2
    torch.testing.assert_close(merged[EMBED], e0 + 0.7 * (e_a - e0) - 0.4 * (e_b - e0), atol=1e-6, rtol=0)
    n_a = saved["a"][f"base_model.model.{NORM}"]
    torch.testing.assert_close(merged[NORM], w0[NORM] + 0.7 * (n_a - w0[NORM]), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged["lm_head.weight"], w0["lm_head.weight"], atol=0, rtol=0)


def test_overlap_warns_only_when_modules_are_shared(adapters, tiny_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llmft"):
        merge_adapters(str(tiny_model), [(adapters["a"], 0.5), (adapters["b"], 0.5)], tmp_path / "ab", torch.float32)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    # shared: q_proj and v_proj in both layers (LoRA) and the embedding (trained copies)
    assert (f"adapters {adapters['a']} and {adapters['b']} both change embed_tokens, q_proj, v_proj (5 modules): "
            "their weighted deltas are summed there") == warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmft"):
        merge_adapters(str(tiny_model), [(adapters["a"], 0.5), (adapters["c"], 0.5)], tmp_path / "ac", torch.float32)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_different_rope_settings_are_rejected(adapters, tiny_model, tmp_path, capsys):
    with pytest.raises(ModelLoadError) as e:
        merge_adapters(str(tiny_model), [(adapters["c"], 1.0), (adapters["far"], 1.0)], tmp_path / "m",
                       torch.float32)
    message = str(e.value)
    assert str(adapters["c"]) in message and str(adapters["far"]) in message
    assert "'factor': 4.0" in message and "'factor': 2.0" in message
    assert "max_position_embeddings 128 vs 64" in message
    assert main(["merge", "--base", str(tiny_model), "--adapter", f"{adapters['c']}:0.5", "--adapter",
                 f"{adapters['far']}:0.5", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different RoPE settings" in err[0]
    assert not (tmp_path / "m").exists()


def test_bad_adapter_specs_exit_2_with_one_line(adapters, tiny_model, tmp_path, capsys, python):
    def merge(*specs: str) -> str:
        argv = ["merge", "--base", str(tiny_model), "--out", str(tmp_path / "m")]
        assert main(argv + [x for spec in specs for x in ("--adapter", spec)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    a = str(adapters["a"])
    assert f"--adapter {tmp_path}/nope:0.5: {tmp_path}/nope does not exist" in merge(a, f"{tmp_path}/nope:0.5")
    assert "every adapter weight is 0" in merge(f"{a}:0", f"{adapters['b']}:0")
    assert "not a finite number" in merge(f"{a}:nan")
    assert "is a file" in merge(f"{adapters['a']}/adapter_config.json")
    broken = tmp_path / "broken"  # configs without weights
    broken.mkdir()
    for name in ("adapter_config.json", "config.json"):
        shutil.copy(adapters["a"] / name, broken / name)
    assert f"{broken}' to '{tiny_model}': it has no adapter_model.safetensors" in merge(f"{a}:0.5", f"{broken}:0.5")
    assert not (tmp_path / "m").exists()
    # through the real console entry point: one line on stderr, no traceback
    run = subprocess.run([python, "-m", "llmft.cli", "merge", "--base", str(tiny_model), "--adapter", f"{a}:abc",
                          "--out", str(tmp_path / "m")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"llmft: error: --adapter {a}:abc: {a}:abc does not exist (expected PATH or PATH:WEIGHT with a number as "
        "WEIGHT, e.g. runs/a/final:0.7)"]


def test_parse_adapter_spec(adapters, tmp_path):
    a = adapters["a"]
    assert parse_adapter_spec(str(a)) == (a, 1.0)
    assert parse_adapter_spec(f"{a}:-0.25") == (a, -0.25)
    assert parse_adapter_spec(f"{a}/adapter_model.safetensors:2") == (a, 2.0)
    colon = tmp_path / "run:7"  # a ':' in the path, with or without a weight after it
    colon.mkdir()
    assert parse_adapter_spec(str(colon)) == (colon, 1.0)
    assert parse_adapter_spec(f"{colon}:0.5") == (colon, 0.5)
