"""Gradient checkpointing as the recipe sets it: every n-th layer, activation offload. Same loss and gradients
as without checkpointing (fp32 on CPU), and the layers the recipe names are the ones recomputed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe, write_recipe

from llmft.config import RecipeError, load_recipe
from llmft.model.load import build_model
from llmft.train.loss import causal_lm_loss


def loss_and_grads(tmp_path, tiny_model, text_file, **model_fields):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run")
    recipe["model"] |= model_fields
    built = build_model(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)).model, dtype=torch.float32)
    model = built.model.train()
    ids = torch.randint(3, 500, (2, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(128).expand(2, 128)}
    loss = causal_lm_loss(model, batch, 2 * 127)
    loss.backward()
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, flags


@pytest.mark.parametrize("fields, flags", [
    ({"gradient_checkpointing": True}, [True, True]),
    ({"gradient_checkpointing": True, "checkpoint_every_n_layers": 2}, [True, False]),
    ({"gradient_checkpointing": True, "activation_offload": True}, [True, True]),
])
def test_checkpointing_variants_give_the_same_loss_and_gradients(tmp_path, tiny_model, text_file, fields, flags):
    ref_loss, ref_grads, ref_flags = loss_and_grads(tmp_path, tiny_model, text_file)
    assert ref_flags == [False, False]
    loss, grads, got_flags = loss_and_grads(tmp_path, tiny_model, text_file, **fields)
    assert got_flags == flags
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("field, value", [("checkpoint_every_n_layers", 2), ("activation_offload", True)])
def test_checkpointing_options_without_checkpointing_are_an_error(tmp_path, tiny_model, text_file, field, value):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run")
    recipe["model"][field] = value
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert any(f"model.{field}: applies only with gradient checkpointing" in m for m in e.value.messages), \
        e.value.messages
