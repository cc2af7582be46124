"""RoPE scaling: turn a recipe's ``model.rope`` into transformers' ``config.rope_parameters``.

transformers (5.x) computes the rotary frequencies from ``config.rope_parameters`` (``rope_type``, ``factor``,
``rope_theta``, ...). We only write those parameters; the model's own rotary module does the math, so the
extended checkpoint reloads with plain ``AutoModelForCausalLM.from_pretrained`` and needs no llmft code.

Per method (L = original length, L' = target length, s = factor = L'/L, d = head dim):

=========  =========================================================  ===========================
type       what changes                                               max_position_embeddings
=========  =========================================================  ===========================
linear     position m -> m / s (Position Interpolation)               L'
ntk        rope_theta -> theta * s ** (d / (d - 2)) (static NTK)       L'
dynamic    theta rescaled at run time once the input exceeds L        L (transformers reads it as L)
yarn       per-frequency ramp between interpolation/extrapolation     L'
llama3     per-frequency interpolation (Llama 3.1)                    L'
=========  =========================================================  ===========================

Extending a base that is already scaled (progressive extension 4K -> 32K -> 128K, every Llama-3.1 base): the
recipe's factor s2 extends the base's *current* context C = its ``max_position_embeddings``, so the target is
L' = C * s2. With the base scaled by s1 over its original length L0 (C = L0 * s1 for linear and YaRN bases;
Llama 3.1 has s1 = 8 and C = 131072 = 16 * 8192), the result is one config over L0:

==================  ===========================  ==========================================================
base                recipe                       result
==================  ===========================  ==========================================================
linear s1           linear s2                    linear s1*s2 (exact: positions m / (s1 s2))
linear s1, llama3   ntk s2                       the base's scaling with theta * s2 ** (d / (d - 2)) (exact:
                                                 NTK is a new base theta, the scaling stays on top)
yarn s1             yarn s2                      yarn over L0 with s = L' / L0 (the YaRN paper's progressive
                                                 recipe: s = 16, then s = 32 from the s = 16 checkpoint)
llama3 s1           llama3 s2                    llama3 s1*s2 over L0, the base's low/high frequency factors
                                                 (Meta's factor: 8 serves 16 * L0)
llama3 s1           yarn s2                      yarn over L0 with s = L' / L0 (Llama 3.1 x2: 262144 / 8192 =
                                                 32): the high frequencies stay as llama3 kept them, the lowest
                                                 are divided by s, the ramp between follows YaRN
anything else       (dynamic bases, dynamic      refused (exit 2) with the fix: no single transformers config
                    recipes, linear over yarn    has those frequencies, and a checkpoint must reload with plain
                    or llama3, ...)              transformers
==================  ===========================  ==========================================================

A base scaled by NTK looks like an unscaled one with a larger ``rope_theta`` and is extended as such. YaRN's
attention factor (0.1 ln s + 1 on cos and sin, so attention logits scale by its square) follows the new s unless
``rope.attention_factor`` sets it: 1.35 for Llama 3.1 x2 (s = 32), whose llama3 scaling had none.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from llmft.config import RopeConfig


@dataclass(frozen=True)
class RopeScaling:
    """What :func:`apply_rope_scaling` did, for logs and the startup summary."""

    type: str
    factor: float
    original_length: int
    target_length: int
    rope_parameters: dict

    def describe(self) -> str:
        return (
            f"RoPE {self.type} x{self.factor:g}: {self.original_length} -> {self.target_length} tokens "
            f"(rope_parameters={self.rope_parameters})"
        )


def _head_dim(config: PretrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim * partial)


_YARN_EXTRAS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
_LLAMA3_EXTRAS = ("low_freq_factor", "high_freq_factor")


def apply_rope_scaling(
    config: PretrainedConfig, rope: RopeConfig, max_position_embeddings: int | None = None
) -> RopeScaling:
    """Write the scaled RoPE parameters and the new context length into ``config`` (in place).

    Args:
        config: a transformers config of a RoPE model (LLaMA family and similar), scaled already or not.
        rope: the recipe's rope section; its factor extends the base's current context (see the module doc).
        max_position_embeddings: the target length; default ``round(current * factor)``.

    Returns:
        A :class:`RopeScaling` summary (``factor`` and ``original_length`` over the base's original length).

    Raises:
        ValueError: the config has no RoPE parameters, the base's scaling cannot be composed with the recipe's
            (the message says what to set instead), or transformers rejects the resulting parameters.
    """
    config.standardize_rope_params()
    base = dict(config.rope_parameters or {})
    if "rope_theta" not in base:
        raise ValueError(f"{type(config).__name__} has no rope_theta: this model does not use RoPE")
    theta = float(base["rope_theta"])
    base_type = base.get("rope_type", "default")
    current = rope.original_max_position_embeddings or int(config.max_position_embeddings)
    target = max_position_embeddings or round(current * rope.factor)
    recipe_extras = {k: getattr(rope, k) for k in _YARN_EXTRAS + _LLAMA3_EXTRAS if getattr(rope, k) is not None}

    params: dict = {"rope_theta": theta}
    if "partial_rotary_factor" in base:
        params["partial_rotary_factor"] = base["partial_rotary_factor"]
    if base_type == "default":
        original, total = current, rope.factor
        if rope.type == "ntk":
            d = _head_dim(config)
            params.update(rope_type="default", rope_theta=theta * rope.factor ** (d / (d - 2)))
        else:
            params.update(rope_type=rope.type, factor=float(rope.factor))
        if rope.type in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = original
        params.update(recipe_extras)
    else:
        params, original, total = _compose(config, base, rope, current, target, recipe_extras)

    config.rope_parameters = params
    # transformers' dynamic NTK treats max_position_embeddings as the original length.
    config.max_position_embeddings = original if rope.type == "dynamic" else target
    config.validate_rope()
    return RopeScaling(rope.type, total, original, target, params)


def _compose(config: PretrainedConfig, base: dict, rope: RopeConfig, current: int, target: int,
             recipe_extras: dict) -> tuple[dict, int, float]:
    """(rope_parameters, original length L0, total factor over L0) for a recipe on an already-scaled base.

    Raises:
        ValueError: a combination no single transformers config expresses (the module doc's table), with the fix.
    """
    base_type, s1, s2 = base["rope_type"], float(base.get("factor", 1.0)), float(rope.factor)
    # transformers' dynamic NTK keeps the original length in max_position_embeddings; the others the scaled one
    original = int(base.get("original_max_position_embeddings")
                   or (current if base_type == "dynamic" else round(current / s1)))
    kept = {k: v for k, v in base.items() if k in ("rope_theta", "partial_rotary_factor")}
    if rope.type == "ntk" and base_type in ("linear", "llama3"):
        d = _head_dim(config)
        return {**base, "rope_theta": float(base["rope_theta"]) * s2 ** (d / (d - 2))}, original, s1 * s2
    if base_type == rope.type == "linear":
        return {**kept, "rope_type": "linear", "factor": s1 * s2}, original, s1 * s2
    if rope.type == "yarn" and base_type in ("yarn", "llama3"):
        carried = {k: v for k, v in base.items() if k in _YARN_EXTRAS and k != "attention_factor"}  # it follows s
        s = target / original  # YaRN's s = L' / L over the original length, as transformers checks it
        return ({**kept, "rope_type": "yarn", "factor": s, "original_max_position_embeddings": original,
                 **carried, **recipe_extras}, original, s)
    if base_type == rope.type == "llama3":
        carried = {k: v for k, v in base.items() if k in _LLAMA3_EXTRAS}
        return ({**kept, "rope_type": "llama3", "factor": s1 * s2, "original_max_position_embeddings": original,
                 **carried, **recipe_extras}, original, s1 * s2)
    composes = {"linear": "type linear (the factors multiply) or ntk", "yarn": "type yarn (yarn over the "
                f"original {original})", "llama3": "type llama3, yarn or ntk"}.get(base_type)
    fix = f"use {composes}, or " if composes else ""
    raise ValueError(
        f"the base already has {base_type} RoPE scaling (factor {s1:g} over {original} positions); {rope.type} on "
        "top of it gives frequencies that no single transformers rope config expresses, so the checkpoint would not "
        f"reload as trained. Fix: {fix}start from the base with its scaling removed from config.json "
        f"(max_position_embeddings {original}) and a factor over {original} (x{s1 * s2:g} for the same target)"
    )
