"""Adapter settings of a training recipe: LoRA (``lora`` section) and QLoRA's quantized base (``qlora`` section)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from llmft.config.loading import Strict, hint

# ---------------------------------------------------------------------------------------------- lora

# Target presets for LLaMA-family models (the module names transformers uses for these projections).
LORA_TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class LoraConfig(Strict):
    """LoRA adapters (Hu et al. 2021) for ``method: lora``, applied with PEFT. The base weights stay frozen; only
    the low-rank A/B matrices (plus ``trainable_extra``) are trained. LongLoRA (Chen et al. 2023) extends context
    with r=8, alpha=16 on q/k/v/o and also trains the embedding and the norms: without them LoRA falls short of
    full fine-tuning at long context."""

    rank: int = Field(default=8, gt=0, description="LoRA rank r (inner dimension of B @ A).")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / r "
                         "(alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input path.")
    target_modules: Literal["attention", "all_linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        default="attention",
        description="Linear layers that get adapters: 'attention' (q_proj, k_proj, v_proj, o_proj), 'all_linear' "
        "(those + gate_proj, up_proj, down_proj), or an explicit list of module names.",
        json_schema_extra=hint("use attention, all_linear, or a list such as [q_proj, v_proj]"),
    )
    trainable_extra: list[Literal["embed", "norm", "lm_head"]] = Field(
        default_factory=list,
        description="Whole modules trained (and saved in the adapter) next to LoRA: 'embed' (input embedding), "
        "'norm' (every RMSNorm weight), 'lm_head'. LongLoRA uses [embed, norm].",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilized LoRA: scale by alpha / sqrt(r).")
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Which biases train: none, all, or only those of adapted layers.")

    @property
    def targets(self) -> list[str]:
        """The target module names, with a preset expanded."""
        if isinstance(self.target_modules, str):
            return list(LORA_TARGET_PRESETS[self.target_modules])
        return list(self.target_modules)

    @field_validator("trainable_extra")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("list each of embed, norm, lm_head at most once")
        return v


class QLoraConfig(Strict):
    """QLoRA (Dettmers et al. 2023) for ``method: qlora``: the frozen base is loaded 4-bit quantized with
    bitsandbytes and LoRA adapters (the ``lora`` section) train on top of it in ``compute_dtype``."""

    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="4-bit data type of the base weights: 'nf4' (NormalFloat4, the paper's) or 'fp4'.")
    double_quant: bool = Field(
        default=True, description="Also quantize the per-block quantization constants (saves ~0.4 bit/parameter).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="dtype the 4-bit weights are de-quantized to for each matmul.")
    quant_storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        default="uint8",
        description="dtype the packed 4-bit weights are stored in. DeepSpeed ZeRO-3 shards all parameters as one "
        "dtype, so there it must be the training dtype: bfloat16 for train.precision bf16, float16 for fp16, "
        "float32 for fp32 (checked at validation).",
    )
