"""The estimate: bytes per device at the peak of a training step, item by item (weights, gradients, optimizer states and
temporaries, activations, attention, logits and loss, DeepSpeed buffers), whether it fits, and the recipe changes
that would make it fit. The model is docs/memory.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from llmft.config import LoraConfig, QLoraConfig, Recipe, RecipeError
from llmft.plan.inputs import (
    _DS_DEFAULTS,
    _LINEARS,
    CUDA_CONTEXT_BYTES,
    FRAMEWORK_CPU_BYTES,
    GB,
    Setup,
    Shapes,
    setup_from_recipe,
)


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
            f"x {st.seq_len} tokens" + (f" ({st.seq_len // st.sequence} per rank: sequence parallel over "
                                        f"{st.sequence})" if st.sequence > 1 else "")
            + f", gradient checkpointing {'on' if st.checkpointing else 'off'}, loss "
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
    # o_proj reads the attention output that the attention saved anyway; under sequence parallelism it reads the
    # all-to-all's output instead, a tensor of its own
    total += linear_inputs(("o_proj",), q, already_saved=st.sequence == 1)
    rg_mid = rg_attn or needs_input("o_proj")
    total += norm(rg_mid)
    if st.tiled_mlp:  # TiledMLP keeps only the MLP's input; each tile is recomputed in the backward pass
        return total + (e if mode != "amp16" else 4) * h
    total += linear_inputs(("gate_proj", "up_proj"), h)
    rg_mlp = rg_mid or tr["norm"] or needs_input("gate_proj") or needs_input("up_proj")
    if rg_mlp:
        total += 3 * e_mlp * i  # gate (silu input), silu(gate), up
    return total + linear_inputs(("down_proj",), i)


def _mlp_tiles(sh: Shapes, st: Setup) -> int:
    """Tiles each MLP runs in over the rank's share of a sequence (1: not tiled)."""
    from llmft.model.load import mlp_tile_count

    return mlp_tile_count(st.tiled_mlp, st.seq_len // st.sequence, sh.hidden) if st.tiled_mlp else 1


def _activations(sh: Shapes, st: Setup, tr: dict) -> dict:
    """Activation-side bytes per device (see the module docstring)."""
    # s: the tokens of each sequence this rank holds (all of them, or seq_len / parallel.sequence); the attention
    # of a sequence-parallel rank spans the whole sequence (s_full) for heads / parallel.sequence heads
    b, s_full, h, v, L = st.micro_batch, st.seq_len, sh.hidden, sh.vocab, sh.layers
    s = s_full // st.sequence
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
    # isolated packing: one additive (b, 1, s, s) mask over the whole sequence in the compute dtype, shared by every
    # layer (llmft.data.packing.attention_kwargs; under sequence parallelism packed_sdpa builds it once per forward)
    attn_shared = b * s_full * s_full * e if st.isolated and st.attention in ("sdpa", "eager") else 0.0
    # under sequence parallelism with checkpointing it is rebuilt in a layer's recompute, from a bool mask
    attn_rebuild = b * s_full * s_full if attn_shared and st.sequence > 1 and st.checkpointing else 0.0
    # a layer's backward frees each saved tensor as it makes its gradient: net, about one MLP-wide gradient (i)
    # and the gradient of the layer output (h) are alive on top of the saved activations (a tiled MLP: one tile's)
    grad_transient = b * s * (sh.inter * e / _mlp_tiles(sh, st) + h * res) + attn_transient
    # sequence parallelism: one layer's all-to-all buffers (the q, k, v slices sent; the attention output sent
    # and received), alive while the layer runs
    a2a = e * b * s * (3 * sh.q + 2 * sh.kv) if st.sequence > 1 else 0.0
    offloaded = 0.0
    if st.checkpointing:
        lc = -(-L // st.every_n)  # checkpointed layers: 0, n, 2n, ...; the others keep their activations
        inputs = b * s * lc * res * h
        if st.offload and st.device == "cuda":  # save_on_cpu: the layer inputs wait in pinned host memory
            offloaded, inputs = inputs, 0.0
        saved = inputs + b * s * ((L - lc) * other + outside)
        working = b * s * layer_max + attn_layer + attn_rebuild + grad_transient  # a layer recomputed, its backward
        attention = (L - lc) * attn_layer + attn_shared
        if st.keep_attention and st.attention != "eager":  # the checkpointed layers' attention outputs, kept
            attention += lc * b * s * (e * sh.q + 4 * sh.heads)  # (b, s, q) and the (b, nh, s) fp32 logsumexp
    else:
        saved = b * s * (per_token_layers + outside)
        working = grad_transient
        attention = L * attn_layer + attn_shared
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
        # a tiled MLP runs its forward without autograd: no cast of its weights is saved
        mlp = ("gate_proj", "up_proj", "down_proj") if st.tiled_mlp else ()
        layer_lin = sh.layer_linear_params - sum(sh.linear_params(n) for n in mlp)
        layer_lin = layer_lin if st.method != "qlora" else 0  # 4-bit weights dequantize instead
        trainable_lin = sum(sh.linear_params(n) for n in tr["linears"] if n not in mlp)
        if st.checkpointing:  # trainable casts stay cached for the forward; frozen ones: one layer's recompute
            casts = 2 * (L * trainable_lin + layer_lin + (v * h if tr["head"] else 0))
        else:
            casts = 2 * (L * layer_lin + v * h)
        casts += 2 * tr["adapter"]
    return {"saved": saved, "working": working, "attention": attention, "logits": logits, "casts": casts,
            "first_layer": first, "other_layer": other, "offloaded": offloaded, "a2a": a2a}


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
    # ZeRO keeps an fp32 master copy of its partition even of fp32 weights (a clone); so does 16-bit DeepSpeed
    master = ds and (sixteen or st.stage >= 1)
    o = pt * per_state + (pt * 4 if master else 0)
    onote = ("bitsandbytes 8-bit AdamW" if "8bit" in st.optimizer else "AdamW m, v fp32") + \
        (" + fp32 master" if master else "") + (", paged" if paged else "")
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
                 "kept per layer"}.get(st.attention, "sdpa " + ("with the isolated-packing mask (b, 1, s, s), one "
                                                                "shared by the layers" if st.isolated else
                                                                "flash/efficient kernel: no (s, s) scores"))
    attention = add("attention scores / masks", act["attention"], note=attn_note)
    logits = add("logits + loss", act["logits"],
                 note=(f"one chunk of {min(st.loss_chunk, st.seq_len - 1)} positions" if st.loss_chunk else
                       "full (b, s, v) fp32, x3 in the loss backward"))
    a2a = add("all-to-all buffers (SP)", act["a2a"],
              note=f"one layer's q, k, v and output exchange over {st.sequence} ranks") if st.sequence > 1 else None
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
    first_layer = 0.0 if st.checkpointing else act["first_layer"] * st.micro_batch * st.seq_len // st.sequence
    phases = {
        "loss backward (activations + logits/loss" + (" + gradients)" if g_loss else ")"):
            held + logits.device_bytes + g_loss,
        "start of the layers' backward (activations + one layer's working set" + (" + gradients)" if g_layers
                                                                                    else ")"):
            held + working.device_bytes + g_layers + (a2a.device_bytes if a2a else 0.0),
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
        RecipeError: the model's config cannot be found, or its architecture has no closed form here, or
            ``parallel.sequence`` does not divide ``world_size``.
    """
    from llmft.model.load import ModelLoadError, architecture_config

    sp = recipe.parallel.sequence
    if world_size % sp:
        raise RecipeError([f"parallel.sequence: {sp} splits each sequence over {sp} ranks, but the plan is for "
                           f"{world_size}. Fix: give --gpus a multiple of {sp}"])
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
    if st.engine == "deepspeed":  # every sequence-parallel size this launch and model allow
        from llmft.config import heads_problems

        for n in (2, 4, 8, 16, 32, 64):
            if n > st.sequence and st.world_size % n == 0 and st.seq_len % n == 0 and not heads_problems(
                    {"num_attention_heads": sh.heads, "num_key_value_heads": sh.kv_heads}, n):
                out.append((f"set parallel.sequence: {n}", r(st, sequence=n)))
    if not st.tiled_mlp:
        out.append(("set model.tiled_mlp: auto", r(st, tiled_mlp="auto")))
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
    # of the sequence-parallel sizes, only the smallest that fits (or, if none does, the largest)
    sp = [x for x in singles if x[0].change.startswith("set parallel.sequence")]
    if sp:
        keep = min((x for x in sp if x[0].fits), key=lambda x: x[1].sequence, default=sp[0])
        singles = [x for x in singles if x not in sp or x is keep]
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
