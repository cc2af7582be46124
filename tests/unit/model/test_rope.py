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
from llmft.model.load import build_model
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


# ------------------------------------------------------------------ extending a base that is already scaled


def scaled_base(tiny_model, tmp_path, rope: RopeConfig, max_pos: int | None = None):
    """A copy of the tiny model whose config.json already carries ``rope`` (as a published extended model does)."""
    import shutil

    out = tmp_path / f"base-{rope.type}"
    shutil.copytree(tiny_model, out)
    config = AutoConfig.from_pretrained(out)
    apply_rope_scaling(config, rope, max_pos)
    config.save_pretrained(out)
    return out


def llama3_reference(d: int, factor: float, orig: int, low: float, high: float, theta: float = THETA):
    """Llama 3.1's frequencies (Meta's reference code): keep short wavelengths, divide long ones, smooth between."""
    out = []
    for f in default_inv_freq(d, theta).tolist():
        wl = 2 * math.pi / f
        if wl < orig / high:
            out.append(f)
        elif wl > orig / low:
            out.append(f / factor)
        else:
            smooth = (orig / wl - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def test_linear_on_a_linear_base_equals_the_product_in_one_go(tiny_model, tmp_path):
    """x8 then x2 == x16 over the original length: the cos/sin, the config and the context length."""
    base8 = scaled_base(tiny_model, tmp_path, RopeConfig(type="linear", factor=8.0))
    assert AutoConfig.from_pretrained(base8).max_position_embeddings == ORIG * 8
    twice = extended(base8, RopeConfig(type="linear", factor=2.0))
    once = extended(tiny_model, RopeConfig(type="linear", factor=16.0))
    m = torch.arange(ORIG * 16)
    torch.testing.assert_close(rotary(twice, m), rotary(once, m), atol=0, rtol=0)
    assert twice.config.rope_parameters == once.config.rope_parameters
    assert twice.config.max_position_embeddings == once.config.max_position_embeddings == ORIG * 16


def test_ntk_on_a_linear_base_raises_theta_under_the_interpolation(tiny_model, tmp_path):
    base8 = scaled_base(tiny_model, tmp_path, RopeConfig(type="linear", factor=8.0))
    model = extended(base8, RopeConfig(type="ntk", factor=2.0))
    d = head_dim(model)
    m = torch.arange(ORIG * 16)
    ref = cos_sin(default_inv_freq(d, THETA * 2.0 ** (d / (d - 2))) / 8.0, m)
    torch.testing.assert_close(rotary(model, m), ref, atol=2e-5, rtol=0)
    assert model.config.max_position_embeddings == ORIG * 16


@pytest.mark.parametrize("kind", ["yarn", "llama3", "ntk"])
def test_a_llama3_base_extended_x2_matches_an_independent_formula(tiny_model, tmp_path, kind):
    """A Llama-3.1-shaped base (llama3 factor 8 over ORIG, serving 16 * ORIG positions) extended x2 to 32 * ORIG:
    yarn becomes YaRN over ORIG with s = 32 (not x2 over the base's 16 * ORIG, which would undo the base's
    interpolation of the low frequencies), llama3 becomes llama3 factor 16 over ORIG, ntk raises theta."""
    base = scaled_base(tiny_model, tmp_path, RopeConfig(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0), max_pos=16 * ORIG)
    rope = {"yarn": RopeConfig(type="yarn", factor=2.0), "ntk": RopeConfig(type="ntk", factor=2.0),
            "llama3": RopeConfig(type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0)}[kind]
    model = extended(base, rope)
    d = head_dim(model)
    m = torch.arange(ORIG * 32)
    if kind == "yarn":
        inv_freq, scale = yarn_reference(d, 32.0, ORIG)
    elif kind == "llama3":
        inv_freq, scale = llama3_reference(d, 16.0, ORIG, 1.0, 4.0), 1.0
    else:
        inv_freq, scale = llama3_reference(d, 8.0, ORIG, 1.0, 4.0, THETA * 2.0 ** (d / (d - 2))), 1.0
    torch.testing.assert_close(rotary(model, m), cos_sin(inv_freq, m, scale), atol=3e-5, rtol=0)
    assert model.config.max_position_embeddings == ORIG * 32
    if kind != "ntk":
        assert model.config.rope_parameters["original_max_position_embeddings"] == ORIG
        assert model.config.rope_parameters["factor"] == {"yarn": 32.0, "llama3": 16.0}[kind]
    if kind == "yarn":  # transformers' YaRN check (it warns on every load otherwise): factor = L' / L0
        params = model.config.rope_parameters
        assert params["factor"] == model.config.max_position_embeddings / params["original_max_position_embeddings"]


def test_yarn_on_a_yarn_base_is_yarn_of_the_product_over_the_original_length(tiny_model, tmp_path):
    base = scaled_base(tiny_model, tmp_path, RopeConfig(type="yarn", factor=4.0))
    model = extended(base, RopeConfig(type="yarn", factor=2.0))
    inv_freq, scale = yarn_reference(head_dim(model), 8.0, ORIG)
    m = torch.arange(ORIG * 8)
    torch.testing.assert_close(rotary(model, m), cos_sin(inv_freq, m, scale), atol=2e-5, rtol=0)


@pytest.mark.parametrize("base_rope, rope, fix", [
    (RopeConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
     RopeConfig(type="linear", factor=2.0), "use type llama3, yarn or ntk"),
    (RopeConfig(type="linear", factor=8.0), RopeConfig(type="yarn", factor=2.0), "use type linear"),
    (RopeConfig(type="yarn", factor=4.0), RopeConfig(type="dynamic", factor=2.0), "use type yarn"),
    (RopeConfig(type="dynamic", factor=4.0), RopeConfig(type="linear", factor=2.0), "start from the base"),
])
def test_combinations_that_do_not_compose_are_refused_with_the_fix(tiny_model, tmp_path, base_rope, rope, fix):
    from llmft.model.load import ModelLoadError

    base = scaled_base(tiny_model, tmp_path, base_rope)
    with pytest.raises(ModelLoadError, match=f"model.rope: the base already has {base_rope.type} RoPE scaling.*{fix}"
                       ) as refused:
        extended(base, rope)
    assert f"(factor {base_rope.factor:g} over {ORIG} positions)" in str(refused.value)  # the original length


def test_training_on_a_scaled_base_exports_the_composed_config(tiny_model, tmp_path, text_file):
    """Progressive extension through the real loop: a x8 linear base trained at x2 more exports linear x16 over the
    original length, and the reloaded checkpoint computes those angles."""
    from conftest import tiny_recipe, write_recipe

    from llmft.config import load_recipe
    from llmft.train.loop import train

    base8 = scaled_base(tiny_model, tmp_path, RopeConfig(type="linear", factor=8.0))
    recipe = tiny_recipe(base8, text_file, tmp_path / "run", train={"max_steps": 1})
    recipe["model"].update(rope={"type": "linear", "factor": 2.0}, max_seq_len=512)
    result = train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    config = AutoConfig.from_pretrained(result.final_dir)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 16.0
    assert config.max_position_embeddings == ORIG * 16
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    m = torch.arange(ORIG * 16)
    torch.testing.assert_close(rotary(reloaded, m), rotary(base(tiny_model), m / 16.0), atol=3e-5, rtol=0)
