"""Model loading: attention backend choice, safetensors only, trust_remote_code off by default."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmft.config import ModelConfig
from llmft.model.load import ModelLoadError, build_model, count_parameters, resolve_attention


def test_explicit_backends_pass_through():
    assert resolve_attention("eager")[0] == "eager" and resolve_attention("sdpa")[0] == "sdpa"


def test_trust_remote_code_is_off_unless_the_recipe_sets_it():
    assert ModelConfig(name="org/model", max_seq_len=8).trust_remote_code is False


def test_pickle_weights_are_refused(tiny_model, tmp_path):
    unsafe = tmp_path / "unsafe"
    shutil.copytree(tiny_model, unsafe)
    state = build_model(ModelConfig(name=str(tiny_model), max_seq_len=32, dtype="float32")).model.state_dict()
    torch.save(state, unsafe / "pytorch_model.bin")
    (unsafe / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load model weights"):
        build_model(ModelConfig(name=str(unsafe), max_seq_len=32, dtype="float32"))


def test_random_init_is_seeded(tiny_model):
    cfg = ModelConfig(name=str(tiny_model), init="random", max_seq_len=32, dtype="float32")
    a, b, c = (build_model(cfg, seed=s).model for s in (1, 1, 2))
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    trainable, total = count_parameters(a)
    assert trainable == total == sum(p.numel() for p in a.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    x = torch.randint(0, 500, (2, 32))
    grads = []
    for ckpt in (False, True):
        model = build_model(ModelConfig(name=str(tiny_model), max_seq_len=32, dtype="float32",
                                        gradient_checkpointing=ckpt)).model.train()
        model(input_ids=x, labels=x).loss.backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
