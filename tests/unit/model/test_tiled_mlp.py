"""``model.tiled_mlp``: DeepSpeed's TiledMLP on every decoder layer gives the same loss and gradients, for full
fine-tuning and for LoRA on the MLP projections, and keeps fewer activations for the backward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import packed_batch
from transformers import AutoModelForCausalLM

from llmft.model.load import ModelLoadError, tile_mlps
from llmft.train.loss import causal_lm_loss


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    n = int((batch["labels"][:, 1:] != -100).sum())
    loss = causal_lm_loss(model, batch, n)
    loss.backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, batch, 1)
    return total


@pytest.mark.parametrize("lora", [False, True])
def test_tiled_mlp_gives_the_same_loss_and_gradients(tiny_model, lora):
    batch = packed_batch(seed=1, seq_len=96)
    models = []
    for tiled in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        if lora:
            from llmft.config import LoraConfig
            from llmft.model.adapters import apply_lora

            model = apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules="all_linear"))
            for n, p in model.named_parameters():  # B is zero at init: make the adapters matter
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
        if tiled:
            assert tile_mlps(model, 3) == 2  # 96 tokens in 3 tiles of 32, both layers
        models.append(model)
    (loss, grads), (tiled_loss, tiled_grads) = (_loss_and_grads(m, batch) for m in models)
    assert abs(loss - tiled_loss) < 1e-6
    assert grads.keys() == tiled_grads.keys() and any("mlp" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(tiled_grads[k], grads[k], atol=1e-6, rtol=1e-5)
    if not lora:  # the MLP's (s, intermediate) activations are not kept: 96 x 128 x 4 B x 5 per layer saved
        assert _saved_bytes(models[0], batch) - _saved_bytes(models[1], batch) > 2 * 4 * 96 * 128 * 4


def test_auto_tiles_by_hidden_size_and_a_model_without_mlps_is_refused(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tile_mlps(model, "auto")  # hidden 64: 96 tokens -> 2 tiles
    batch = packed_batch(seed=2, seq_len=96)
    with torch.no_grad():
        assert torch.isfinite(causal_lm_loss(model, batch, 1))
    with pytest.raises(ModelLoadError, match="no LLaMA-style MLPs"):
        tile_mlps(torch.nn.Linear(2, 2), 2)
