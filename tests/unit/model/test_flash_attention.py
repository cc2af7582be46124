"""The flash_attention_2 path never computes in fp32, and isolates packed examples with varlen ``cu_seq_lens``.

flash-attn takes only bf16/fp16. With fp32 master weights, a forward outside autocast hands it fp32 queries: on a
GPU that crashes at the first evaluation of a LoRA/QLoRA run. Here transformers' real flash_attention_2 path runs on
CPU with stand-in kernels that refuse fp32 as flash-attn does (llmft/testing/cpu_flash_attention.py), through a training
run with perplexity and passkey evaluation; its losses equal the SDPA block-mask path within bf16 tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe, write_recipe

from llmft.config import RecipeError, load_recipe
from llmft.model import load as model_load
from llmft.testing.cpu_flash_attention import cpu_flash_attention
from llmft.train.loop import train


def run_packed(tmp_path, tiny_model, book_text, attention: str, name: str):
    docs = [book_text[i : i + 90 + (i * 7) % 500] for i in range(0, 30_000, 600)]  # 50 documents, 90-590 chars
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    recipe = tiny_recipe(tiny_model, data, tmp_path / name, train={"max_steps": 3, "precision": "bf16"},
                         eval={"every_steps": 3, "lengths": [64, 128], "max_windows": 2,
                               "passkey": {"lengths": [200], "depths": [0.0, 1.0], "trials": 2}})
    recipe["model"].update(attention=attention, rope={"type": "linear", "factor": 8.0}, max_seq_len=128)
    recipe["data"].update(packing="isolated")
    result = train(load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe)))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}  # ppl and passkey rows of step 3
    return result.losses, evals


def test_flash_path_trains_and_evaluates_in_bf16_and_matches_sdpa(tmp_path, tiny_model, book_text):
    with cpu_flash_attention() as calls:
        flash_losses, flash_eval = run_packed(tmp_path, tiny_model, book_text, "flash_attention_2", "flash")
    assert calls["varlen"] > 0 and calls["dense"] > 0  # packed training rows (varlen) and evaluation (dense)
    assert calls["torch.float32"] == 0 and calls["torch.bfloat16"] > 0
    sdpa_losses, sdpa_eval = run_packed(tmp_path, tiny_model, book_text, "sdpa", "sdpa")
    torch.testing.assert_close(torch.tensor(flash_losses), torch.tensor(sdpa_losses), rtol=2e-2, atol=0)
    for key in ("eval/ppl@64", "eval/ppl@128"):
        assert flash_eval[key] == pytest.approx(sdpa_eval[key], rel=2e-2), key
    assert "eval/passkey@200" in flash_eval


def test_the_stand_in_kernel_refuses_fp32_as_flash_attn_does(tiny_model):
    """What the training run above guards against: a plain fp32 forward (no autocast) on fp32 weights."""
    from transformers import AutoModelForCausalLM

    with cpu_flash_attention():
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="flash_attention_2")
        x = torch.randint(0, 500, (1, 16))
        with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
            model(input_ids=x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(input_ids=x).logits.shape == (1, 16, 512)


def test_flash_attention_with_fp32_training_is_refused_at_validation(tmp_path, tiny_model, text_file):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run", train={"precision": "fp32"})
    recipe["model"]["attention"] = "flash_attention_2"
    with pytest.raises(RecipeError, match=r"model\.attention.*fp32.*Fix: set train\.precision: bf16"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    recipe["train"]["precision"] = "bf16"
    load_recipe(write_recipe(tmp_path / "r.yaml", recipe))  # the fix works


@pytest.mark.parametrize("cuda, flash, precision, expected, why", [
    (False, False, "bf16", "sdpa", "no CUDA device"),
    (True, False, "bf16", "sdpa", "flash-attn is not installed"),
    (True, True, "bf16", "flash_attention_2", "flash-attn is installed"),
    (True, True, "fp32", "sdpa", "computes in fp32"),
])
def test_auto_attention_choice(monkeypatch, cuda, flash, precision, expected, why):
    """``auto`` on every kind of machine (the availability checks are set, so this passes on a GPU box too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(model_load, "flash_attn_available", lambda: flash)
    impl, reason = model_load.resolve_attention("auto", precision)
    assert impl == expected and why in reason


def test_explicit_flash_attention_refused_in_fp32_or_without_the_package(monkeypatch):
    monkeypatch.setattr(model_load, "flash_attn_available", lambda: True)
    with pytest.raises(model_load.ModelLoadError, match="only in bf16 or fp16"):
        model_load.resolve_attention("flash_attention_2", "fp32")
    assert model_load.resolve_attention("flash_attention_2", "bf16")[0] == "flash_attention_2"
    monkeypatch.setattr(model_load, "flash_attn_available", lambda: False)
    with pytest.raises(model_load.ModelLoadError, match="cannot run here"):
        model_load.resolve_attention("flash_attention_2", "bf16")


def test_llmft_eval_runs_flash_attention_in_its_dtype_and_refuses_float32(tiny_model, tmp_path, book_text, capsys):
    """``llmft eval --attention flash_attention_2``: float32 is refused (exit 2, what to set); bfloat16 runs the
    kernel in bf16 only."""
    from llmft.cli import main

    books = tmp_path / "books"
    books.mkdir()
    (books / "1.txt").write_text(book_text[:4000], encoding="utf-8")
    args = ["eval", "--ppl", "pg19", "--data", str(books), "--model", str(tiny_model), "--lengths", "32",
            "--attention", "flash_attention_2", "--out", str(tmp_path / "out")]
    with cpu_flash_attention() as calls:
        assert main(args) == 2
        assert "only in bf16 or fp16" in capsys.readouterr().err and calls["dense"] == 0
        assert main([*args, "--dtype", "bfloat16"]) == 0
    assert calls["dense"] > 0 and calls["torch.float32"] == 0
    assert json.loads((tmp_path / "out" / "ppl.json").read_text())
