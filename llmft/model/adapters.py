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
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import peft
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from llmft.config import LoraConfig
from llmft.model.build import ModelLoadError


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


def prepare_quantized(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """PEFT's ``prepare_model_for_kbit_training`` for a 4-bit base: freezes it, casts the non-quantized weights
    (norms, embedding) to fp32, makes the input embedding output require grad (needed with checkpointing
    and a frozen embedding) and enables gradient checkpointing when the recipe asks for it."""
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})


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


def export_adapter(out_dir: Path, model: peft.PeftModel, tokenizer, dtype: torch.dtype) -> None:
    """Write the adapter (PEFT format, weights in ``dtype``), the RoPE-scaled base config and the tokenizer.

    For a QLoRA model the config is written without its ``quantization_config``: the adapter reloads on the
    ordinary base (see the module docstring).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # packed 4-bit weights and their quantization state are not floating point: leave them be (PEFT drops them)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    config = copy.deepcopy(model.get_base_model().config)
    _drop_quantization(config)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _drop_quantization(config: PretrainedConfig) -> None:
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """Base (with the adapter's RoPE-scaled config) + adapter -> a plain Hugging Face checkpoint.

    LoRA updates are folded into the base weights (``merge_and_unload``); trained copies of the extra modules
    (embed, norms, lm_head) replace the originals. The output keeps the adapter's ``rope_parameters`` and
    ``max_position_embeddings`` and gets the tokenizer.

    A QLoRA adapter is merged the same way, into the unquantized base: the result is ``W0 + (alpha / r) B @ A``
    with ``W0`` the original base weights, although the adapter was trained against the 4-bit quantized W0.

    Raises:
        ModelLoadError: the adapter directory is incomplete, or the base cannot be loaded.
    """
    adapter_dir = Path(adapter_dir)
    for name in ("adapter_config.json", "config.json"):
        if not (adapter_dir / name).is_file():
            raise ModelLoadError(f"{adapter_dir} has no {name}; pass a directory written by llmft method: lora or "
                             "qlora (checkpoints/step-N/model or final)")
    config = AutoConfig.from_pretrained(adapter_dir)
    _drop_quantization(config)  # always merge into the unquantized base
    try:
        model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load base model {base!r}: {str(e).splitlines()[0]}") from None
    try:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0]
        raise ModelLoadError(f"cannot apply adapter {str(adapter_dir)!r} to {base!r}: {why}") from None
    model.config.dtype = dtype
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(tmp, safe_serialization=True)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
