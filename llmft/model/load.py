"""Load (or initialise) a Hugging Face causal LM and its tokenizer, extended as the recipe says.

Weights are read from safetensors only; ``trust_remote_code`` is passed through from the recipe and is off by
default. The attention backend is chosen once, with one log line saying which and why.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmft.config import ModelConfig, QLoraConfig
from llmft.config.recipe import attention_kernel
from llmft.model.rope import RopeScaling, apply_rope_scaling

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Published config.json files of the hub base models the shipped recipes name (offline parameter counts).
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"
_FALLBACK_LOGGED: set[str] = set()  # hub ids whose shipped config was used (logged once per process)


class ModelLoadError(Exception):
    """The model, its tokenizer or the requested attention backend cannot be used here (one-line message)."""


@dataclass
class BuiltModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    attention: str
    rope: RopeScaling | None


def require_bitsandbytes(what: str) -> None:
    """Check that bitsandbytes can serve ``what`` (e.g. "method: qlora") on this machine.

    Raises:
        ModelLoadError: bitsandbytes cannot be imported, or a CUDA device is present but bitsandbytes loaded no
            CUDA library (a CPU-only or mismatched build): one line with the fix instead of a deep traceback.
    """
    try:
        import bitsandbytes.cextension as cext
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken native library raising anything
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{what} needs bitsandbytes, which cannot be imported here ({why}). Fix: "
                             "pip install 'bitsandbytes>=0.50.2'") from None
    if torch.cuda.is_available() and isinstance(cext.lib, cext.ErrorHandlerMockBNBNativeLibrary):
        raise ModelLoadError(f"{what}: bitsandbytes has no working CUDA library for this machine (torch CUDA "
                             f"{torch.version.cuda}, bitsandbytes backend {cext.BNB_BACKEND}). Fix: reinstall "
                             "bitsandbytes for this CUDA version; `python -m bitsandbytes` prints a diagnosis")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attention(requested: str, precision: str = "bf16") -> tuple[str, str]:
    """Pick the attention implementation.

    flash-attn computes only in bf16/fp16: with ``precision`` fp32, ``auto`` picks sdpa, and an explicit
    flash_attention_2 is refused (recipe validation refuses it first, :func:`llmft.config.cross_check`).

    Args:
        requested: ``model.attention`` (auto, flash_attention_2, sdpa, eager).
        precision: what every forward computes in: ``train.precision`` (fp32, bf16, fp16) for training, the
            model's dtype for evaluation.

    Returns:
        (implementation, reason) — the reason is logged once.

    Raises:
        ModelLoadError: flash_attention_2 was requested but cannot run here, or would be handed fp32.
    """
    if requested == "flash_attention_2":
        if precision == "fp32":
            raise ModelLoadError(
                "model.attention: flash_attention_2 computes only in bf16 or fp16, but the forward would run in fp32."
                " Fix: set train.precision: bf16 (or evaluate with --dtype bfloat16), or use sdpa"
            )
        if not flash_attn_available():
            why = "no CUDA device" if not torch.cuda.is_available() else "the flash-attn package is not installed"
            raise ModelLoadError(
                f"model.attention: flash_attention_2 cannot run here ({why}). Fix: install the GPU extra "
                "(pip install 'llmft[gpu]') on a CUDA machine, or set model.attention: sdpa"
            )
        return "flash_attention_2", "requested in the recipe"
    chosen = attention_kernel(requested, flash_attn_available(), precision)
    if requested != "auto":
        return chosen, "requested in the recipe"
    if chosen == "flash_attention_2":
        return chosen, "auto: flash-attn is installed and CUDA is available"
    if flash_attn_available():
        return chosen, "auto: flash-attn computes only in bf16/fp16 and this run computes in fp32, using SDPA"
    why = "no CUDA device" if not torch.cuda.is_available() else "flash-attn is not installed"
    return chosen, f"auto: {why}, using PyTorch SDPA"


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


def shipped_config_dir(name: str) -> Path | None:
    """The directory holding the published ``config.json`` of hub model ``name`` shipped with llmft, or None.

    ``llmft/assets/configs/<org>--<name>/config.json`` holds the config of each hub base model the shipped recipes
    name, so that parameter counts (``llmft validate``, docs/hyperparameters.md) work offline.
    """
    path = SHIPPED_CONFIGS / name.replace("/", "--")
    return path if (path / "config.json").is_file() else None


@functools.cache
def hub_resolves() -> bool:
    """Whether the hub's host name resolves (one DNS lookup per process)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False


def _hub_unreachable(err: BaseException | None) -> bool:
    """True when ``err`` says the hub could not be reached (no network, or HF_HUB_OFFLINE) and nothing was cached;
    False for every other failure (a gated or missing repo, a bad config)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LocalEntryNotFoundError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def load_config(cfg: ModelConfig):
    """The model config with the recipe's RoPE scaling applied.

    A hub id that cannot be fetched because the hub is unreachable (and is not in the local cache) falls back to
    the published config shipped with llmft (:func:`shipped_config_dir`), with one log line naming the file.

    Returns:
        (config, RopeScaling or None)

    Raises:
        ModelLoadError: the config cannot be loaded or does not accept the RoPE parameters.
    """
    shipped = None if Path(cfg.name).expanduser().is_dir() else shipped_config_dir(cfg.name)
    try:
        # no DNS for the hub: read the local cache only, instead of ~25 s of retries before the same fallback
        config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                            local_files_only=shipped is not None and not hub_resolves())
    except (OSError, ValueError) as e:
        if shipped is None or not _hub_unreachable(e):
            raise ModelLoadError(f"cannot load model config {cfg.name!r}: {str(e).splitlines()[0]}") from None
        if cfg.name not in _FALLBACK_LOGGED:
            from huggingface_hub import constants

            _FALLBACK_LOGGED.add(cfg.name)
            log.info("model config: the hub is unreachable, using the published config of %s shipped with llmft: %s%s",
                     cfg.name, shipped / "config.json",
                     "" if constants.HF_HUB_OFFLINE else " (set HF_HUB_OFFLINE=1 to skip the hub lookup)")
        config = AutoConfig.from_pretrained(shipped)
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
                qlora: QLoraConfig | None = None, precision: str = "bf16") -> BuiltModel:
    """Load or initialise the model described by ``cfg``.

    Args:
        cfg: the recipe's model section.
        seed: seeds the random init when ``cfg.init == "random"``.
        dtype: parameter dtype in memory (training keeps fp32 master weights).
        qlora: load the Linear layers 4-bit quantized (bitsandbytes ``Linear4bit``) with these settings; the
            RoPE-scaled config is used all the same. Needs ``cfg.init == "pretrained"``.
        precision: what the forwards compute in (``train.precision``); picks the attention kernel with
            ``cfg.attention`` (:func:`resolve_attention`).

    Returns:
        A :class:`BuiltModel`.

    Raises:
        ModelLoadError: anything about the model that the user must fix.
    """
    attention, reason = resolve_attention(cfg.attention, precision)
    log.info("attention: %s (%s)", attention, reason)
    if qlora is not None:
        require_bitsandbytes("method: qlora")
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
        enable_checkpointing(model, cfg)
    if cfg.tiled_mlp:
        tile_mlps(model, cfg.tiled_mlp)
    if cfg.compile:
        compile_layers(model)
    return BuiltModel(model, tokenizer, attention, scaling)


def tile_mlps(model: torch.nn.Module, tiles: int | str) -> int:
    """Run each decoder layer's MLP a slice of the sequence at a time (``model.tiled_mlp``), with DeepSpeed's
    ``TiledMLP`` (ALST): the forward keeps only the MLP's input, and the backward recomputes one tile at a time,
    so the (b, s, intermediate) activations of gate/up/act exist for s / tiles tokens at once instead of s. Costs one
    more MLP forward per step. Same loss and gradients up to float rounding (tests/unit/model/test_tiled_mlp.py).

    Args:
        model: a transformers causal LM whose decoder layers have an ``mlp`` with gate/up/down projections
            (LLaMA family); PEFT adapters added later are used (the projections are looked up at each call).
        tiles: tiles per sequence, or "auto": ceil(tokens / hidden_size), ALST's choice (8 for 32K tokens of a
            4096-wide model).

    Returns:
        The number of MLPs tiled.

    Raises:
        ModelLoadError: the model has no LLaMA-style MLPs.
    """
    import types

    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    from transformers.modeling_layers import GradientCheckpointingLayer

    mlps = [m.mlp for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and hasattr(m, "mlp")]
    mlps = [m for m in mlps if all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    if not mlps:
        raise ModelLoadError(f"model.tiled_mlp: {type(model).__name__} has no LLaMA-style MLPs (gate/up/down "
                             "projections) to tile. Fix: remove model.tiled_mlp")

    def mlp(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled_forward(self, x):  # x (b, s, h)
        n = mlp_tile_count(tiles, x.shape[-2], x.shape[-1])
        # the trainable weights: DeepSpeed holds their gradients back until the last tile has added to them
        params = [p for p in self.parameters() if p.requires_grad]
        return TiledMLP.apply(mlp, self, x, n, params)

    for m in mlps:
        m.forward = types.MethodType(tiled_forward, m)
    log.info("tiled MLP: %d MLPs computed %s tiles of the sequence at a time", len(mlps),
             "ceil(tokens / hidden)" if tiles == "auto" else tiles)
    return len(mlps)


def mlp_tile_count(tiles: int | str, tokens: int, hidden: int) -> int:
    """The tiles a tiled MLP cuts ``tokens`` into: ``tiles``, or for "auto" ceil(tokens / hidden); at least 1, at
    most one per token."""
    n = math.ceil(tokens / hidden) if tiles == "auto" else int(tiles)
    return max(1, min(n, tokens))


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (``model.compile: true``): regional compilation, as torchtune
    does, instead of the whole model.

    The layers run the same code, so they share one compiled graph (parameters are graph inputs): compile time does
    not grow with depth, and the embedding, the chunked loss and the optimizer stay eager. ``Module.compile`` keeps
    the module and its state-dict keys as they were (no ``_orig_mod.`` prefix), so checkpoints and exports are
    unchanged. Tracing is lazy (at the first forward pass), so modules replaced after this call (PEFT's LoRA Linear
    layers) and the checkpointing set up before it (traced as one region per layer) are compiled with the layer.

    Returns:
        The number of layers compiled.

    Raises:
        ModelLoadError: the model has no transformers decoder layers to compile.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ModelLoadError(f"model.compile: {type(model).__name__} has no decoder layers that llmft can compile "
                             "one by one. Fix: remove model.compile")
    # a KV cache in the training forward would make each layer's graph guard on its own cache slot: one recompile
    # per layer, and past dynamo's recompile limit (8) the remaining layers would silently run eager
    model.config.use_cache = False
    for layer in layers:
        layer.compile()
    log.info("compile: torch.compile on each of %d %s layers; the first step compiles them", len(layers),
             type(layers[0]).__name__)
    return len(layers)


def enable_checkpointing(model, cfg: ModelConfig) -> None:
    """Gradient checkpointing as the recipe says: every ``checkpoint_every_n_layers``-th decoder layer (layers 0,
    n, 2n, ...), keeping the attention outputs with ``checkpoint_keep_attention`` (:func:`checkpoint_kwargs`), the
    saved layer inputs in pinned host memory with ``activation_offload`` (transformers'
    ``activation_checkpointing_enable`` does each of these). Without
    CUDA the activations already live in host memory, so offload is skipped (pinning needs an accelerator)."""
    kwargs = checkpoint_kwargs(cfg.checkpoint_keep_attention)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                          every_n_layers=cfg.checkpoint_every_n_layers,
                                          offload=cfg.activation_offload and torch.cuda.is_available())
    model.config.use_cache = False


# The attention kernels whose outputs ``checkpoint_keep_attention`` keeps, as the dispatcher names them (SDPA's CPU and
# CUDA backends, the flash-attn package's custom ops).
ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
})


def _keep_attention(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op.name() in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(keep_attention: bool = False) -> dict:
    """``torch.utils.checkpoint`` arguments of ``model.gradient_checkpointing`` (non-reentrant).

    Each checkpointed decoder layer keeps only its input and is recomputed in the backward pass. With ``keep_attention``
    (``model.checkpoint_keep_attention``) the recompute is selective: the attention kernel's outputs (the attention
    output, (b, s, q), and its (b, nh, s) fp32 logsumexp) are kept from the forward pass and the kernel is not run
    again, which skips the one recomputed op whose cost grows with s^2; q, k and v are recomputed as before (cheap
    projections). Gradients are bitwise the same either way (tests/unit/train/test_train_speed.py).
    """
    if not keep_attention:
        return {"use_reentrant": False}
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return {"use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts,
                                                                    _keep_attention)}


def load_trained(name: str, dtype: str = "float32", device: str = "cpu", attention: str = "sdpa"):
    """(model in eval mode, tokenizer) for a trained model: a checkpoint directory or hub id, an llmft run directory
    (its ``final/``), or an llmft adapter directory (``method: lora`` / ``qlora`` output), applied to the base
    named in its ``adapter_config.json`` with the adapter's RoPE-scaled config.

    Raises:
        ModelLoadError: the model, its base or its tokenizer cannot be loaded.
    """
    path = Path(name).expanduser()
    if (path / "final").is_dir() and not (path / "config.json").is_file() and \
            not (path / "adapter_config.json").is_file():  # a run directory
        path = path / "final"
        name = str(path)
    try:
        if (path / "adapter_config.json").is_file():
            import json

            import peft

            from llmft.model.adapters import unquantized_base_config

            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"{path}/adapter_config.json names no base_model_name_or_path")
            model = AutoModelForCausalLM.from_pretrained(base, config=unquantized_base_config([path]),
                                                         dtype=DTYPES[dtype],
                                                         use_safetensors=True, attn_implementation=attention)
            model = peft.PeftModel.from_pretrained(model, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], use_safetensors=True,
                                                         attn_implementation=attention)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{name}: no tokenizer could be loaded from it ({str(e).splitlines()[0]}). Fix: copy the "
                             "base model's tokenizer files (tokenizer.json, tokenizer_config.json, "
                             "special_tokens_map.json) into it") from None
    return model.to(device).eval(), tokenizer


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes, also for ZeRO-3 partitioned parameters)."""

    def numel(p: torch.nn.Parameter) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    return sum(numel(p) for p in model.parameters() if p.requires_grad), sum(numel(p) for p in model.parameters())


def architecture_config(cfg: ModelConfig):
    """The RoPE-extended config of the model a recipe will train, found without loading any weights.

    ``model.name`` is read as :func:`load_config` does (a local directory, else the hub, else the shipped published
    config when the hub is unreachable). When ``name`` does not exist yet but ``produced_by`` names the recipe that
    writes it, the config comes from that recipe's model (its output has that architecture).

    Returns:
        A transformers config, or None when the model is not local and its config cannot be fetched (the reason is
        logged).

    Raises:
        ModelLoadError: a local config cannot be loaded or does not accept the RoPE parameters.
        RecipeError: the ``produced_by`` recipe is invalid.
    """
    if Path(cfg.name).expanduser().is_dir():
        return load_config(cfg)[0]
    if cfg.produced_by is not None:
        from llmft.config import load_recipe

        producer = load_recipe(cfg.produced_by).model
        return architecture_config(cfg.model_copy(update={"name": producer.name, "produced_by": producer.produced_by,
                                                          "revision": producer.revision}))
    try:
        return load_config(cfg)[0]
    except ModelLoadError as e:
        log.info("parameters: %s; counted at launch", e)
        return None


def parameter_count_from_config(cfg: ModelConfig) -> int | None:
    """Parameter count of the (extended) model, built on the meta device; None if its config cannot be found.

    The config is the one :func:`architecture_config` finds. A QLoRA base counts its unquantized parameters.

    Raises:
        ModelLoadError, RecipeError: as :func:`architecture_config`.
    """
    config = architecture_config(cfg)
    if config is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return sum(p.numel() for p in model.parameters())
