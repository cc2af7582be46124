"""LoRA adapters with PEFT: wrap the model, count, export and merge.

``method: lora`` freezes the base model and trains low-rank updates ``W + (alpha / r) * B @ A`` on the target
Linear layers (PEFT ``LoraConfig`` / ``get_peft_model``; no hand-written LoRA layers). ``lora.trainable_extra``
also trains whole modules, as LongLoRA does for the embedding and the norms. They are passed to PEFT as
``modules_to_save``: PEFT keeps the frozen original next to a trainable copy, saves the copy inside
``adapter_model.safetensors`` and restores it in ``PeftModel.from_pretrained`` and ``merge_and_unload``, so an
adapter directory is complete on its own (plain ``requires_grad`` on the base would train them but PEFT would
not save the norms).

An adapter export (``checkpoints/step-N/model/``, ``final/``) holds ``adapter_config.json``,
``adapter_model.safetensors``, the tokenizer and the base model's RoPE-scaled ``config.json``. Reload it with::

    config = AutoConfig.from_pretrained(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, config=config)
    model = PeftModel.from_pretrained(model, adapter_dir)

``method: qlora`` is the same with the frozen base loaded 4-bit (bitsandbytes ``Linear4bit``, see
``build.quantization_config``) and prepared by PEFT's ``prepare_model_for_kbit_training``. Its adapter export is
identical in format: the saved ``config.json`` carries no ``quantization_config``, so the reload above (and
``llmft merge``) uses the ordinary, unquantized base. The adapter learned against the quantized weights
``dequant(quant(W0))``; merging adds ``B @ A`` to the original ``W0``, so a merged QLoRA model differs slightly
from the quantized model it was trained in (by the quantization error of W0). To reproduce the training-time
model exactly, load the base with the same ``BitsAndBytesConfig`` and apply the adapter unmerged.

``llmft merge`` can also stack adapters with weights (``--adapter a:0.7 --adapter b:0.3``, negative weights
allowed: ``a:1 b:-1`` keeps the direction in which a differs from b, as slider adapters do). The merged weights
are exactly ``W0 + sum_i w_i * delta_i``: PEFT's ``add_weighted_adapter`` with ``combination_type="cat"`` for the
LoRA updates, and the same sum of differences to the base for the trained whole-module copies (see
:func:`merge_adapters`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from llmft.atomic import publish_dir
from llmft.config import LoraConfig, ModelConfig
from llmft.model.load import ModelLoadError, checkpoint_kwargs, enable_checkpointing

log = logging.getLogger(__name__)


def _extra_module_names(model: PreTrainedModel, extra: list[str]) -> list[str]:
    """Leaf names of the modules ``trainable_extra`` asks for (PEFT matches them as name suffixes)."""
    names: list[str] = []
    if "embed" in extra:
        emb = model.get_input_embeddings()
        names += [n.split(".")[-1] for n, m in model.named_modules() if m is emb]
    if "norm" in extra:
        # every RMSNorm / LayerNorm (LLaMA: input_layernorm, post_attention_layernorm, the final norm)
        names += [n.split(".")[-1] for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    if "lm_head" in extra:
        head = model.get_output_embeddings()
        names += [n.split(".")[-1] for n, m in model.named_modules() if m is head]
    return sorted(set(names))


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> peft.PeftModel:
    """Freeze ``model`` and add LoRA adapters (and trainable copies of ``trainable_extra``) as ``cfg`` says.

    Raises:
        ModelLoadError: a target module name matches no layer of the model, or lm_head is tied to the embedding.
    """
    if "lm_head" in cfg.trainable_extra and getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError("lora.trainable_extra: lm_head is tied to the input embedding in this model; "
                         "use embed instead")
    present = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in cfg.targets if t not in present]
    if missing:
        raise ModelLoadError(f"lora.target_modules: {', '.join(missing)} match no Linear layer of this model "
                         f"(it has {', '.join(sorted(present))})")
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets,
        modules_to_save=_extra_module_names(model, cfg.trainable_extra) or None,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, peft_cfg)


def prepare_quantized(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """PEFT's ``prepare_model_for_kbit_training`` for a 4-bit base: freezes it, casts the non-quantized weights
    (norms, embedding) to fp32, makes the input embedding output require grad (needed with checkpointing
    and a frozen embedding) and enables gradient checkpointing when the recipe asks for it (llmft's selective
    checkpointing, :func:`llmft.model.load.checkpoint_kwargs`)."""
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                 gradient_checkpointing_kwargs=checkpoint_kwargs())
    if cfg.gradient_checkpointing:  # peft enabled it on every layer: apply the recipe's layer choice and offload
        enable_checkpointing(model, cfg)
    return model


def _projection_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int, bool]]:
    """(in, out, has_bias) of each LLaMA-family projection, from the config."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    ab, mb = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
    return {"q_proj": (h, q, ab), "k_proj": (h, kv, ab), "v_proj": (h, kv, ab), "o_proj": (q, h, ab),
            "gate_proj": (h, inter, mb), "up_proj": (h, inter, mb), "down_proj": (inter, h, mb)}


def lora_parameter_count(config: PretrainedConfig, cfg: LoraConfig) -> int:
    """Trainable parameters of a LLaMA-family model under ``cfg``, in closed form.

    Per layer, each targeted Linear ``in -> out`` adds ``r * (in + out)`` (A is r x in, B is out x r); plus the
    sizes of the ``trainable_extra`` modules (embed / lm_head: vocab x hidden; norm: hidden per RMSNorm, two
    per layer and one final) and the trained biases.

    Raises:
        ValueError: a target name is not a LLaMA projection (q/k/v/o_proj, gate/up/down_proj).
    """
    shapes = _projection_shapes(config)
    unknown = [t for t in cfg.targets if t not in shapes]
    if unknown:
        raise ValueError(f"no closed-form size for {', '.join(unknown)} (LLaMA projections only)")
    layers, h, v = config.num_hidden_layers, config.hidden_size, config.vocab_size
    per_layer = sum(cfg.rank * (shapes[t][0] + shapes[t][1]) for t in cfg.targets)
    biased = {"none": [], "lora_only": cfg.targets, "all": list(shapes)}[cfg.bias]
    per_layer += sum(shapes[t][1] for t in biased if shapes[t][2])
    extra = {"embed": v * h, "lm_head": v * h, "norm": (2 * layers + 1) * h}
    return layers * per_layer + sum(extra[e] for e in cfg.trainable_extra)


# Measured on llmft exports (peft 0.21, safetensors): each tensor costs ~128 bytes of safetensors JSON header
# (its key, dtype, shape and offsets), and adapter_config.json is ~1.2 KB.
_SAFETENSORS_HEADER_BYTES_PER_TENSOR = 128
_ADAPTER_CONFIG_BYTES = 1280


def adapter_size_bytes(config: PretrainedConfig, cfg: LoraConfig, dtype: torch.dtype) -> int:
    """Estimated size on disk of an adapter export: ``adapter_model.safetensors`` plus ``adapter_config.json``.

    Assumes what :func:`export_adapter` writes: every trainable parameter (LoRA A/B, the ``trainable_extra``
    copies, trained biases; :func:`lora_parameter_count`) saved once in ``dtype`` (llmft saves in the recipe's
    ``model.dtype``, also for QLoRA, whose 4-bit base is never saved), plus ~128 bytes of safetensors header per
    tensor and ~1.2 KB for adapter_config.json. The tokenizer and config.json that the export also holds are not
    counted (they do not depend on the adapter).

    Raises:
        ValueError: as :func:`lora_parameter_count`.
    """
    params = lora_parameter_count(config, cfg)  # first: it rejects targets without a closed form
    shapes, layers = _projection_shapes(config), config.num_hidden_layers
    biased = {"none": [], "lora_only": cfg.targets, "all": list(shapes)}[cfg.bias]
    tensors = layers * (2 * len(cfg.targets) + sum(1 for t in biased if shapes[t][2]))  # A and B per target
    tensors += sum({"embed": 1, "lm_head": 1, "norm": 2 * layers + 1}[e] for e in cfg.trainable_extra)
    return _export_bytes(params, tensors, dtype)


def trained_adapter_size_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """The estimate of :func:`adapter_size_bytes` from a live PEFT model's trainable parameters (any architecture;
    under ZeRO-3 a parameter's full size is its ``ds_numel``)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _export_bytes(sum(getattr(p, "ds_numel", p.numel()) for p in trainable), len(trainable), dtype)


def _export_bytes(params: int, tensors: int, dtype: torch.dtype) -> int:
    return params * dtype.itemsize + tensors * _SAFETENSORS_HEADER_BYTES_PER_TENSOR + _ADAPTER_CONFIG_BYTES


def export_adapter(out_dir: Path, model: peft.PeftModel, tokenizer, dtype: torch.dtype,
                   state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter (PEFT format, weights in ``dtype``), the RoPE-scaled base config and the tokenizer.

    Args:
        state: the trainable tensors by parameter name, whole (the training engine gathers them under ZeRO-3,
            where the model's own parameters are empty partitions). Default: ``model.state_dict()``.

    For a QLoRA model the config is written without its ``quantization_config``: the adapter reloads on the
    ordinary base (see the module docstring).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # packed 4-bit weights and their quantization state are not floating point: leave them be (PEFT drops them)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
             for k, v in (model.state_dict() if state is None else state).items()}
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    config = copy.deepcopy(model.get_base_model().config)
    _drop_quantization(config)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def unquantized_base_config(adapter_dirs: list[Path]) -> PretrainedConfig:
    """The RoPE-scaled base config saved with the adapters (which must agree on RoPE and max length), without a
    ``quantization_config``: what the base is loaded with to apply or merge them.

    Raises:
        ModelLoadError: the adapters' RoPE parameters or max lengths differ.
    """
    config = _shared_config(adapter_dirs)
    _drop_quantization(config)
    return config


def _drop_quantization(config: PretrainedConfig) -> None:
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def parse_adapter_spec(spec: str) -> tuple[Path, float]:
    """An ``llmft merge --adapter`` value, ``PATH`` or ``PATH:WEIGHT``, as (adapter directory, weight).

    The text after the last ``:`` is a weight only when it parses as a number (and ``spec`` is not itself an
    existing path), so paths that contain ``:`` still work. ``PATH`` is an adapter directory or the
    ``adapter_model.safetensors`` inside one. The weight defaults to 1.0 and may be negative.

    Raises:
        ModelLoadError: the path does not exist or is some other file, or the weight is not a finite number.
    """
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass  # not a number: the ':' is part of the path
    hint = "expected PATH or PATH:WEIGHT with a number as WEIGHT, e.g. runs/a/final:0.7"
    if not math.isfinite(weight):
        raise ModelLoadError(f"--adapter {spec}: weight {tail} is not a finite number ({hint})")
    adapter = Path(path)
    if not adapter.exists():
        raise ModelLoadError(f"--adapter {spec}: {path} does not exist ({hint})")
    if adapter.is_file():
        if adapter.name != "adapter_model.safetensors":
            raise ModelLoadError(f"--adapter {spec}: {path} is a file; pass an adapter directory or the "
                                 "adapter_model.safetensors inside one")
        adapter = adapter.parent
    return adapter, weight


def merge_adapters(base: str, adapters: Sequence[tuple[Path, float]], out_dir: Path, dtype: torch.dtype) -> Path:
    """Base (with the adapters' RoPE-scaled config) + weighted LoRA adapters -> a plain Hugging Face checkpoint.

    One adapter at weight 1: its LoRA updates are folded into the base weights (``merge_and_unload``) and its
    trained copies of the extra modules (embed, norms, lm_head) replace the originals.

    Several adapters, or one at another weight, are stacked: every weight becomes ``W0 + sum_i w_i (W_i - W0)``,
    with ``W_i`` what adapter i alone merges to. For a LoRA layer that is ``W0 + sum_i w_i s_i B_i @ A_i``
    (``s_i = alpha_i / r_i``, or ``alpha_i / sqrt(r_i)`` with rsLoRA), built by PEFT's ``add_weighted_adapter`` with
    ``combination_type="cat"``: one adapter of rank ``sum_i r_i`` whose A stacks the ``w_i s_i A_i`` and whose B
    stacks the ``B_i``, so ``B @ A`` is the weighted sum exactly, for any ranks and signs. (``linear`` needs equal
    ranks and multiplies the summed A by the summed B, which adds cross terms ``B_i @ A_j``; the ``svd`` types
    truncate to a lower rank.) PEFT refuses to combine trained module copies (``modules_to_save``) that two
    adapters share, and leaves the others at ``W0``, so those (and trained biases) are summed here the same way:
    ``E0 + sum_i w_i (E_i - E0)``, an adapter without a copy of a module contributing nothing to it. The weights
    need not sum to 1 and may be negative: ``[(a, 1), (b, -1)]`` gives ``W0 + delta_a - delta_b``, the direction
    in which a differs from b. A warning names the modules two adapters both change: their deltas add up there.

    The output keeps the adapters' ``rope_parameters`` and ``max_position_embeddings`` (which must agree) and
    gets the tokenizer of the first adapter.

    A QLoRA adapter is merged the same way, into the unquantized base: the result is ``W0 + (alpha / r) B @ A``
    with ``W0`` the original base weights, although the adapter was trained against the 4-bit quantized W0.

    Args:
        base: the base model (hub id or directory) the adapters were trained on.
        adapters: (adapter directory, weight) pairs, as :func:`parse_adapter_spec` returns them.
        out_dir: the output directory (replaced if it exists).
        dtype: dtype of the saved weights; the merge itself runs in fp32.

    Returns:
        ``out_dir``.

    Raises:
        ModelLoadError: an adapter directory is incomplete or not a plain LoRA adapter, the stacked adapters'
            RoPE parameters or max lengths differ, every weight is 0, or the base cannot be loaded.
    """
    if adapters and all(float(w) == 0 for _, w in adapters):
        raise ModelLoadError("every adapter weight is 0: the merge would be the base unchanged; give at least one "
                             "adapter a non-zero weight (PATH:WEIGHT)")
    model = merged_model(base, adapters)
    dirs = [Path(d) for d, _ in adapters]
    model.config.dtype = dtype
    out_dir = Path(out_dir)
    with publish_dir(out_dir) as tmp:
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tok_src = dirs[0] if (dirs[0] / "tokenizer_config.json").is_file() else base
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(tmp)
    return out_dir


def merged_model(base: str, adapters: Sequence[tuple[Path, float]]) -> PreTrainedModel:
    """The model :func:`merge_adapters` writes, in memory and in fp32: the base with the adapters' RoPE-scaled
    config and ``W0 + sum_i w_i delta_i``. Every weight 0 gives the base itself (with that config).

    Raises:
        ModelLoadError: an adapter directory is incomplete or not a plain LoRA adapter, the stacked adapters'
            RoPE parameters or max lengths differ, or the base cannot be loaded.
    """
    dirs, weights = [Path(d) for d, _ in adapters], [float(w) for _, w in adapters]
    if not dirs:
        raise ModelLoadError("no adapter to merge")
    for adapter_dir in dirs:
        for name in ("adapter_config.json", "config.json"):
            if not (adapter_dir / name).is_file():
                raise ModelLoadError(f"{adapter_dir} has no {name}; pass a directory written by llmft method: lora "
                                     "or qlora (checkpoints/step-N/model or final)")
    config = unquantized_base_config(dirs)  # always merge into the unquantized base
    try:
        model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load base model {base!r}: {str(e).splitlines()[0]}") from None
    if all(w == 0 for w in weights):
        return model.eval()
    if len(dirs) == 1 and weights[0] == 1.0:
        try:
            model = peft.PeftModel.from_pretrained(model, dirs[0]).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0]
            raise ModelLoadError(f"cannot apply adapter {str(dirs[0])!r} to {base!r}: {why}") from None
    else:
        model = _stack_adapters(model, base, dirs, weights)
    return model.eval()


def _shared_config(dirs: list[Path]) -> PretrainedConfig:
    """The first adapter's RoPE-scaled ``config.json``, once every stacked adapter is known to share its RoPE
    parameters and max length (deltas trained at different position scalings do not add up to a model).

    Raises:
        ModelLoadError: two adapters were trained with different RoPE settings.
    """
    configs = [AutoConfig.from_pretrained(d) for d in dirs]
    for other, config in zip(dirs[1:], configs[1:]):
        diffs = [f"{key} {getattr(configs[0], key, None)} vs {getattr(config, key, None)}"
                 for key in ("rope_parameters", "max_position_embeddings")
                 if getattr(configs[0], key, None) != getattr(config, key, None)]
        if diffs:
            raise ModelLoadError(f"adapters {dirs[0]} and {other} were trained with different RoPE settings "
                                 f"({'; '.join(diffs)}); stack only adapters trained with the same model.rope "
                                 "and max_seq_len")
    return configs[0]


_PEFT_PREFIX = "base_model.model."  # how PEFT prefixes the base model's names in adapter_model.safetensors
_STACKED = "stacked"


def _stack_adapters(model: PreTrainedModel, base: str, dirs: list[Path], weights: list[float]) -> PreTrainedModel:
    """``W0 + sum_i w_i (W_i - W0)`` for every weight the adapters change (see :func:`merge_adapters`).

    PEFT only ever sees the LoRA part of each adapter: loaded whole, the copies of the extra modules would go to
    PEFT's ``modules_to_save`` wrappers, which ``add_weighted_adapter`` refuses to combine. The copies (and any
    trained bias, which PEFT would load into the shared base layer) are read here as differences to ``W0``.

    Raises:
        ModelLoadError: an adapter has no weights, is not plain LoRA, or does not fit the base.
    """
    names = [f"adapter{i}" for i in range(len(dirs))]
    base_state = model.state_dict()  # W0, not modified until the final merge
    full_deltas: dict[str, torch.Tensor] = {}  # base weight name -> sum_i w_i (W_i - W0)
    touched: list[set[str]] = []  # per adapter, the names of the modules it changes
    peft_model = None
    for name, adapter_dir, weight in zip(names, dirs, weights):
        where = f"cannot apply adapter {str(adapter_dir)!r} to {base!r}"
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise ModelLoadError(f"{where}: it has no adapter_model.safetensors")
        try:
            cfg = peft.PeftConfig.from_pretrained(str(adapter_dir))
            if not isinstance(cfg, peft.LoraConfig) or cfg.use_dora or cfg.lora_bias:
                raise ModelLoadError(f"{where}: only plain LoRA adapters can be stacked (this one is "
                                     f"{cfg.peft_type}{' with DoRA' if getattr(cfg, 'use_dora', False) else ''}"
                                     f"{' with lora_bias' if getattr(cfg, 'lora_bias', False) else ''}); "
                                     "merge it alone with weight 1")
            state = peft.load_peft_weights(str(adapter_dir), device="cpu")
            lora = {k: v for k, v in state.items() if ".lora_" in k}
            modules = {k.split(".lora_")[0].removeprefix(_PEFT_PREFIX) for k in lora}
            for key in state.keys() - lora.keys():
                target = key.removeprefix(_PEFT_PREFIX)
                if target not in base_state:
                    raise ModelLoadError(f"{where}: its tensor {key} matches no weight of the base")
                delta = weight * (state[key].to(torch.float32) - base_state[target])
                full_deltas[target] = full_deltas[target] + delta if target in full_deltas else delta
                modules.add(target.rsplit(".", 1)[0])
            touched.append(modules)
            cfg = dataclasses.replace(cfg, modules_to_save=None, bias="none", inference_mode=True)
            if peft_model is None:
                peft_model = peft.get_peft_model(model, cfg, adapter_name=name)
            else:
                peft_model.add_adapter(name, cfg)
            loaded = peft.set_peft_model_state_dict(peft_model, lora, adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"{where}: {str(e).splitlines()[0]}") from None
        missing = [k for k in loaded.missing_keys if ".lora_" in k and f".{name}." in k]
        if missing or loaded.unexpected_keys:
            raise ModelLoadError(f"{where}: {len(missing)} LoRA tensors missing (e.g. {(missing or ['-'])[0]}), "
                                 f"{len(loaded.unexpected_keys)} unexpected")
    _warn_overlaps(dirs, touched)
    log.info("stacking %s with PEFT add_weighted_adapter (cat, rank %d)",
             " + ".join(f"{w:g} x {d}" for d, w in zip(dirs, weights)),
             sum(peft_model.peft_config[n].r for n in names))
    peft_model.add_weighted_adapter(names, weights, adapter_name=_STACKED, combination_type="cat")
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and _STACKED in module.scaling:
            # "cat" has already folded every w_i * s_i into A; the new adapter inherits use_rslora from the first
            # one, which would scale it by alpha / sqrt(r) = sqrt(r) instead of alpha / r = 1
            module.scaling[_STACKED] = 1.0
    peft_model.set_adapter(_STACKED)
    merged = peft_model.merge_and_unload()
    merged_state = merged.state_dict()
    with torch.no_grad():
        for key, delta in full_deltas.items():
            merged_state[key].add_(delta.to(merged_state[key].dtype))
    return merged


def _warn_overlaps(dirs: list[Path], touched: list[set[str]]) -> None:
    """One warning per pair of stacked adapters that change the same modules."""
    for i in range(len(dirs)):
        for j in range(i + 1, len(dirs)):
            shared = touched[i] & touched[j]
            if shared:
                kinds = sorted({m.rsplit(".", 1)[-1] for m in shared})
                log.warning("adapters %s and %s both change %s (%d modules): their weighted deltas are summed there",
                            dirs[i], dirs[j], ", ".join(kinds), len(shared))
