"""The chunked loss (train.loss_chunk_tokens) equals the full-logits loss in value and gradients: plain rows,
isolated packed rows with their block-diagonal mask, LoRA with trained extras, and a whole training run."""

from __future__ import annotations

import pytest
import torch
from conftest import loss_and_grads, packed_batch, tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM

from llmft.config import LoraConfig, load_recipe
from llmft.model.adapters import apply_lora
from llmft.train.loop import train


@pytest.mark.parametrize("chunk", [7, 32, 4096])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(tiny_model, chunk):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    batch = packed_batch()
    ref_loss, ref_grads = loss_and_grads(model, batch, 0)
    loss, grads = loss_and_grads(model, batch, chunk)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 and float(ref_loss) > 1
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_chunked_loss_with_lora_and_trained_extras(tiny_model):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    model = apply_lora(base, LoraConfig(rank=4, alpha=8, target_modules="attention",
                                        trainable_extra=["embed", "norm"]))
    for n, p in model.named_parameters():  # move B off zero so the LoRA path carries gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    batch = packed_batch(seed=1)
    ref_loss, ref_grads = loss_and_grads(model, batch, 0)
    loss, grads = loss_and_grads(model, batch, 16)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert any("lora_A" in n for n in grads) and any("modules_to_save" in n for n in grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_training_with_the_chunked_loss_follows_the_same_path(tmp_path, tiny_model, text_file):
    losses = {}
    for chunk in (0, 24):
        recipe = tiny_recipe(tiny_model, text_file, tmp_path / f"c{chunk}", train={"max_steps": 4,
                             "loss_chunk_tokens": chunk}, data={"packing": "isolated"})
        losses[chunk] = train(load_recipe(write_recipe(tmp_path / f"c{chunk}.yaml", recipe))).losses
    assert losses[24] == pytest.approx(losses[0], abs=1e-5)
