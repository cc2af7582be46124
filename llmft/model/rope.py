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


def apply_rope_scaling(
    config: PretrainedConfig, rope: RopeConfig, max_position_embeddings: int | None = None
) -> RopeScaling:
    """Write the scaled RoPE parameters and the new context length into ``config`` (in place).

    Args:
        config: a transformers config of a RoPE model (LLaMA family and similar).
        rope: the recipe's rope section.
        max_position_embeddings: the target length; default ``round(original * factor)``.

    Returns:
        A :class:`RopeScaling` summary.

    Raises:
        ValueError: the config has no RoPE parameters, or transformers rejects the resulting parameters.
    """
    config.standardize_rope_params()
    base = dict(config.rope_parameters or {})
    if "rope_theta" not in base:
        raise ValueError(f"{type(config).__name__} has no rope_theta: this model does not use RoPE")
    theta = float(base["rope_theta"])
    original = rope.original_max_position_embeddings or int(config.max_position_embeddings)
    target = max_position_embeddings or round(original * rope.factor)

    params: dict = {"rope_theta": theta}
    if "partial_rotary_factor" in base:
        params["partial_rotary_factor"] = base["partial_rotary_factor"]
    if rope.type == "ntk":
        d = _head_dim(config)
        params.update(rope_type="default", rope_theta=theta * rope.factor ** (d / (d - 2)))
    else:
        params.update(rope_type=rope.type, factor=float(rope.factor))
    if rope.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    extras = ["beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
              "low_freq_factor", "high_freq_factor"]
    params.update({k: getattr(rope, k) for k in extras if getattr(rope, k) is not None})

    config.rope_parameters = params
    # transformers' dynamic NTK treats max_position_embeddings as the original length.
    config.max_position_embeddings = original if rope.type == "dynamic" else target
    config.validate_rope()
    return RopeScaling(rope.type, rope.factor, original, target, params)
