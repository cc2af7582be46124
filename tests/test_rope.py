"""RoPE scaling: the extended model's rotary angles match independent implementations of each method.

Each reference below is written from the papers (PI, NTK-aware, dynamic NTK, YaRN, Llama 3.1), not taken from
transformers, and compared with the cos/sin that the scaled transformers model actually computes.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmft.config import ModelConfig, RopeConfig
from llmft.model.build import build_model
from llmft.model.rope import apply_rope_scaling

THETA, ORIG = 10000.0, 32


def rotary(model, positions: torch.Tensor):
    """cos, sin the model computes for these (possibly fractional) positions; shapes (1, n, d)."""
    x = torch.zeros(1, positions.numel(), 1)
    return model.model.rotary_emb(x, positions.view(1, -1).float())


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0):
    freqs = positions.view(-1, 1).double() * inv_freq.view(1, -1).double()  # (n, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).float()[None], (emb.sin() * scale).float()[None]  # (1, n, d) like the model


def default_inv_freq(d: int, theta: float = THETA) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def extended(tiny_model, rope: RopeConfig, max_pos: int | None = None):
    cfg = ModelConfig(name=str(tiny_model), rope=rope, max_seq_len=128, dtype="float32", attention="sdpa",
                      max_position_embeddings=max_pos)
    return build_model(cfg).model


def base(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model)


def head_dim(model) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


@pytest.mark.parametrize("factor", [4.0, 5.5, 8.0])
def test_linear_angle_at_m_equals_base_angle_at_m_over_factor(tiny_model, factor):
    scaled, plain = extended(tiny_model, RopeConfig(type="linear", factor=factor)), base(tiny_model)
    m = torch.arange(0, int(ORIG * factor))
    cos_s, sin_s = rotary(scaled, m)
    cos_b, sin_b = rotary(plain, m / factor)
    # angles reach ~180 rad, where one float32 ulp is ~1.5e-5: (m / s) * f and m * (f / s) differ by that
    torch.testing.assert_close(cos_s, cos_b, atol=3e-5, rtol=0)
    torch.testing.assert_close(sin_s, sin_b, atol=3e-5, rtol=0)
    assert scaled.config.max_position_embeddings == round(ORIG * factor)
    assert scaled.config.rope_parameters["rope_type"] == "linear"
    assert scaled.config.rope_parameters["factor"] == factor


def test_ntk_rescales_theta(tiny_model):
    model = extended(tiny_model, RopeConfig(type="ntk", factor=4.0))
    d = head_dim(model)
    m = torch.arange(128)
    ref = cos_sin(default_inv_freq(d, THETA * 4.0 ** (d / (d - 2))), m)
    torch.testing.assert_close(rotary(model, m), ref, atol=1e-5, rtol=0)
    assert model.config.max_position_embeddings == 128


def test_dynamic_ntk_matches_reference_beyond_original_length(tiny_model):
    factor = 4.0
    model = extended(tiny_model, RopeConfig(type="dynamic", factor=factor))
    assert model.config.max_position_embeddings == ORIG  # transformers reads it as the original length
    d = head_dim(model)
    short = torch.arange(ORIG)
    torch.testing.assert_close(rotary(model, short), cos_sin(default_inv_freq(d), short), atol=1e-5, rtol=0)
    seq_len = 100  # > ORIG: base' = base * ((s * L / L0) - (s - 1)) ** (d / (d - 2))
    long = torch.arange(seq_len)
    new_theta = THETA * ((factor * seq_len / ORIG) - (factor - 1)) ** (d / (d - 2))
    torch.testing.assert_close(rotary(model, long), cos_sin(default_inv_freq(d, new_theta), long), atol=1e-5, rtol=0)


def yarn_reference(d: int, factor: float, orig: int, beta_fast: float = 32, beta_slow: float = 1):
    """YaRN (Peng et al. 2023, reference code): ramp between interpolation and extrapolation over dims."""

    def correction_dim(rotations):
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = default_inv_freq(d)
    inv_freq = (pos_freqs / factor) * (1 - extrapolation_weight) + pos_freqs * extrapolation_weight
    return inv_freq, 0.1 * math.log(factor) + 1.0


@pytest.mark.parametrize("factor", [4.0, 6.0])
def test_yarn_matches_reference(tiny_model, factor):
    model = extended(tiny_model, RopeConfig(type="yarn", factor=factor))
    inv_freq, mscale = yarn_reference(head_dim(model), factor, ORIG)
    m = torch.arange(int(ORIG * factor))
    torch.testing.assert_close(rotary(model, m), cos_sin(inv_freq, m, mscale), atol=1e-5, rtol=0)
    assert model.config.rope_parameters["original_max_position_embeddings"] == ORIG


def test_llama3_matches_reference(tiny_model):
    factor, low, high = 8.0, 1.0, 4.0
    model = extended(tiny_model, RopeConfig(type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high))
    d = head_dim(model)
    freqs = default_inv_freq(d)
    low_wl, high_wl = ORIG / low, ORIG / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / factor)
        else:
            smooth = (ORIG / wl - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    m = torch.arange(256)
    torch.testing.assert_close(rotary(model, m), cos_sin(torch.tensor(out, dtype=torch.float64), m), atol=1e-5, rtol=0)


def test_scaled_config_round_trips_through_save_pretrained(tiny_model, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model)
    apply_rope_scaling(config, RopeConfig(type="linear", factor=5.5))
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert again.rope_parameters["rope_type"] == "linear" and again.rope_parameters["factor"] == 5.5
    assert again.max_position_embeddings == 176  # round(32 * 5.5)
