"""Load (or initialise) a Hugging Face causal LM and its tokenizer, extended as the recipe says.

Weights are read from safetensors only; ``trust_remote_code`` is passed through from the recipe and is off by
default. The attention backend is chosen once, with one log line saying which and why.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmft.config import ModelConfig, QLoraConfig
from llmft.model.rope import RopeScaling, apply_rope_scaling

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model, its tokenizer or the requested attention backend cannot be used here (one-line message)."""


@dataclass
class BuiltModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    attention: str
    rope: RopeScaling | None


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attention(requested: str) -> tuple[str, str]:
    """Pick the attention implementation.

    Returns:
        (implementation, reason) — the reason is logged once.

    Raises:
        ModelLoadError: flash_attention_2 was requested but cannot run here.
    """
    if requested == "flash_attention_2":
        if not flash_attn_available():
            why = "no CUDA device" if not torch.cuda.is_available() else "the flash-attn package is not installed"
            raise ModelLoadError(
                f"model.attention: flash_attention_2 cannot run here ({why}). Fix: install the GPU extra "
                "(pip install 'llmft[gpu]') on a CUDA machine, or set model.attention: sdpa"
            )
        return "flash_attention_2", "requested in the recipe"
    if requested == "auto":
        if flash_attn_available():
            return "flash_attention_2", "auto: flash-attn is installed and CUDA is available"
        why = "no CUDA device" if not torch.cuda.is_available() else "flash-attn is not installed"
        return "sdpa", f"auto: {why}, using PyTorch SDPA"
    return requested, "requested in the recipe"


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer named by ``cfg.tokenizer`` (default ``cfg.name``).

    Raises:
        ModelLoadError: it cannot be found or loaded.
    """
    name = cfg.tokenizer or cfg.name
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(cfg: ModelConfig):
    """The model config with the recipe's RoPE scaling applied.

    Returns:
        (config, RopeScaling or None)

    Raises:
        ModelLoadError: the config cannot be loaded or does not accept the RoPE parameters.
    """
    try:
        config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model config {cfg.name!r}: {str(e).splitlines()[0]}") from None
    scaling = None
    if cfg.rope is not None:
        try:
            scaling = apply_rope_scaling(config, cfg.rope, cfg.max_position_embeddings)
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"model.rope: {e}") from None
    elif cfg.max_position_embeddings is not None:
        config.max_position_embeddings = cfg.max_position_embeddings
    return config, scaling


def quantization_config(cfg: QLoraConfig):
    """The transformers ``BitsAndBytesConfig`` that loads a base 4-bit as the recipe's qlora section says."""
    from transformers import BitsAndBytesConfig

    storage = {**DTYPES, "uint8": torch.uint8}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
        bnb_4bit_quant_storage=storage[cfg.quant_storage_dtype],
    )


def build_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                qlora: QLoraConfig | None = None) -> BuiltModel:
    """Load or initialise the model described by ``cfg``.

    Args:
        cfg: the recipe's model section.
        seed: seeds the random init when ``cfg.init == "random"``.
        dtype: parameter dtype in memory (training keeps fp32 master weights).
        qlora: load the Linear layers 4-bit quantized (bitsandbytes ``Linear4bit``) with these settings; the
            RoPE-scaled config is used all the same. Needs ``cfg.init == "pretrained"``.

    Returns:
        A :class:`BuiltModel`.

    Raises:
        ModelLoadError: anything about the model that the user must fix.
    """
    attention, reason = resolve_attention(cfg.attention)
    log.info("attention: %s (%s)", attention, reason)
    config, scaling = load_config(cfg)
    if scaling is not None:
        log.info(scaling.describe())
    tokenizer = load_tokenizer(cfg)
    if cfg.init == "random":
        if qlora is not None:
            raise ModelLoadError("method: qlora quantizes pretrained weights; use init: pretrained")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attention, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name,
                config=config,
                revision=cfg.revision,
                dtype=dtype,
                attn_implementation=attention,
                trust_remote_code=cfg.trust_remote_code,
                use_safetensors=True,
                quantization_config=quantization_config(qlora) if qlora is not None else None,
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model weights {cfg.name!r}: {str(e).splitlines()[0]}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelLoadError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
        )
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return BuiltModel(model, tokenizer, attention, scaling)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes, also for ZeRO-3 partitioned parameters)."""

    def numel(p: torch.nn.Parameter) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    return sum(numel(p) for p in model.parameters() if p.requires_grad), sum(numel(p) for p in model.parameters())


def parameter_count_from_config(cfg: ModelConfig) -> int | None:
    """Parameter count of the (extended) model, built on the meta device; None if the config is not local."""
    if not Path(cfg.name).is_dir():
        return None
    config, _ = load_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return sum(p.numel() for p in model.parameters())
