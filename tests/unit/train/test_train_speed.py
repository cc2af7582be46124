"""The training-speed changes leave the numbers as they were: the fused chunked loss (gradients made in the forward
pass, no LM-head recompute) against the checkpointed chunks it replaced, and ``model.checkpoint_keep_attention``
(attention not recomputed) against plain checkpointing; per op, per gradient and over a whole training run."""

from __future__ import annotations

import pytest
import torch
from conftest import loss_and_grads, packed_batch, tiny_recipe, write_recipe
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import llmft.train.loss as loss_mod
from llmft.config import load_recipe
from llmft.model.load import build_model
from llmft.train.loop import train

FUSABLE = loss_mod._fusable

class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] = self.counts.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [7, 96])
def test_fused_chunked_loss_equals_the_checkpointed_chunks(tiny_model, monkeypatch, chunk):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    batch = packed_batch()  # isolated rows: prompts and padding are -100
    with CountOps() as ops:
        loss, grads = loss_and_grads(model, batch, chunk)
    with monkeypatch.context() as m:
        m.setattr(loss_mod, "_fusable", lambda head: False)
        with CountOps() as old_ops:
            ref_loss, ref_grads = loss_and_grads(model, batch, chunk)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 and float(ref_loss) > 1
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)
    # the head's matmul runs once per chunk in the forward pass plus twice for the gradients; before: once more
    head_mm = ops.counts["aten::mm"] - old_ops.counts["aten::mm"]
    assert head_mm < 0, (ops.counts["aten::mm"], old_ops.counts["aten::mm"])


def test_fused_loss_under_bf16_autocast_and_without_gradients(tiny_model, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    batch = packed_batch(seed=2)
    n = int((batch["labels"][:, 1:] != -100).sum())
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(loss_mod, "_fusable", FUSABLE if fused else lambda h: False)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_mod.causal_lm_loss(model, batch, n, 16)
        loss.backward()
        results[fused] = (float(loss.detach()), model.lm_head.weight.grad.clone(), model.model.norm.weight.grad.clone())
        with torch.no_grad():
            assert float(loss_mod.causal_lm_loss(model, batch, n, 16)) == pytest.approx(float(loss), abs=0.05)
    (lf, hf, nf), (lo, ho, no) = results[True], results[False]
    assert lf == pytest.approx(lo, abs=1e-3)
    torch.testing.assert_close(hf, ho, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(nf, no, atol=2e-3, rtol=2e-2)


def test_keep_attention_runs_attention_once_with_the_same_gradients(tiny_model, text_file, tmp_path):
    grads, counts = {}, {}
    for keep in (False, True):
        raw = tiny_recipe(tiny_model, text_file, tmp_path / "run", model={
            "gradient_checkpointing": True, "checkpoint_keep_attention": keep})
        recipe = load_recipe(write_recipe(tmp_path / f"r{keep}.yaml", raw))
        model = build_model(recipe.model, seed=0).model.train()
        ids = torch.randint(3, 500, (2, 128), generator=torch.Generator().manual_seed(0))
        with CountOps() as ops:
            loss = loss_mod.causal_lm_loss(model, {"input_ids": ids, "labels": ids.clone()}, 2 * 127, 32)
            loss.backward()
        counts[keep] = ops.counts["aten::_scaled_dot_product_flash_attention_for_cpu"]
        grads[keep] = {n: p.grad for n, p in model.named_parameters()}
    layers = model.config.num_hidden_layers
    assert counts == {False: 2 * layers, True: layers}  # forward + recompute, or the forward only
    for n in grads[False]:
        assert torch.equal(grads[True][n], grads[False][n]), n


def test_training_losses_are_those_of_the_previous_path(tiny_model, text_file, tmp_path, monkeypatch):
    """Four steps through ``train``: fused loss + kept attention against the checkpointed chunks + full
    recompute, on CPU in fp32."""
    losses = {}
    for new in (True, False):
        with monkeypatch.context() as m:
            if not new:
                m.setattr(loss_mod, "_fusable", lambda head: False)
            raw = tiny_recipe(tiny_model, text_file, tmp_path / f"run{new}",
                              model={"gradient_checkpointing": True, "checkpoint_keep_attention": new},
                              train={"max_steps": 4, "loss_chunk_tokens": 48})
            losses[new] = train(load_recipe(write_recipe(tmp_path / f"r{new}.yaml", raw))).losses
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], abs=1e-5), losses
