"""QLoRA (method: qlora) on a tiny LLaMA through the real entry points, on CPU: the base Linear layers load 4-bit
(bitsandbytes Linear4bit), only the adapters and the requested extra modules train, the loss falls, the adapter
reloads with plain transformers + peft on the unquantized base, ``llmft merge`` keeps the RoPE-scaled config, and
a re-run resumes to the identical adapter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import tiny_recipe, write_recipe
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmft.cli import main
from llmft.config import RecipeError, load_recipe
from llmft.model.adapters import lora_parameter_count
from llmft.model.load import ModelLoadError, count_parameters, require_bitsandbytes
from llmft.train import checkpoint as ckpt
from llmft.train.loop import train

LORA = {"rank": 8, "alpha": 16, "target_modules": "all_linear", "trainable_extra": ["norm"]}
# float32 compute: bf16 matmuls on CPU are slow and add rounding noise to a 10-step test
QLORA = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def qlora_recipe(tmp_path: Path, tiny_model: Path, text_file: Path, name: str = "qlora", **sections) -> Path:
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / name, method="qlora", lora=dict(LORA),
                         qlora=dict(QLORA), **sections)
    recipe["train"]["lr"] = 1e-2  # adapters on the random tiny model need a high lr to move in 10 steps
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, text_file):
    """One QLoRA run (NF4 + double quant, r=8 on all linear layers, norms trained), 10 steps at a constant lr,
    checkpoint at step 5."""
    tmp = tmp_path_factory.mktemp("qlora")
    path = qlora_recipe(tmp, tiny_model, text_file, train={"max_steps": 10, "schedule": "constant"},
                        checkpoint={"every_steps": 5})
    return train(load_recipe(path)), path


def test_qlora_trains_a_4bit_base(trained, tiny_model, capsys):
    result, path = trained
    losses = result.losses
    assert len(losses) == 10 and all(x == x for x in losses)
    assert losses[0] == pytest.approx(6.238, abs=0.02)  # ln(512): the random tiny model
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    model = result.model
    # every targeted projection is a 4-bit bitsandbytes layer holding NF4 weights under its LoRA wrapper
    base_layers = [m.base_layer for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(base_layers) == 2 * 7
    assert all(type(m) is bnb.nn.Linear4bit for m in base_layers)
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in base_layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable), sorted(trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == lora_parameter_count(
        AutoConfig.from_pretrained(tiny_model), load_recipe(path).lora)


def test_saved_adapter_reloads_on_the_unquantized_base(trained, tiny_model, book_text):
    result, _ = trained
    final = result.final_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= {p.name for p in final.iterdir()}
    saved = load_file(final / "adapter_model.safetensors")
    assert all("lora_" in k or "layernorm" in k or k.endswith("norm.weight") for k in saved), sorted(saved)
    config = AutoConfig.from_pretrained(final)
    assert getattr(config, "quantization_config", None) is None
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    base = AutoModelForCausalLM.from_pretrained(tiny_model, config=config, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, final).eval()
    assert not any("Linear4bit" in type(m).__name__ for m in reloaded.modules())
    bare = AutoModelForCausalLM.from_pretrained(tiny_model, config=config, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tiny_model)(book_text[30_000:34_000], add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[:128], ids[128:256]])  # book text: random ids hit rare embeddings, where one logit in
    result.model.eval()  # 10^5 swings by up to 0.5 between the NF4 and the fp32 base
    with torch.no_grad():
        plain, quantized, no_adapter = reloaded(x).logits, result.model(x).logits, bare(x).logits
    assert torch.isfinite(plain).all()
    # same adapter on W0 vs dequant(quant(W0)): close, not equal (measured mean |diff| 0.0013-0.0016), and far
    # below what the adapter itself changes (mean 0.17)
    diff, effect = (plain - quantized).abs().mean(), (plain - no_adapter).abs().mean()
    assert 0 < diff < 0.01 and diff < effect / 20, (diff, effect)


def test_merge_into_the_unquantized_base_keeps_rope(trained, tiny_model, tmp_path):
    result, _ = trained
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model), "--adapter", str(result.final_dir), "--out", str(out),
                 "--dtype", "float32"]) == 0
    config = AutoConfig.from_pretrained(out)
    assert getattr(config, "quantization_config", None) is None
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.max_position_embeddings == 128
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, config=AutoConfig.from_pretrained(result.final_dir),
                                                dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, result.final_dir).eval()  # W0 + BA, unmerged
    x = torch.randint(0, 500, (2, 128))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, reference(x).logits, atol=1e-4, rtol=0)


def test_rerun_resumes_from_checkpoint_to_identical_adapter(trained):
    result, path = trained
    straight = load_file(result.final_dir / "adapter_model.safetensors")
    step5 = ckpt.latest_complete(result.run_dir)
    assert step5 is not None and step5.name == ckpt.step_dir_name(5)
    state = load_file(step5 / "state" / "model.safetensors")  # only the trainable parameters, not the 4-bit base
    assert state.keys() == {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in state.values()) == count_parameters(result.model)[0]
    shutil.rmtree(result.final_dir)

    resumed = train(load_recipe(path))  # rebuilds and re-quantizes the base from model.name
    assert resumed.resumed_from == 5 and len(resumed.losses) == 5
    again = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert again.keys() == straight.keys()
    assert all(torch.equal(again[k], straight[k]) for k in straight)  # bitwise: the CPU 4-bit path is deterministic


def test_qlora_recipe_rules(tmp_path, tiny_model, text_file, capsys):
    base = tiny_recipe(tiny_model, text_file, tmp_path / "r")
    path = write_recipe(tmp_path / "a.yaml", {**base, "method": "lora", "qlora": {}})
    line = path.read_text().splitlines().index("qlora: {}") + 1
    expected = (f"{path}:{line}: qlora: the qlora section applies only to method: qlora, but method is 'lora'. "
                "Fix: set method: qlora, or remove the qlora section")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.messages == [expected]
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2  # through the CLI: exit 2, the same line
    assert expected in capsys.readouterr().err
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path / "b.yaml", {**base, "method": "qlora",
                                                       "qlora": {"quant_type": "int4", "bits": 4}}))
    assert any("qlora.quant_type: got \"int4\"" in m for m in e.value.messages), e.value.messages
    assert any("qlora.bits: unknown key" in m for m in e.value.messages), e.value.messages
    defaults = load_recipe(write_recipe(tmp_path / "c.yaml", {**base, "method": "qlora"}))
    assert defaults.qlora.quant_type == "nf4" and defaults.qlora.double_quant and \
        defaults.qlora.compute_dtype == "bfloat16" and defaults.qlora.quant_storage_dtype == "uint8"
    assert defaults.lora.rank == 8 and defaults.train.optimizer == "adamw"


def test_qlora_zero3_needs_quant_storage_in_the_training_dtype(tmp_path, tiny_model, text_file, capsys):
    """ZeRO-3 shards all parameters as one dtype: uint8-packed 4-bit weights are refused with the fix, whether
    stage 3 comes from deepspeed.stage or from a DeepSpeed JSON; the matching dtype validates."""
    base = tiny_recipe(tiny_model, text_file, tmp_path / "r", method="qlora", train={"precision": "bf16"})
    base["model"]["init"] = "pretrained"
    path = write_recipe(tmp_path / "z3.yaml", {**base, "deepspeed": {"stage": 3}})
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "qlora.quant_storage_dtype: is 'uint8', but DeepSpeed ZeRO-3 shards every parameter in one dtype " \
           "(bfloat16, from train.precision bf16)" in err
    assert "Fix: set qlora.quant_storage_dtype: bfloat16, or use ZeRO stage 2" in err and "Traceback" not in err
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}}')
    assert (
        main(["validate", str(write_recipe(tmp_path / "json.yaml", {**base, "deepspeed": {"config": str(ds_json)}}))])
        == 2
    )
    assert "Fix: set qlora.quant_storage_dtype: bfloat16" in capsys.readouterr().err
    assert main(["validate", str(path), "qlora.quant_storage_dtype=bfloat16"]) == 0
    assert main(["validate", str(path), "deepspeed.stage=2"]) == 0  # ZeRO-2 keeps uint8 storage


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_run_on_cpu(tmp_path, tiny_model, text_file, optimizer):
    path = qlora_recipe(tmp_path, tiny_model, text_file, train={"max_steps": 2, "optimizer": optimizer})
    result = train(load_recipe(path))
    assert len(result.losses) == 2 and all(x == x for x in result.losses)
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)  # it stepped


@pytest.mark.parametrize("method, optimizer", [("qlora", "adamw"), ("lora", "adamw_8bit")])
def test_missing_bitsandbytes_is_one_line(tmp_path, tiny_model, text_file, method, optimizer):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "r", method=method, lora=dict(LORA),
                         train={"max_steps": 1, "optimizer": optimizer})
    recipe["model"]["init"] = "pretrained"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    blocked = ("import sys; sys.modules['bitsandbytes'] = None; from llmft.cli import main; "
               f"sys.exit(main(['train', {str(path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmft: error")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    what = "method: qlora" if method == "qlora" else "train.optimizer: adamw_8bit"
    assert len(errors) == 1 and errors[0].startswith(f"llmft: error: {what} needs bitsandbytes, which cannot be "
                                                     "imported here (No module named 'bitsandbytes"), errors
    assert errors[0].endswith("). Fix: pip install 'bitsandbytes>=0.50.2'")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bitsandbytes_without_its_cuda_library_on_a_cuda_machine_is_one_line(monkeypatch):
    import bitsandbytes.cextension as cext

    require_bitsandbytes("method: qlora")  # this machine: the CPU backend, fine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine whose bnb build has no CUDA lib
    monkeypatch.setattr(cext, "lib", object.__new__(cext.ErrorHandlerMockBNBNativeLibrary))
    with pytest.raises(ModelLoadError, match=r"^method: qlora: bitsandbytes has no working CUDA library for this "
                                             r"machine .*Fix: reinstall bitsandbytes"):
        require_bitsandbytes("method: qlora")
