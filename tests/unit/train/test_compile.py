"""``model.compile``: each decoder layer compiled on its own trains to the same numbers as eager, through the real
entry point; and the combination it cannot serve is rejected at load."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from safetensors.torch import load_file

from llmft.config import RecipeError, load_recipe
from llmft.train.loop import train


def run(tmp_path, tiny_model, text_file, name: str, **model):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / name, model=model, train={"max_steps": 3})
    result = train(load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe)), resume=False)
    return result.losses, load_file(result.final_dir / "model.safetensors")


@pytest.mark.slow  # inductor compiles the layer (forward + backward) with gcc: ~15-30 s per variant on 2 cores
@pytest.mark.parametrize("checkpointing", [{}, {"gradient_checkpointing": True, "checkpoint_keep_attention": True}],
                         ids=["plain", "checkpointing"])
def test_compiled_layers_train_like_eager(tmp_path, tiny_model, text_file, checkpointing):
    from torch._dynamo.utils import counters

    ref_losses, ref_weights = run(tmp_path, tiny_model, text_file, "eager")
    torch._dynamo.reset()  # a fresh compile, not a cache hit from another test or a fallback at the recompile limit
    counters.clear()
    losses, weights = run(tmp_path, tiny_model, text_file, "compiled", compile=True, **checkpointing)
    # one graph, shared by both layers: a KV cache in the forward would make each layer recompile (model.compile
    # turns it off), and past dynamo's recompile limit the remaining layers would run eager
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(losses) == 3 and max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5, (losses, ref_losses)
    assert weights.keys() == ref_weights.keys()  # no _orig_mod. prefix: exports are unchanged
    # lr 3e-3 moves each weight by ~1e-3 a step; float-rounding differences in the gradients, divided by Adam's
    # sqrt(v), leave the compiled run within 1e-4 of the eager one
    for k in ref_weights:
        torch.testing.assert_close(weights[k], ref_weights[k], atol=1e-4, rtol=0, msg=k)


def test_compile_with_activation_offload_is_rejected(tiny_model, text_file, tmp_path):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run", model={
        "compile": True, "gradient_checkpointing": True, "activation_offload": True})
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    (msg,) = info.value.messages
    assert "model.compile: cannot be combined with model.activation_offload" in msg and "Fix: remove" in msg
