"""Peak memory per device of a training recipe, estimated before it runs (``llmft plan``).

:func:`estimate_memory` itemizes the bytes each device (GPU, or the host for CPU runs) holds at the peak of a
training step, from the recipe and the model's ``config.json`` alone (no weights are loaded; hub configs resolve
offline, see ``llmft.model.build.architecture_config``). It then says whether that fits a given device memory and,
if not, which recipe changes would make it fit, each with its estimated saving.

Legend: ``b`` micro-batch, ``s`` sequence length, ``h`` hidden size, ``i`` MLP intermediate size, ``q`` = heads x
head_dim, ``kv`` = key/value heads x head_dim, ``nh`` heads, ``L`` layers, ``v`` vocabulary, ``r`` LoRA rank,
``N`` data-parallel ranks (``--gpus``), ``P`` parameters, ``Pt`` trainable parameters. Bytes per element: fp32 4,
bf16/fp16 2.

**Which engine.** ``N > 1`` means the ``deepspeed`` launcher (``DeepSpeedEngine``: ZeRO stage and offload from the
recipe's ``deepspeed`` section or its JSON), ``N = 1`` plain PyTorch (``PlainEngine``), exactly as
``llmft.train.loop`` picks. The activation dtypes follow from that ("modes"):

- ``fp32``: ``train.precision: fp32`` (either engine): every tensor 4 bytes.
- ``amp16``: ``PlainEngine`` with bf16/fp16: fp32 weights and residual stream, matmuls under autocast, so every
  Linear saves its own 16-bit copy of its input and of its weight.
- ``pure16``: ``DeepSpeedEngine`` with bf16/fp16: the module itself is 16-bit; each RMSNorm saves an fp32 copy of
  its input.

**Weights.** ``PlainEngine`` builds the model in fp32: ``4 P``. LoRA adds its A/B matrices, and PEFT keeps a
trainable copy next to the frozen original of each ``trainable_extra`` module (both counted). QLoRA stores the
decoder's Linear weights 4-bit: ``0.5`` byte per parameter plus the quantization constants, ``4/64`` byte (one fp32
absmax per block of 64), or with double quantization ``1/64 + 4/(64*256)`` byte; embedding, lm_head and norms stay
fp32 (``prepare_model_for_kbit_training``). DeepSpeed bf16/fp16 holds every floating-point parameter in 16 bits
(``2 P``); ZeRO-3 divides the weights by ``N``; ``offload_param`` moves them to the host.

**Gradients** exist for trainable parameters only: ``4 Pt`` (plain: fp32), DeepSpeed ``2 Pt`` (16-bit; fp32:
``4 Pt``), divided by ``N`` from ZeRO-2 on; with ``offload_optimizer`` the reduced fp32 gradient partition lives on
the host (``4 Pt / N``). ``PlainEngine`` frees them after each step (``zero_grad(set_to_none=True)``); DeepSpeed
keeps its gradient buffers.

**Optimizer states.** torch AdamW: ``exp_avg`` and ``exp_avg_sq``, ``8 Pt``; bitsandbytes 8-bit AdamW:
``2 Pt`` plus one fp32 absmax per block of 256 per state (``8/256 Pt``); ``paged_`` optimizers are counted on the
host on CUDA (bitsandbytes pages them to CPU memory under pressure; on CPU they are ordinary memory). DeepSpeed
bf16/fp16 adds the fp32 master copy (``4 Pt``). ZeRO-1 and up divide all of it by ``N``; ``offload_optimizer``
moves it to the host.

**Optimizer step temporaries.** torch's multi-tensor AdamW allocates one fp32 tensor per parameter
(``sqrt(exp_avg_sq)``): ``4 Pt``; bitsandbytes updates in place. DeepSpeed also converts the 16-bit gradient
partition to fp32 for the step: ``+ 4 Pt / N`` (both on the host when offloaded).

**Activations** saved for backward, per token, derived from what each op of a transformers ``LlamaDecoderLayer``
keeps (checked against ``torch.autograd.graph.saved_tensors_hooks`` and the profiler's allocations, see
tests/test_plan.py). For full fine-tuning in fp32 one layer keeps::

    input_layernorm        x (h), x * rsqrt (h), output = q/k/v input (h)       3h   (+ rsqrt: 1 fp32)
    attention (SDPA/flash) q, k (after RoPE), v, output = o_proj input       2q + 2kv (+ logsumexp: nh fp32)
    post_attention_norm    x (h), x * rsqrt (h), output = gate/up input (h)  3h
    MLP                    gate (i), silu(gate) (i), up (i), their product = down input (i)     4i

that is ``(6h + 2q + 2kv + 4i) x 4`` bytes per token per layer, plus ``3h x 4`` outside the layers (the final norm's
input, normalized input and output). A frozen weight saves less: a Linear saves its input only when its weight
trains or it carries a LoRA adapter (whose A then saves it, and B saves A's output, ``r``); a norm saves the
normalized input only when its weight trains; nothing before the first trainable op needs saving (LoRA without a
trained embedding keeps no layer-0 input). LoRA dropout ``> 0`` adds, per adapted Linear, the dropped-out input and
its mask (1 byte from CUDA's fused kernel; on CPU a float tensor of the input's dtype). ``amp16`` saves the fp32
residual stream and norm internals, one 16-bit cast of the input per Linear that needs it (so q, k and v each keep
one), and 16-bit q/k/v/attention/MLP tensors (QLoRA's 4-bit Linears return fp32, so its MLP tensors are 4 bytes),
plus a 16-bit copy of every Linear weight used (``2`` bytes per Linear parameter; with checkpointing, of the
trainable ones); a LoRA adapter on o_proj adds one more 16-bit copy of its input (PEFT casts it up to the fp32
adapter's dtype and autocast back down). ``pure16`` saves 2 bytes per tensor, but each norm keeps a 4-byte copy of
its input. Total: ``b x s x (L x layer + outside)``.

**Backward working set.** A layer's backward frees each saved tensor as it produces its gradient; on top of the
saved activations about ``b x s x (i + h)`` activation-gradient elements are alive (measured), plus, for eager
attention, one fp32 ``(b, nh, s, s)`` score gradient.

**Gradient checkpointing** keeps only each layer's input, ``L x b x s x h x`` (4, or 2 in ``pure16``), plus the
outside-the-layers part; in backward one layer at a time is recomputed, holding that layer's activations (and
attention probabilities / mask) again, on top of its working set. With ``checkpoint_every_n_layers: n`` only
layers 0, n, 2n, ... are checkpointed (``ceil(L / n)`` inputs); the others keep their full activations. With
``activation_offload`` on a GPU the checkpointed inputs are listed as host memory. With
``checkpoint_keep_attention`` each checkpointed layer also keeps its attention kernel's output and logsumexp,
``b x s x (q x e + nh x 4)`` (listed with the attention), so that the recompute skips attention.

**Attention.** FlashAttention-2 and PyTorch SDPA never hold the ``(b, nh, s, s)`` scores: they save the output
and a ``(b, nh, s)`` fp32 logsumexp (counted above). On CPU, torch 2.13's SDPA dispatches to its flash kernel too
(``ScaledDotProductFlashAttentionForCpuBackward`` in the graph), with or without a mask. A mask (``data.packing:
isolated`` with sdpa) is converted to a float ``(b, 1, s, s)`` tensor and saved by every layer: ``b s^2`` x dtype
bytes per layer (and GQA keys/values are repeated to ``q`` width). ``eager`` keeps the softmax
probabilities, ``b x nh x s^2 x 4`` per layer (``x 6`` in 16-bit: fp32 softmax plus its 16-bit cast) and an
``e x q`` contiguous copy of its output for o_proj.

**Logits and loss.** The model's own loss (``train.loss_chunk_tokens: 0``) peaks in the backward of the
cross-entropy, when the saved fp32 log-softmax, its incoming gradient and the gradient of the logits coexist:
``3 x b x s x v x 4`` bytes (the forward holds at most ``b s v (2 + 4 + 4)``: 16-bit logits, their fp32 copy, the
log-softmax). With ``loss_chunk_tokens = C``, only one chunk's worth exists, plus two fp32 ``(b, s, h)`` gradient
buffers of the chunked hidden states; the lm_head weight gradient accumulates over chunks. A plain Linear head (the
fused path of llmft/train/loss.py) holds one fp32 ``(b C, v)`` buffer, ``b x C x v x 4`` (16-bit: ``x 8``, the
16-bit logits and the gradient's 16-bit cast beside it); a wrapped head (LoRA on lm_head, ZeRO-3) recomputes the
chunk in the backward pass: ``3 x b x C x v x 4``.

**Peak.** Persistent: weights + optimizer states (+ DeepSpeed's gradient and communication buffers). On top of that
the step passes through phases that do not overlap; the peak is the persistent part plus the largest::

    loss backward:          activations + attention + autocast weight copies + logits/loss + G
    layers' backward start: activations + attention + autocast weight copies + working set + G'
    end of backward:        gradients + working set (+ the first layer's activations, or its recompute)
    optimizer step:         gradients + optimizer step temporaries

``G``: all gradients with gradient accumulation > 1 (kept between micro-batches), else the lm_head gradient with
a chunked loss (it accumulates over the chunks), else none; ``G'`` the same with the lm_head gradient always.
Gradients of later layers appear while activations of earlier ones are still held, so the layers' backward is
bounded by its two ends (all activations and no layer gradients; all gradients and the first layer). DeepSpeed
keeps its gradients in persistent buffers (counted as persistent).

**DeepSpeed buffers.** ZeRO-1/2: the gradient reduction bucket, ``reduce_bucket_size x 2`` bytes (twice with
``overlap_comm``); ZeRO-3: the reduction bucket plus the gathered parameters in use,
``min(stage3_max_live_parameters, stage3_prefetch_bucket_size + one layer) x 2`` bytes. Values come from the
recipe's DeepSpeed JSON, else DeepSpeed's defaults (5e8, 5e8, 5e7, 1e9). Not measured with llmft (no GPUs here).

**Framework overhead**, reported separately from the peak: on CPU the resident memory of the imported libraries,
measured once (:data:`FRAMEWORK_CPU_BYTES`); on CUDA the context and library workspaces, assumed
(:data:`CUDA_CONTEXT_BYTES`).

**What is validated** (tests/test_plan.py, CPU, torch 2.13, transformers 5.23). The saved activations equal
what autograd saves in a real forward pass within 0.5% (fp32 and bf16 autocast, full and LoRA, with and without
checkpointing). Two real training steps (build_model, apply_lora, PlainEngine) of a LLaMA with vocab 32000,
hidden 256, 4 layers at 1024 tokens, each in a fresh process, peak at (estimate / measured RSS increase):
full fine-tuning fp32 718 / 745 MB, with checkpointing and a 256-token loss chunk 391 / 422 MB, LoRA 536 /
566 MB; asserted within 20%. The rest of the RSS is the tokenizer, module objects and malloc slack. Those runs
fix glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``): with glibc's default, dynamic threshold, freed
heap memory below 32 MB stays resident and the same runs measured 782, 700 and 698 MB (the checkpointed run 1.8x
its live peak). On CPU, set that variable (or use jemalloc/tcmalloc) to get the estimate's peak. 16-bit modes,
QLoRA, eager attention and masks were checked against the profiler's live-byte peak on smaller models (within
about 10%); DeepSpeed sharding and buffers follow the formulas above and are not validated against a GPU run.
"""

from __future__ import annotations

import dataclasses
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


# ---------------------------------------------------------------------------------------------- inputs


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

    @property
    def mode(self) -> str:
        if self.precision == "fp32":
            return "fp32"
        return "pure16" if self.engine == "deepspeed" else "amp16"


@dataclass
class Item:
    """One line of the estimate: bytes per device, and on the host (offloaded or paged)."""

    name: str
    device_bytes: float
    host_bytes: float = 0.0
    note: str = ""


@dataclass
class Suggestion:
    """A recipe change, and the estimated peak per device with it."""

    change: str
    saving_bytes: float
    peak_bytes: float
    fits: bool | None


@dataclass
class Plan:
    """The estimate for one recipe on ``world_size`` devices. All byte counts are per device (per rank).

    ``peak_bytes`` is the estimated peak of the training step (see the module docstring: not the plain sum of the
    items, whose phases do not overlap); ``framework_bytes`` comes on top of it and is reported separately.
    """

    recipe_name: str
    setup: Setup
    shapes: Shapes
    trainable_params: int
    items: list[Item]
    peak_bytes: float
    peak_phase: str
    framework_bytes: float
    framework_note: str
    device_mem_bytes: float | None = None
    suggestions: list[Suggestion] = field(default_factory=list)
    combined: Suggestion | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def host_bytes(self) -> float:
        return sum(i.host_bytes for i in self.items)

    @property
    def total_bytes(self) -> float:
        """Peak plus framework overhead: what must fit in the device memory."""
        return self.peak_bytes + self.framework_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_mem_bytes is None else self.total_bytes <= self.device_mem_bytes

    def item(self, name: str) -> Item:
        return next(i for i in self.items if i.name == name)

    def report(self) -> str:
        """The table ``llmft plan`` prints: items (GB), peak, framework overhead, total, verdict, suggestions."""
        st, sh = self.setup, self.shapes
        digits = 2 if self.total_bytes >= 10 * GB else 3
        engine = (f"DeepSpeed ZeRO-{st.stage}" + (f", optimizer offload {st.offload_optimizer}"
                                                  if st.offload_optimizer != "none" else "")
                  + (f", param offload {st.offload_param}" if st.offload_param != "none" else "")
                  if st.engine == "deepspeed" else "plain PyTorch (one process)")
        mem = f" ({self.device_mem_bytes / GB:.1f} GB each)" if self.device_mem_bytes else ""
        lines = [
            f"llmft plan: {self.recipe_name} on {st.world_size} x {st.device}{mem}: {engine}, {st.precision}, "
            f"attention {st.attention}",
            f"model: {_count(sh.total_params)} parameters ({_count(self.trainable_params)} trainable, method "
            f"{st.method}), {sh.layers} layers, hidden {sh.hidden}, vocab {sh.vocab}; micro-batch {st.micro_batch} "
            f"x {st.seq_len} tokens, gradient checkpointing {'on' if st.checkpointing else 'off'}, loss "
            + (f"in chunks of {st.loss_chunk}" if st.loss_chunk else "over full logits"),
            "",
            f"{'item':<34}{'device (GB)':>12}{'host (GB)':>11}  note",
        ]
        for it in self.items:
            host = f"{it.host_bytes / GB:>11.{digits}f}" if it.host_bytes else f"{'':>11}"
            lines.append(f"{it.name:<34}{it.device_bytes / GB:>12.{digits}f}{host}  {it.note}")
        lines += [
            f"{'peak per device (estimate)':<34}{self.peak_bytes / GB:>12.{digits}f}{'':>11}  {self.peak_phase}",
            f"{'framework overhead':<34}{self.framework_bytes / GB:>12.{digits}f}{'':>11}  {self.framework_note}",
            f"{'total per device':<34}{self.total_bytes / GB:>12.{digits}f}"
            + (f"{self.host_bytes / GB:>11.{digits}f}  host: offloaded/paged, per rank" if self.host_bytes else ""),
        ]
        lines += [f"note: {n}" for n in self.notes]
        if self.device_mem_bytes is not None:
            mem, head = self.device_mem_bytes, self.device_mem_bytes - self.total_bytes
            if self.fits:
                tight = "; under 10%: allocator fragmentation may need it" if head < 0.1 * mem else ""
                lines.append(f"fits: {self.total_bytes / GB:.1f} of {mem / GB:.1f} GB (headroom {head / GB:.1f} GB"
                             f"{tight})")
            else:
                lines.append(f"does not fit: {self.total_bytes / GB:.1f} GB needed, {mem / GB:.1f} GB available "
                             f"({-head / GB:.1f} GB over)")
                if self.suggestions:
                    lines.append("what to change, by estimated saving per device:")
                    for k, s in enumerate(self.suggestions, 1):
                        lines.append(f"  {k}. {s.change}: saves {s.saving_bytes / GB:.1f} GB -> "
                                     f"{(s.peak_bytes + self.framework_bytes) / GB:.1f} GB"
                                     + (" (fits)" if s.fits else ""))
                    if self.combined is not None:
                        lines.append(f"  together: {self.combined.change} -> "
                                     f"{(self.combined.peak_bytes + self.framework_bytes) / GB:.1f} GB, "
                                     + ("fits" if self.combined.fits else "still does not fit"))
                else:
                    lines.append("no recipe change estimated here makes it fit: use more or larger devices")
        return "\n".join(lines)


def _count(n: float) -> str:
    """6.74B, 19.6M, 512K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------------------------------- parsing


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
                 ds_buffers=buffers)


# ---------------------------------------------------------------------------------------------- the model


def _trainable(sh: Shapes, st: Setup) -> dict:
    """Which parts train, and the trainable parameter counts.

    Raises:
        RecipeError: LoRA targets without a closed-form size (not a LLaMA projection).
    """
    if st.method == "full":
        return {"linears": set(_LINEARS), "lora": set(), "norm": True, "embed": True, "head": True,
                "adapter": 0, "extra": 0, "total": sh.total_params}
    from llmft.model.adapters import lora_parameter_count

    lo = st.lora or LoraConfig()
    extra = {"embed": sh.embed_params, "lm_head": sh.head_params, "norm": sh.norm_params}
    extra_params = sum(extra[e] for e in lo.trainable_extra)
    try:
        total = lora_parameter_count(sh.config, lo)
    except ValueError as e:
        raise RecipeError([f"lora.target_modules: {e}; llmft plan sizes LLaMA projections only"]) from None
    return {"linears": set(), "lora": set(lo.targets), "norm": "norm" in lo.trainable_extra,
            "embed": "embed" in lo.trainable_extra, "head": "lm_head" in lo.trainable_extra,
            "adapter": total - extra_params, "extra": extra_params, "total": total}


def _layer_bytes_per_token(sh: Shapes, st: Setup, tr: dict, rg_in: bool) -> float:
    """Bytes one decoder layer saves for backward per token.

    ``rg_in``: the layer input requires grad (false only before the first trainable op, e.g. layer 0 of a LoRA
    model with a frozen embedding).
    """
    mode, h, i, q, kv, nh = st.mode, sh.hidden, sh.inter, sh.q, sh.kv, sh.heads
    e = 4 if mode == "fp32" else 2  # matmul outputs
    res = 2 if mode == "pure16" else 4  # residual stream
    x_saved = 4 if mode == "pure16" else res  # a norm's saved input (pure16: its fp32 copy)
    n_saved = 2 if mode == "pure16" else 4  # normalized input, saved when the norm weight trains
    lo = st.lora or LoraConfig()
    rank, dropout = lo.rank, lo.dropout
    # dropout's mask: a bool tensor from CUDA's fused kernel; on CPU a float tensor of the input's dtype
    mask = 1 if st.device == "cuda" else (4 if mode != "pure16" else 2)
    e_mlp = 4 if (st.method == "qlora" and mode == "amp16") else e  # 4-bit Linears return the input dtype (fp32)

    def needs_input(name: str) -> bool:
        return name in tr["linears"] or name in tr["lora"]

    def norm(rg: bool) -> float:
        return (x_saved * h + 4 if rg else 0) + (n_saved * h if tr["norm"] else 0)

    def linear_inputs(names: tuple[str, ...], width: int, already_saved: bool = False) -> float:
        """Bytes saved by the Linears (and their adapters) that read one tensor of ``width`` per token;
        ``already_saved``: another op keeps that tensor anyway (the attention output)."""
        need = [n for n in names if needs_input(n)]
        adapted = [n for n in names if n in tr["lora"]]
        b = rank * e * len(adapted)  # lora_A outputs, saved by lora_B
        if dropout > 0:  # each adapter drops out its own copy of the input and keeps the mask
            b += len(adapted) * width * (mask + (2 if mode == "amp16" else e))
        direct = [n for n in need if n in tr["linears"] or dropout == 0]  # read the tensor itself
        if already_saved:  # but under autocast PEFT casts a 16-bit input up to the fp32 adapter's dtype, and
            # lora_A's autocast back down: a new 16-bit copy per adapter
            return b + (2 * width * sum(1 for n in adapted if dropout == 0) if mode == "amp16" else 0)
        if not direct:
            return b
        if mode == "amp16":  # every Linear and lora_A casts its input to 16 bits and saves its own cast
            return b + len(direct) * 2 * width
        return b + e * width

    total = norm(rg_in) + linear_inputs(("q_proj", "k_proj", "v_proj"), h)
    rg_attn = rg_in or tr["norm"] or any(needs_input(n) for n in ("q_proj", "k_proj", "v_proj"))
    if rg_attn:
        kv_width = q if (st.isolated and st.attention == "sdpa" and sh.kv_heads != sh.heads) else kv  # repeat_kv
        total += e * (2 * q + 2 * kv_width)  # q, k after RoPE, v, attention output
        total += e * q if st.attention == "eager" else 4 * nh  # eager: o_proj's contiguous copy; else logsumexp
    total += linear_inputs(("o_proj",), q, already_saved=True)
    rg_mid = rg_attn or needs_input("o_proj")
    total += norm(rg_mid) + linear_inputs(("gate_proj", "up_proj"), h)
    rg_mlp = rg_mid or tr["norm"] or needs_input("gate_proj") or needs_input("up_proj")
    if rg_mlp:
        total += 3 * e_mlp * i  # gate (silu input), silu(gate), up
    return total + linear_inputs(("down_proj",), i)


def _activations(sh: Shapes, st: Setup, tr: dict) -> dict:
    """Activation-side bytes per device (see the module docstring)."""
    b, s, h, v, L = st.micro_batch, st.seq_len, sh.hidden, sh.vocab, sh.layers
    mode = st.mode
    res = 2 if mode == "pure16" else 4
    rg0 = tr["embed"] or st.method == "qlora"  # QLoRA's prepare makes the embedding output require grad
    first = _layer_bytes_per_token(sh, st, tr, rg0)
    other = _layer_bytes_per_token(sh, st, tr, True)  # every later layer's input requires grad
    # outside the layers: the final norm (input, normalized input) and its output (lm_head input / chunk input)
    outside = (4 if mode == "pure16" else res) * h + 4 + ((2 if mode == "pure16" else 4) * h if tr["norm"] else 0)
    if st.loss_chunk:
        outside += res * h  # the final hidden states, kept as the chunks' checkpoint input
    elif tr["head"]:
        outside += (2 if mode != "fp32" else 4) * h
    per_token_layers = first + (L - 1) * other
    layer_max = max(first, other)
    # attention: masks (isolated packing with sdpa) and eager probabilities, per layer
    e = 4 if mode == "fp32" else 2
    attn_layer = 0.0
    attn_transient = 0.0
    if st.attention == "eager":
        attn_layer = b * sh.heads * s * s * (4 if mode == "fp32" else 6)
        attn_transient = b * sh.heads * s * s * 4  # the fp32 score gradient of one layer in its backward
    elif st.attention == "sdpa" and st.isolated:
        attn_layer = b * s * s * e
    # a layer's backward frees each saved tensor as it makes its gradient: net, about one MLP-wide gradient (i)
    # and the gradient of the layer output (h) are alive on top of the saved activations
    grad_transient = b * s * (sh.inter * e + h * res) + attn_transient
    offloaded = 0.0
    if st.checkpointing:
        lc = -(-L // st.every_n)  # checkpointed layers: 0, n, 2n, ...; the others keep their activations
        inputs = b * s * lc * res * h
        if st.offload and st.device == "cuda":  # save_on_cpu: the layer inputs wait in pinned host memory
            offloaded, inputs = inputs, 0.0
        saved = inputs + b * s * ((L - lc) * other + outside)
        working = b * s * layer_max + attn_layer + grad_transient  # one layer recomputed, then its backward
        attention = (L - lc) * attn_layer
        if st.keep_attention and st.attention != "eager":  # the checkpointed layers' attention outputs, kept
            attention += lc * b * s * (e * sh.q + 4 * sh.heads)  # (b, s, q) and the (b, nh, s) fp32 logsumexp
    else:
        saved = b * s * (per_token_layers + outside)
        working = grad_transient
        attention = L * attn_layer
    # logits and loss
    if st.loss_chunk:
        c = min(st.loss_chunk, s - 1)
        fused = not (st.engine == "deepspeed" and st.stage == 3) and not (st.method != "full" and tr["head"])
        logits = (12 if not fused else 4 if mode == "fp32" else 8) * b * c * v + 2 * 4 * b * s * h
    else:
        logits = 12 * b * s * v
    # autocast's 16-bit weight copies (PlainEngine bf16/fp16)
    casts = 0.0
    if mode == "amp16":
        layer_lin = sh.layer_linear_params if st.method != "qlora" else 0  # 4-bit weights dequantize instead
        trainable_lin = sum(sh.linear_params(n) for n in tr["linears"])
        if st.checkpointing:  # trainable casts stay cached for the forward; frozen ones: one layer's recompute
            casts = 2 * (L * trainable_lin + layer_lin + (v * h if tr["head"] else 0))
        else:
            casts = 2 * (L * layer_lin + v * h)
        casts += 2 * tr["adapter"]
    return {"saved": saved, "working": working, "attention": attention, "logits": logits, "casts": casts,
            "first_layer": first, "other_layer": other, "offloaded": offloaded}


def _quantized_bytes_per_param(qcfg: QLoraConfig) -> float:
    return 0.5 + (1 / 64 + 4 / (64 * 256) if qcfg.double_quant else 4 / 64)


def _estimate(sh: Shapes, st: Setup) -> tuple[list[Item], float, str, int]:
    """Items, peak bytes, how the peak is made up (persistent + the largest phase), trainable parameters."""
    tr = _trainable(sh, st)
    pt, n = tr["total"], st.world_size
    ds = st.engine == "deepspeed"
    sixteen = st.precision != "fp32"
    host_is_device = st.device == "cpu"
    items: list[Item] = []

    def add(name: str, nbytes: float, offloaded: bool = False, note: str = "") -> Item:
        it = Item(name, 0.0 if offloaded and not host_is_device else nbytes,
                  nbytes if offloaded and not host_is_device else 0.0, note)
        items.append(it)
        return it

    # weights
    if st.method == "qlora":
        q = st.qlora or QLoraConfig()
        quantized = sh.layers * sh.layer_linear_params
        dense = sh.total_params - quantized + tr["adapter"] + tr["extra"]
        w = quantized * _quantized_bytes_per_param(q) + dense * (2 if ds and sixteen else 4)
        wnote = f"decoder Linears {q.quant_type} 4-bit" + (" + double-quant" if q.double_quant else "") + \
            f" ({_quantized_bytes_per_param(q):.3f} B/param), the rest {'16-bit' if ds and sixteen else 'fp32'}"
    else:
        params = sh.total_params + tr["adapter"] + tr["extra"]
        per = 2 if ds and sixteen else 4
        w = params * per
        wnote = f"{_count(params)} x {per} B"
        if st.method == "lora" and tr["extra"]:
            wnote += " (frozen base + adapters + trained copies of " + ", ".join(st.lora.trainable_extra) + ")"
    sharded_w = ds and st.stage == 3
    if sharded_w:
        w /= n
        wnote += f", ZeRO-3 / {n}"
    weights = add("weights", w, offloaded=ds and st.offload_param != "none", note=wnote)

    # gradients
    if ds:
        g = pt * (2 if sixteen else 4) / (n if st.stage >= 2 else 1)
        gnote = f"{'16-bit' if sixteen else 'fp32'}" + (f", ZeRO-{st.stage} / {n}" if st.stage >= 2 else "")
        if st.offload_optimizer != "none" and st.stage >= 2:
            g, gnote = pt * 4 / n, f"fp32 partition / {n}, offloaded"
        grads = add("gradients", g, offloaded=st.offload_optimizer != "none" and st.stage >= 2, note=gnote)
    else:
        grads = add("gradients", pt * 4, note="fp32, trainable only; freed after each step")

    # optimizer states
    paged = st.optimizer.startswith("paged_")
    per_state = 2 + 8 / 256 if "8bit" in st.optimizer else 8
    o = pt * per_state + (pt * 4 if ds and sixteen else 0)
    onote = ("bitsandbytes 8-bit AdamW" if "8bit" in st.optimizer else "AdamW m, v fp32") + \
        (" + fp32 master" if ds and sixteen else "") + (", paged" if paged else "")
    shard_o = ds and st.stage >= 1
    if shard_o:
        o /= n
        onote += f", ZeRO-{st.stage} / {n}"
    offload_o = ds and st.offload_optimizer != "none"
    opt = add("optimizer states", o, offloaded=offload_o or (paged and st.device == "cuda"), note=onote)

    # optimizer step temporaries
    temp = (pt * 4 if st.optimizer == "adamw" else 0) + (pt * 4 if ds and sixteen else 0)
    if shard_o:
        temp /= n
    step_tmp = add("optimizer step temporaries", temp, offloaded=offload_o,
                   note="sqrt(exp_avg_sq) of torch's multi-tensor AdamW" if st.optimizer == "adamw" else
                   "bitsandbytes updates in place")

    # activations
    act = _activations(sh, st, tr)
    every = f" every {st.every_n} layers" if st.every_n > 1 else ""
    acts = add("activations (saved for backward)", act["saved"],
               note=(f"layer inputs only (gradient checkpointing{every})" if st.checkpointing else
                     f"{act['other_layer'] / 1024:.1f} KiB per token per layer") + f", {st.mode}")
    if act["offloaded"]:
        add("checkpointed layer inputs (activation_offload)", act["offloaded"], offloaded=True,
            note="pinned host memory")
    working = add("backward working set (one layer)", act["working"],
                  note="one layer's activations recomputed" if st.checkpointing else
                  "gradients of one layer's activations in its backward")
    attn_note = {"flash_attention_2": "FlashAttention-2: no (s, s) scores", "eager": "eager: softmax (b, nh, s, s) "
                 "kept per layer"}.get(st.attention, "sdpa " + ("with the isolated-packing mask (b, 1, s, s) "
                                                                "saved per layer" if st.isolated else
                                                                "flash/efficient kernel: no (s, s) scores"))
    attention = add("attention scores / masks", act["attention"], note=attn_note)
    logits = add("logits + loss", act["logits"],
                 note=(f"one chunk of {min(st.loss_chunk, st.seq_len - 1)} positions" if st.loss_chunk else
                       "full (b, s, v) fp32, x3 in the loss backward"))
    casts = add("16-bit weight copies (autocast)", act["casts"],
                note="saved by autocast matmuls" if st.mode == "amp16" else "none in this mode")

    # DeepSpeed buffers
    buf = 0.0
    if ds:
        bb = st.ds_buffers or dict(_DS_DEFAULTS, overlap_comm=st.stage == 3)
        gbytes = 2 if sixteen else 4
        bucket = min(bb["reduce_bucket_size"], pt) * gbytes
        if st.stage in (1, 2) and bb["overlap_comm"]:
            bucket *= 2
        buf = bucket
        if st.stage == 3:
            per_layer = sh.layer_linear_params + 2 * sh.hidden
            live = min(bb["stage3_max_live_parameters"], bb["stage3_prefetch_bucket_size"] + per_layer,
                       sh.total_params)
            buf += live * (2 if sixteen else 4)
        add("DeepSpeed buffers", buf, note="gradient reduction bucket" + (" + gathered ZeRO-3 parameters"
                                                                          if st.stage == 3 else ""))

    # the peak: persistent + max(forward/backward phases, optimizer step)
    persistent = weights.device_bytes + opt.device_bytes + buf + (grads.device_bytes if ds else 0)
    g_dev = 0.0 if ds else grads.device_bytes  # DeepSpeed's gradient buffers are persistent (above)
    head_grad = sh.vocab * sh.hidden * 4 if tr["head"] and not ds else 0  # (tied: the embedding's)
    g_loss = g_dev if st.accumulation > 1 else (head_grad if st.loss_chunk else 0)
    g_layers = g_dev if st.accumulation > 1 else head_grad
    held = acts.device_bytes + attention.device_bytes + casts.device_bytes
    first_layer = 0.0 if st.checkpointing else act["first_layer"] * st.micro_batch * st.seq_len
    phases = {
        "loss backward (activations + logits/loss" + (" + gradients)" if g_loss else ")"):
            held + logits.device_bytes + g_loss,
        "start of the layers' backward (activations + one layer's working set" + (" + gradients)" if g_layers
                                                                                    else ")"):
            held + working.device_bytes + g_layers,
        "end of backward (gradients + the first layer's " + ("recompute)" if st.checkpointing else "activations)"):
            g_dev + working.device_bytes + first_layer,
        "optimizer step (gradients + step temporaries)": g_dev + step_tmp.device_bytes,
    }
    phase = max(phases, key=phases.get)
    what = "weights, optimizer states" + (", gradients, buffers" if ds else "")
    return items, persistent + phases[phase], f"{persistent / GB:.3g} GB persistent ({what}) + {phase}", pt


def estimate_memory(recipe: Recipe, world_size: int = 1, device_mem_bytes: float | None = None,
                    device: Literal["cuda", "cpu"] = "cuda", recipe_name: str = "recipe") -> Plan:
    """Estimate the peak memory per device of training ``recipe`` on ``world_size`` devices.

    Args:
        recipe: a validated recipe.
        world_size: data-parallel ranks; more than one means the DeepSpeed engine (as ``llmft.train.loop``).
        device_mem_bytes: memory per device; when given, the plan says whether it fits and, if not, what to change.
        device: "cuda" (plan a GPU run) or "cpu" (a CPU run: everything in host memory).
        recipe_name: shown in the report.

    Returns:
        A :class:`Plan` (bytes per device; see the module docstring for every formula).

    Raises:
        RecipeError: the model's config cannot be found, or its architecture has no closed form here.
    """
    from llmft.model.build import ModelLoadError, architecture_config

    try:
        config = architecture_config(recipe.model)
    except ModelLoadError as e:
        raise RecipeError([str(e)]) from None
    if config is None:
        raise RecipeError([f"model.name: the config of {recipe.model.name!r} cannot be read here (not local, hub "
                           "unreachable, not shipped with llmft). Fix: download it, or give a local directory"])
    try:
        shapes = Shapes.from_config(config)
    except (AttributeError, TypeError) as e:
        raise RecipeError([f"model.name: llmft plan models LLaMA-family decoders; {recipe.model.name!r} has no {e}"])
    setup = setup_from_recipe(recipe, world_size, device)
    return plan_for(shapes, setup, device_mem_bytes, recipe_name)


def plan_for(shapes: Shapes, setup: Setup, device_mem_bytes: float | None = None,
             recipe_name: str = "recipe") -> Plan:
    """:func:`estimate_memory` for given shapes and settings (also used for the suggestions)."""
    items, peak, phase, pt = _estimate(shapes, setup)
    if setup.device == "cpu":
        framework, fnote = FRAMEWORK_CPU_BYTES, "torch + transformers + peft + llmft imports (RSS, measured)"
    else:
        framework, fnote = CUDA_CONTEXT_BYTES, "CUDA context + library workspaces (assumed, not measured)"
    plan = Plan(recipe_name, setup, shapes, pt, items, peak, phase, framework, fnote, device_mem_bytes)
    if setup.device == "cpu":
        plan.notes.append("glibc's default malloc keeps freed heap memory resident: RSS can exceed this peak (1.8x "
                          "in a checkpointed test run); MALLOC_MMAP_THRESHOLD_=131072 or jemalloc/tcmalloc avoid it")
    if setup.attention == "flash_attention_2" and setup.device == "cuda":
        plan.notes.append("attention assumes flash-attn is installed (model.attention auto/flash_attention_2)")
    if device_mem_bytes is not None and not plan.fits:
        plan.suggestions, plan.combined = _suggestions(shapes, setup, peak, device_mem_bytes - framework)
    return plan


# ---------------------------------------------------------------------------------------------- suggestions


def _candidates(sh: Shapes, st: Setup) -> list[tuple[str, Setup]]:
    """Recipe changes that lower memory, each as (description, changed setup)."""
    r = dataclasses.replace
    out: list[tuple[str, Setup]] = []
    if not st.checkpointing:
        out.append(("set model.gradient_checkpointing: true", r(st, checkpointing=True)))
    if not st.loss_chunk and st.seq_len > 256:
        c = min(4096, max(128, st.seq_len // 8))
        out.append((f"set train.loss_chunk_tokens: {c}", r(st, loss_chunk=c)))
    if st.engine == "deepspeed":
        for stage in range(st.stage + 1, 4):
            out.append((f"raise deepspeed.stage to {stage}", r(st, stage=stage)))
        if st.stage >= 1 and st.offload_optimizer == "none":
            out.append(("set deepspeed.offload_optimizer: cpu", r(st, offload_optimizer="cpu")))
        if st.stage == 3 and st.offload_param == "none":
            out.append(("set deepspeed.offload_param: cpu", r(st, offload_param="cpu")))
    elif st.device == "cuda":
        out.append(("launch with deepspeed (ZeRO-2, deepspeed.offload_optimizer: cpu) even on one GPU",
                    r(st, engine="deepspeed", stage=2, offload_optimizer="cpu", ds_buffers={})))
    if st.method == "full":
        out.append(("use method: lora (r=8 on q/k/v/o)", r(st, method="lora", lora=LoraConfig())))
    if st.method in ("full", "lora") and st.device == "cuda" and (st.engine == "plain" or st.stage != 3):
        out.append(("use method: qlora (4-bit NF4 base)",
                    r(st, method="qlora", lora=st.lora or LoraConfig(), qlora=QLoraConfig())))
    if st.micro_batch > 1:
        half = st.micro_batch // 2
        out.append((f"lower train.micro_batch_size to {half} (and double gradient_accumulation_steps)",
                    r(st, micro_batch=half, accumulation=st.accumulation * 2)))
    if st.precision == "fp32" and st.device == "cuda":
        out.append(("set train.precision: bf16", r(st, precision="bf16")))
    if st.attention == "eager":
        better = "flash_attention_2" if st.device == "cuda" else "sdpa"
        out.append((f"set model.attention: {better}", r(st, attention=better)))
    elif st.attention == "sdpa" and st.isolated and st.device == "cuda":
        out.append(("set model.attention: flash_attention_2 (isolated packing without a (s, s) mask)",
                    r(st, attention="flash_attention_2")))
    return out


def _suggestions(sh: Shapes, st: Setup, peak: float, budget: float) -> tuple[list[Suggestion], Suggestion | None]:
    """Single changes ordered by saving, and the greedy combination of them in that order until it fits."""
    singles = []
    for change, new in _candidates(sh, st):
        p = _estimate(sh, new)[1]
        if p < peak:
            singles.append((Suggestion(change, peak - p, p, p <= budget), new))
    singles.sort(key=lambda x: -x[0].saving_bytes)
    combined, current, applied = None, st, []
    if singles and not singles[0][0].fits:
        for s, new in singles:
            changed = {f.name: getattr(new, f.name) for f in dataclasses.fields(new)
                       if getattr(new, f.name) != getattr(st, f.name)}
            trial = dataclasses.replace(current, **changed)
            p = _estimate(sh, trial)[1]
            if p < _estimate(sh, current)[1]:
                current, applied = trial, applied + [s.change]
                if p <= budget:
                    break
        if len(applied) > 1:
            p = _estimate(sh, current)[1]
            combined = Suggestion("; ".join(applied), peak - p, p, p <= budget)
    return [s for s, _ in singles], combined

