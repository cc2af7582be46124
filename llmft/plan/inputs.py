"""What a memory estimate reads: the model's shapes (from its config alone) and a recipe's memory-relevant settings as
the launcher would resolve them (engine, ZeRO stage and buffers, attention kernel, packing), and device sizes as
people write them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from llmft.config import LORA_TARGET_PRESETS, LoraConfig, QLoraConfig, Recipe, RecipeError

GB = 1e9


# Resident memory of a fresh process after `import torch, transformers, peft, llmft.train.loop` (torch 2.13 CPU,
# transformers 5.23, peft 0.21), measured on the CI machine: 449.5 MB (torch + transformers alone: 351.5 MB).
FRAMEWORK_CPU_BYTES = 450_000_000


# CUDA context, cuBLAS/cuDNN workspaces and kernels on one GPU: assumed, not measured here (typically 0.5-1 GB).
CUDA_CONTEXT_BYTES = 1_000_000_000


# DeepSpeed's defaults for the ZeRO buffer sizes (deepspeed.runtime.zero.config, 0.19).
_DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9}


_LINEARS = tuple(LORA_TARGET_PRESETS["all_linear"])  # every linear layer of a LLaMA decoder layer


@dataclass(frozen=True)
class Shapes:
    """The LLaMA-family dimensions the estimate needs, read from a transformers config."""

    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    proj: dict  # name -> (in, out, has_bias)
    config: object = field(repr=False, compare=False)  # the transformers config (LoRA counts read it)

    @classmethod
    def from_config(cls, config) -> Shapes:
        from llmft.model.adapters import _projection_shapes

        heads = config.num_attention_heads
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, inter=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   tied=bool(getattr(config, "tie_word_embeddings", False)), proj=_projection_shapes(config),
                   config=config)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_params(self, name: str) -> int:
        i, o, bias = self.proj[name]
        return i * o + (o if bias else 0)

    @property
    def layer_linear_params(self) -> int:
        return sum(self.linear_params(n) for n in _LINEARS)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_linear_params + self.embed_params + self.head_params + self.norm_params


@dataclass(frozen=True)
class Setup:
    """Everything about a run that changes its memory; the suggestions are edits of this."""

    device: Literal["cuda", "cpu"]
    world_size: int
    engine: Literal["plain", "deepspeed"]
    method: Literal["full", "lora", "qlora"]
    lora: LoraConfig | None
    qlora: QLoraConfig | None
    precision: Literal["fp32", "bf16", "fp16"]
    optimizer: str
    micro_batch: int
    accumulation: int
    seq_len: int
    checkpointing: bool
    loss_chunk: int
    attention: Literal["flash_attention_2", "sdpa", "eager"]
    isolated: bool
    stage: int
    offload_optimizer: str
    offload_param: str
    ds_buffers: dict = field(default_factory=dict)
    every_n: int = 1  # with checkpointing: layers 0, n, 2n, ... are checkpointed, the others keep activations
    offload: bool = False  # with checkpointing: the checkpointed layers' inputs live in host memory
    keep_attention: bool = False  # with checkpointing: the checkpointed layers keep their attention outputs
    sequence: int = 1  # parallel.sequence: ranks sharing each sequence (each holds seq_len / sequence tokens)
    tiled_mlp: int | str = 0  # model.tiled_mlp: 0 off, N tiles, or "auto" (ceil(tokens / hidden))

    @property
    def mode(self) -> str:
        if self.precision == "fp32":
            return "fp32"
        return "pure16" if self.engine == "deepspeed" else "amp16"


def parse_bytes(text: str) -> float:
    """``80GB`` / ``80G`` / ``80`` (GB = 1e9 bytes), ``80GiB`` (2**30), ``512MB``, ``512MiB``.

    Raises:
        RecipeError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise RecipeError([f"--gpu-mem: got {text!r}; expected a size such as 80GB, 24GiB or 40 (GB)"])
    power = "kmgt".index(m.group(2)) + 1 if m.group(2) else 3
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** power


def _ds_buffers(recipe: Recipe, world_size: int) -> tuple[int, dict]:
    """The ZeRO stage and buffer sizes DeepSpeed will use for this recipe (JSON values, else its defaults)."""
    from llmft.train.engine import deepspeed_config

    zero = deepspeed_config(recipe, world_size).get("zero_optimization", {})
    stage = recipe.zero_stage
    buffers = {}
    for key, default in _DS_DEFAULTS.items():
        value = zero.get(key, default)
        buffers[key] = float(value) if isinstance(value, (int, float)) else default  # "auto": DeepSpeed's default
    overlap = zero.get("overlap_comm")
    buffers["overlap_comm"] = bool(overlap) if isinstance(overlap, bool) else stage == 3
    return stage, buffers


def setup_from_recipe(recipe: Recipe, world_size: int = 1, device: Literal["cuda", "cpu"] = "cuda") -> Setup:
    """The memory-relevant settings of a recipe run on ``world_size`` devices of type ``device``.

    ``model.attention: auto`` resolves as at launch (:meth:`ModelConfig.attention_kernel`), flash-attn assumed
    installed on CUDA (the ``gpu`` extra).

    Raises:
        RecipeError: the recipe's DeepSpeed JSON contradicts the recipe.
    """
    t, d, m = recipe.train, recipe.deepspeed, recipe.model
    engine = "deepspeed" if world_size > 1 else "plain"
    stage, buffers = _ds_buffers(recipe, world_size) if engine == "deepspeed" else (d.stage, {})
    packing = recipe.data.packing
    if recipe.data.recipe is not None:
        from llmft.config.data import load_mix

        packing = load_mix(recipe.data.recipe, check_paths=False).packing
    elif recipe.data.built is not None:
        import json

        packing = json.loads((recipe.data.built / "stats.json").read_text())["packing"]["mode"]
    attention = m.attention_kernel(flash_attn=device == "cuda", precision=t.precision)  # gpu extra on CUDA
    return Setup(device=device, world_size=world_size, engine=engine, method=recipe.method,
                 lora=recipe.adapter,
                 qlora=recipe.qlora if recipe.method == "qlora" else None,
                 precision=t.precision, optimizer=t.optimizer, micro_batch=t.micro_batch_size,
                 accumulation=t.gradient_accumulation_steps, seq_len=m.max_seq_len,
                 checkpointing=m.gradient_checkpointing, loss_chunk=t.loss_chunk_tokens, attention=attention,
                 every_n=m.checkpoint_every_n_layers, offload=m.activation_offload,
                 keep_attention=m.checkpoint_keep_attention,
                 isolated=packing == "isolated",
                 stage=stage, offload_optimizer=d.offload_optimizer, offload_param=d.offload_param,
                 ds_buffers=buffers, sequence=recipe.parallel.sequence, tiled_mlp=m.tiled_mlp)
