"""The training-recipe schema: one typed description of a training run, validated at load, carrying the numbers
derived from it (tokens per step, total steps, whether adapters train, the ZeRO stage, the attention kernel).

A recipe is a YAML file (``recipes/*.yaml``) plus optional ``key=value`` overrides from the command line
(loading and error messages: ``llmft/config/loading.py``). Every field lives in one pydantic model below, with
its default and its documentation in exactly one place. Unknown keys are rejected.

Relative paths inside a recipe are resolved against the current working directory (run from the repo root).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from llmft.config.adapters import LoraConfig, QLoraConfig
from llmft.config.eval import EvalConfig
from llmft.config.loading import Strict, hint, load_validated
from llmft.config.sources import SourceSpec

# The data section's settings that a data mix (data.recipe) or a built directory (data.built) holds instead
MIX_OWNED = ("validation", "validation_fraction", "packing", "add_eos", "on_error")
# A hub id is "name" or "org/name" (letters, digits, - _ .).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_path(name: str) -> bool:
    """True when ``name`` is meant as a filesystem path (exists, or is written like a path, not a hub id)."""
    return Path(name).expanduser().exists() or not _HUB_ID.match(name) or name.startswith((".", "~"))


# --------------------------------------------------------------------------------------------- model


class RopeConfig(Strict):
    """How rotary position embeddings are rescaled to reach the target context length.

    ``linear`` is Position Interpolation (Chen et al. 2023): position m is mapped to m / factor.
    ``ntk`` is static NTK-aware scaling: rope_theta *= factor ** (d / (d - 2)).
    ``dynamic`` rescales theta at run time only beyond the original length (transformers' dynamic NTK).
    ``yarn`` (Peng et al. 2023) and ``llama3`` are frequency-dependent interpolations.
    """

    type: Literal["linear", "dynamic", "ntk", "yarn", "llama3"] = Field(
        description="Scaling method.", json_schema_extra=hint("use one of linear, dynamic, ntk, yarn, llama3")
    )
    factor: float = Field(
        gt=1.0,
        description="Target length / original length (non-integer factors are fine, e.g. 5.5).",
        json_schema_extra=hint("set it to target_len / original_len, e.g. 8.0 for 4096 -> 32768"),
    )
    original_max_position_embeddings: int | None = Field(
        default=None,
        gt=0,
        description="Context length the base model was trained at. Default: the base config's "
        "max_position_embeddings.",
    )
    beta_fast: float | None = Field(default=None, gt=0, description="YaRN: extrapolation boundary (default 32).")
    beta_slow: float | None = Field(default=None, gt=0, description="YaRN: interpolation boundary (default 1).")
    attention_factor: float | None = Field(
        default=None, gt=0, description="YaRN: cos/sin scale; default 0.1 * ln(factor) + 1."
    )
    mscale: float | None = Field(default=None, description="YaRN (DeepSeek variant): mscale.")
    mscale_all_dim: float | None = Field(default=None, description="YaRN (DeepSeek variant): mscale_all_dim.")
    truncate: bool | None = Field(default=None, description="YaRN: truncate the correction range (default true).")
    low_freq_factor: float | None = Field(default=None, gt=0, description="llama3: low-frequency factor (e.g. 1).")
    high_freq_factor: float | None = Field(
        default=None, gt=0, description="llama3: high-frequency factor (e.g. 4)."
    )

    @model_validator(mode="after")
    def _params_match_type(self) -> RopeConfig:
        yarn_only = ["beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"]
        llama3_only = ["low_freq_factor", "high_freq_factor"]
        allowed = {"yarn": yarn_only, "llama3": llama3_only}.get(self.type, [])
        stray = [k for k in yarn_only + llama3_only if getattr(self, k) is not None and k not in allowed]
        if stray:
            raise ValueError(
                f"{', '.join(stray)} do not apply to rope type {self.type!r}; remove them or change type"
            )
        if self.type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ValueError("llama3 scaling needs low_freq_factor and high_freq_factor (Llama 3.1: 1 and 4)")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 scaling needs high_freq_factor > low_freq_factor")
        return self


class ModelConfig(Strict):
    """Which model to start from and how to extend its context."""

    name: str = Field(
        description="Hub id (e.g. meta-llama/Llama-2-7b-hf) or local directory in Hugging Face format.",
        json_schema_extra=hint("give a hub id like meta-llama/Llama-2-7b-hf or an existing local directory"),
    )
    init: Literal["pretrained", "random"] = Field(
        default="pretrained",
        description="'pretrained' loads the weights of `name`; 'random' builds a new model from its config.json "
        "(pre-training from scratch).",
    )
    produced_by: Path | None = Field(
        default=None,
        description="A recipe whose final output is `name`: when `name` does not exist yet, that recipe is "
        "trained first (multi-stage pipelines, e.g. pre-train a short base, then extend it).",
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer hub id or directory. Default: `name`.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) of `name`.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="dtype of the exported weights (training keeps fp32 master weights)."
    )
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto",
        description="Attention kernel. 'auto': flash_attention_2 when installed and on CUDA (and the forward "
        "computes in bf16/fp16), else sdpa.",
    )
    rope: RopeConfig | None = Field(default=None, description="RoPE scaling; omit to keep the model's RoPE.")
    max_position_embeddings: int | None = Field(
        default=None,
        gt=0,
        description="max_position_embeddings written to the extended config. Default: original * factor "
        "(for 'dynamic' it stays at the original length: transformers scales beyond it at run time).",
    )
    max_seq_len: int = Field(
        gt=1, description="Training sequence length in tokens.", json_schema_extra=hint("e.g. 32768")
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward.")
    checkpoint_every_n_layers: int = Field(
        default=1, ge=1, description="With gradient_checkpointing: recompute only every n-th decoder layer; the "
        "others keep their activations (faster, more memory). 1: every layer.",
    )
    activation_offload: bool = Field(
        default=False, description="With gradient_checkpointing on a GPU: keep the layer inputs saved for the "
        "recompute in pinned host memory (frees layers x sequence x hidden of GPU memory, costs two copies per "
        "layer). Nothing to move on CPU.",
    )
    checkpoint_keep_attention: bool = Field(
        default=False, description="With gradient_checkpointing: keep each checkpointed layer's attention output "
        "(b x s x heads x head_dim + its logsumexp) from the forward pass instead of recomputing attention in the "
        "backward pass. Saves the one recomputed op whose cost grows with s^2 (about a tenth of a CPU step at 16K "
        "tokens); costs layers x s x hidden x dtype bytes (7B at 32K in bf16: 8.6 GB per sequence).",
    )
    compile: bool = Field(
        default=False, description="torch.compile each decoder layer on its own (regional compilation, as "
        "torchtune does): the layers share one compiled graph, built during the first step (about 40 s for a "
        "4-layer model on 2 CPU cores) and reused after. Same numbers as eager up to float rounding; works with "
        "gradient checkpointing and LoRA, not with activation_offload. Turns the training forward's KV cache off "
        "(config use_cache: false, as gradient checkpointing does). Speed-up: bench/RESULTS.md (compile).",
    )
    tiled_mlp: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        default=0, description="Compute each MLP a tile of the sequence at a time (DeepSpeed's TiledMLP, ALST): "
        "the gate/up activations (s x intermediate) exist for s / tiles tokens at once; the backward recomputes "
        "each tile (one more MLP forward per step). 0: off; N: N tiles; 'auto': ceil(tokens / hidden_size), 8 for "
        "32K tokens of a 4096-wide model. LLaMA-style MLPs.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with a hub repo. Off unless you trust the repo."
    )

    def attention_kernel(self, flash_attn: bool, precision: str) -> str:
        """The kernel ``attention`` resolves to (:func:`attention_kernel`)."""
        return attention_kernel(self.attention, flash_attn, precision)


def attention_kernel(requested: str, flash_attn: bool, precision: str) -> str:
    """The attention kernel a forward uses.

    Args:
        requested: ``model.attention`` (auto, flash_attention_2, sdpa, eager).
        flash_attn: whether flash-attn can run where the model runs (installed, on a CUDA device).
        precision: what the forward computes in (``train.precision``: fp32, bf16 or fp16).

    Returns:
        For ``auto``: flash_attention_2 where it can run and the forward computes in bf16/fp16, else sdpa. An
        explicit choice is itself (whether it can run is checked where the model is built).
    """
    if requested != "auto":
        return requested
    return "flash_attention_2" if flash_attn and precision != "fp32" else "sdpa"


# ---------------------------------------------------------------------------------------------- data


class DataConfig(Strict):
    """Training (and validation) text: each document becomes ``[BOS] prompt completion [EOS]`` (trained on the
    completion; plain text has no prompt), laid out in ``model.max_seq_len`` rows as ``packing`` says."""

    sources: list[SourceSpec] = Field(
        default_factory=list,
        description="Training sources: {format, path, ...} in any format of llmft/data/sources.py.",
    )
    recipe: Path | None = Field(
        default=None,
        description="A data-mix recipe (data_recipes/*.yaml), built into <checkpoint.dir>/data (cached) with the "
        "model's tokenizer and max_seq_len. Use instead of sources.",
    )
    built: Path | None = Field(
        default=None,
        description="A directory written by `llmft data build` (built with this model's tokenizer and max_seq_len). "
        "Use instead of sources.",
    )
    validation: list[SourceSpec] = Field(default_factory=list, description="Held-out sources for eval hooks.")
    validation_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Hold out this fraction of the tokens of each training source (the tail of its files, in "
        "reading order) for validation.",
    )
    add_eos: bool = Field(default=True, description="Append the EOS token after each document.")
    packing: Literal["concat", "isolated"] = Field(
        default="concat",
        description="'concat': join documents and cut rows, attention crosses documents (Together's "
        "pre-training). 'isolated': bin-pack whole documents, each attends only to itself (exact per-document "
        "losses; long documents are split into max_seq_len chunks, never truncated).",
    )
    on_error: Literal["skip", "stop"] = Field(
        default="skip", description="A malformed record is counted and reported with file:line, then skipped or fatal."
    )


# --------------------------------------------------------------------------------------------- train


class TrainConfig(Strict):
    """Optimizer, schedule and batch. AdamW defaults follow the PI paper (beta 0.9/0.95, wd 0)."""

    lr: float = Field(gt=0, description="Peak learning rate.", json_schema_extra=hint("e.g. 2e-5 for a 7B model"))
    schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup, in optimizer steps.")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="Final lr / peak lr for cosine and linear.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    micro_batch_size: int = Field(default=1, ge=1, description="Sequences per forward pass per device.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to train.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Alternative to max_steps: stop after this many training tokens."
    )
    grad_clip: float | None = Field(default=1.0, gt=0, description="Clip the global grad norm; null disables.")
    max_bad_steps: int = Field(
        default=3, ge=1, description="A step whose loss or gradient is not finite is skipped (no update); after "
        "this many in a row the run stops with a checkpoint of the last good state (exit code 3).",
    )
    spike_factor: float | None = Field(
        default=2.0, gt=1, description="Warn about a loss spike (and flag it in the metrics) when a step's loss is "
        "above this multiple of the median of the previous spike_window steps; null disables. Training is not "
        "changed (llmft/train/spikes.py).",
    )
    spike_window: int = Field(default=20, ge=2, description="Steps whose median loss a step is compared with.")
    loss_chunk_tokens: int = Field(
        default=0, ge=0,
        description="Compute the LM head and cross-entropy this many positions at a time, with their gradients "
        "made in the same pass (a wrapped head, e.g. under ZeRO-3, recomputes each chunk in the backward pass "
        "instead), so the full (sequence x vocab) fp32 logits never exist (32K x 32000 x 4 B = 4.2 GB per "
        "sequence). 0: the model's own loss over full logits. Same loss and gradients (llmft/train/loss.py).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="bf16", description="Compute precision (autocast, or DeepSpeed bf16/fp16); master weights fp32."
    )
    seed: int = Field(default=0, description="Seeds model init, data order and dropout.")
    optimizer: Literal["adamw", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = Field(
        default="adamw",
        description="'adamw': torch AdamW. The others are bitsandbytes optimizers (QLoRA, Dettmers et al. 2023): "
        "'adamw_8bit' keeps 8-bit optimizer states; the 'paged_' ones also page their states to CPU memory on GPU "
        "memory spikes (on CPU bitsandbytes runs them unpaged).",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.95]")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of max_steps and max_tokens")
        return self


class DeepSpeedConfig(Strict):
    """Used only when launched with the ``deepspeed`` launcher; ignored by plain ``python``."""

    stage: Literal[0, 1, 2, 3] = Field(default=2, description="ZeRO stage.")
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(default="none", description="ZeRO-Offload target.")
    offload_param: Literal["none", "cpu", "nvme"] = Field(default="none", description="ZeRO-3 parameter offload.")
    nvme_path: Path | None = Field(default=None, description="Directory for nvme offload.")
    config: Path | None = Field(
        default=None,
        description="A DeepSpeed JSON file (e.g. launch/ds_zero3.json). Its 'auto' values are filled from the "
        "recipe; explicit values must agree with the recipe.",
    )

    @field_validator("config")
    @classmethod
    def _json_exists(cls, v: Path | None) -> Path | None:
        if v is not None:
            if not v.is_file():
                raise ValueError(f"DeepSpeed config {str(v)!r} does not exist")
            try:
                json.loads(v.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"DeepSpeed config {str(v)!r} is not valid JSON: {e}") from None
        return v

    @model_validator(mode="after")
    def _offload_rules(self) -> DeepSpeedConfig:
        if self.offload_param != "none" and self.stage != 3:
            raise ValueError("offload_param needs stage 3; set stage: 3 or offload_param: none")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3")
        if "nvme" in (self.offload_optimizer, self.offload_param) and self.nvme_path is None:
            raise ValueError("nvme offload needs nvme_path")
        return self


class ParallelConfig(Strict):
    """How the ranks of a ``deepspeed`` launch split the work besides ZeRO (llmft/train/sequence_parallel.py)."""

    sequence: int = Field(
        default=1, ge=1,
        description="Sequence parallelism (DeepSpeed Ulysses, ALST): this many ranks share each sequence, each "
        "holding max_seq_len / sequence of its tokens; attention swaps to a split over heads with two all-to-alls "
        "per layer. The ranks form world / sequence data-parallel groups. 1: off. Needs the deepspeed launcher, "
        "heads and max_seq_len divisible by it (KV heads: divisible, or dividing it).",
        json_schema_extra=hint("e.g. 8 to spread a 128K-token sequence over 8 GPUs"),
    )


class CheckpointConfig(Strict):
    """Where the run writes. ``dir`` holds step checkpoints, ``final/``, metrics.jsonl and wandb files."""

    dir: Path = Field(description="Run output directory.", json_schema_extra=hint("e.g. runs/llama2-32k"))
    every_steps: int = Field(default=0, ge=0, description="Checkpoint every N optimizer steps (0: only final).")
    keep_last: int = Field(default=2, ge=1, description="Keep this many newest step checkpoints.")
    every_minutes: float | None = Field(
        default=None, gt=0, description="Also checkpoint when this many minutes passed since the last one "
        "(preemptible clusters)."
    )


class WandbConfig(Strict):
    mode: Literal["online", "offline", "disabled"] = Field(
        default="disabled", description="'offline' writes a local run dir you can `wandb sync` later."
    )
    project: str = Field(default="llmft", description="wandb project.")
    entity: str | None = Field(default=None, description="wandb team or user.")
    name: str | None = Field(default=None, description="Run name (default: the output dir name).")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class LoggingConfig(Strict):
    every_steps: int = Field(default=1, ge=1, description="Log metrics every N optimizer steps.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases.")


# -------------------------------------------------------------------------------------------- recipe


class Recipe(Strict):
    """A full training recipe."""

    model: ModelConfig
    method: Literal["full", "lora", "qlora"] = Field(
        default="full", description="'full' fine-tuning; 'lora' adapters on a frozen base (see the lora section); "
        "'qlora' LoRA adapters (lora section) on a frozen 4-bit quantized base (qlora section).",
    )
    lora: LoraConfig | None = Field(
        default=None, description="LoRA settings; only with method: lora or qlora (omitted there: LoraConfig's "
        "defaults)."
    )
    qlora: QLoraConfig | None = Field(
        default=None, description="Quantization of the base; only with method: qlora (omitted there: QLoraConfig's "
        "defaults)."
    )
    data: DataConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _lora_defaults(cls, data: Any) -> Any:
        # method: lora without a lora section means the LoRA defaults, filled here so they show when resolved
        if isinstance(data, dict) and data.get("method") in ("lora", "qlora") and data.get("lora") is None:
            data = {**data, "lora": {}}
        if isinstance(data, dict) and data.get("method") == "qlora" and data.get("qlora") is None:
            data = {**data, "qlora": {}}
        return data

    # ---- derived numbers: each has this one definition; the CLI, `plan`, the engine and the loop read them here

    @property
    def uses_adapters(self) -> bool:
        """LoRA adapters train on a frozen base (method lora or qlora)."""
        return self.method in ("lora", "qlora")

    @property
    def adapter(self) -> LoraConfig | None:
        """The LoRA settings the run trains with; None for full fine-tuning."""
        return self.lora if self.uses_adapters else None

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage a DeepSpeed launch uses: the JSON's ``zero_optimization.stage`` when it sets one."""
        d = self.deepspeed
        if d.config is not None:
            stage = json.loads(d.config.read_text()).get("zero_optimization", {}).get("stage", d.stage)
            return stage if isinstance(stage, int) else d.stage
        return d.stage

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel groups among ``world_size`` ranks: each group of ``parallel.sequence`` ranks trains on the
        same sequences (its own share of each)."""
        return max(1, world_size // self.parallel.sequence)

    def sequences_per_step(self, world_size: int) -> int:
        """Sequences in one optimizer step over ``world_size`` ranks (the global batch)."""
        t = self.train
        return t.micro_batch_size * t.gradient_accumulation_steps * self.data_parallel_size(world_size)

    def tokens_per_step(self, world_size: int) -> int:
        """Token positions in one optimizer step over ``world_size`` ranks."""
        return self.sequences_per_step(world_size) * self.model.max_seq_len

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps the run takes: ``train.max_steps``, or enough steps for ``train.max_tokens``."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        return math.ceil(self.train.max_tokens / self.tokens_per_step(world_size))


def cross_check(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Checks that span sections or touch the filesystem. Returns (yaml path, problem) pairs."""
    m, problems = recipe.model, []
    if recipe.lora is not None and not recipe.uses_adapters:
        problems.append((("lora",), f"the lora section applies only to method: lora or qlora, but method is "
                         f"{recipe.method!r}. Fix: set method: lora, or remove the lora section"))
    if recipe.qlora is not None and recipe.method != "qlora":
        problems.append((("qlora",), f"the qlora section applies only to method: qlora, but method is "
                         f"{recipe.method!r}. Fix: set method: qlora, or remove the qlora section"))
    if recipe.method == "qlora" and recipe.zero_stage == 3:
        want = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[recipe.train.precision]
        have = (recipe.qlora or QLoraConfig()).quant_storage_dtype
        if have != want:
            problems.append((("qlora", "quant_storage_dtype"), f"is {have!r}, but DeepSpeed ZeRO-3 shards every "
                             f"parameter in one dtype ({want}, from train.precision {recipe.train.precision}), packed "
                             f"4-bit weights included. Fix: set qlora.quant_storage_dtype: {want}, or use ZeRO "
                             "stage 2"))
    if not m.gradient_checkpointing:
        for field, default in (("checkpoint_every_n_layers", 1), ("activation_offload", False),
                               ("checkpoint_keep_attention", False)):
            if getattr(m, field) != default:
                problems.append((("model", field), "applies only with gradient checkpointing. Fix: set "
                                 f"model.gradient_checkpointing: true, or remove model.{field}"))
    if m.attention == "flash_attention_2" and recipe.train.precision == "fp32":
        problems.append((("model", "attention"), "flash_attention_2 computes only in bf16 or fp16, but "
                         "train.precision is fp32, so every forward (training and the evaluations during it) would "
                         "hand it fp32 tensors. Fix: set train.precision: bf16 (master weights stay fp32), or "
                         "model.attention: sdpa"))
    if m.compile and m.tiled_mlp:
        problems.append((("model", "compile"), "cannot be combined with model.tiled_mlp (DeepSpeed's TiledMLP is an "
                         "autograd function that torch.compile would break the layer graph around). Fix: remove one "
                         "of model.compile and model.tiled_mlp"))
    if m.compile and m.activation_offload:
        problems.append((("model", "compile"), "cannot be combined with model.activation_offload: torch.compile "
                         "cannot trace the offload's saved-tensor hooks, so every layer would fall back to eager "
                         "(compile time spent for nothing). Fix: remove model.compile, or model.activation_offload"))
    problems += _sequence_parallel_checks(recipe)
    if recipe.method == "qlora" and m.init == "random":
        problems.append((("model", "init"), "method: qlora quantizes pretrained weights. Fix: set init: pretrained, "
                         "or use method: full to train from scratch"))
    if is_local_path(m.name) and not Path(m.name).expanduser().is_dir() and m.produced_by is None:
        problems.append((("model", "name"), f"{m.name!r} is not an existing directory (nor a hub id like org/name). "
                         "Fix: correct the path, or set model.produced_by to the recipe that builds it"))
    if m.produced_by is not None and not m.produced_by.is_file():
        problems.append((("model", "produced_by"), f"recipe {str(m.produced_by)!r} does not exist"))
    if m.init == "random" and m.rope is not None:
        problems.append((("model", "rope"), "rope scaling applies to a pretrained model. Fix: with init: random, "
                         "remove model.rope and set max_position_embeddings in the model's config.json"))
    d = recipe.data
    if bool(d.sources) + (d.recipe is not None) + (d.built is not None) != 1:
        problems.append((("data",), "set exactly one of data.sources (files to read), data.recipe (a data mix) "
                         "and data.built (a directory from `llmft data build`)"))
    if d.recipe is not None and not d.recipe.is_file():
        problems.append((("data", "recipe"), f"data recipe {str(d.recipe)!r} does not exist"))
    if d.built is not None and not (d.built / "stats.json").is_file():
        problems.append((("data", "built"), f"{str(d.built)!r} is not a built data directory (no stats.json). "
                         "Fix: run `llmft data build <data recipe> --out DIR` first"))
    if d.recipe is not None or d.built is not None:
        mixed_up = sorted(set(MIX_OWNED) & d.model_fields_set)
        if mixed_up:
            problems.append((("data",), f"{', '.join(mixed_up)} belong in the data recipe when data.recipe is set; "
                             "move them there"))
    if (
        recipe.eval.every_steps
        and d.recipe is None
        and d.built is None
        and not (d.validation or d.validation_fraction > 0)
    ):
        problems.append(
            (("eval", "every_steps"), "needs held-out text. Fix: set data.validation or data.validation_fraction")
        )
    return problems


def _sequence_parallel_checks(recipe: Recipe) -> list[tuple[tuple, str]]:
    """What ``parallel.sequence`` > 1 needs of the model and the data layout (checked again on the loaded model at
    run time, for hub models whose config is not on disk)."""
    sp, m = recipe.parallel.sequence, recipe.model
    if sp == 1:
        return []
    problems = []
    if m.max_seq_len % sp:
        problems.append((("model", "max_seq_len"), f"is {m.max_seq_len}, not divisible by parallel.sequence {sp}: "
                         f"each of the {sp} ranks holds an equal share of every sequence. Fix: make max_seq_len a "
                         f"multiple of {sp}, e.g. {m.max_seq_len // sp * sp or sp}"))
    if m.attention == "eager":
        problems.append((("model", "attention"), "eager attention cannot run under sequence parallelism (it needs "
                         "a full (s x s) mask, and DeepSpeed's Ulysses attention drops masks). Fix: set "
                         "model.attention: sdpa (packed documents isolated by their position ids) or "
                         "flash_attention_2"))
    odd = [n for n in recipe.eval.lengths if n % sp]
    if recipe.eval.every_steps and odd:
        problems.append((("eval", "lengths"), f"has {odd}, not divisible by parallel.sequence {sp}: evaluation "
                         f"windows are split over the {sp} ranks like training rows. Fix: use multiples of {sp}"))
    config = Path(m.name).expanduser() / "config.json"
    if config.is_file():
        problems += [(("parallel", "sequence"), p) for p in heads_problems(json.loads(config.read_text()), sp)]
    return problems


def heads_problems(config: dict, sp: int) -> list[str]:
    """Why a model with this ``config.json`` cannot split its attention heads over ``sp`` ranks (DeepSpeed's
    Ulysses rule: query heads divisible by sp; KV heads divisible by sp, or dividing it, then replicated)."""
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads", heads)
    if heads is None:
        return []
    problems = []
    if heads % sp:
        problems.append(f"is {sp}, but the model's {heads} attention heads do not divide by it: each rank computes "
                        f"attention for heads / {sp} of them. Fix: use a divisor of {heads}")
    elif kv % sp and sp % kv:
        problems.append(f"is {sp}, but the model's {kv} KV heads neither divide by it nor divide it (DeepSpeed "
                        f"splits or replicates them). Fix: use a divisor of {math.gcd(heads, kv)} or a multiple of "
                        f"{kv} that divides {heads}")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a training recipe (see :func:`load_validated`).

    Raises:
        RecipeError: every problem with the recipe, at once.
    """
    return load_validated(path, Recipe, overrides, checks=cross_check)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in) as YAML: what a run used, and itself a recipe that loads back
    as the same one. With ``data.recipe`` or ``data.built``, the data section's own :data:`MIX_OWNED` settings are
    left out: the mix's apply (written out, they would read back as settings given where they have no effect)."""
    raw = recipe.model_dump(mode="json")
    if recipe.data.recipe is not None or recipe.data.built is not None:
        raw["data"] = {k: v for k, v in raw["data"].items() if k not in MIX_OWNED}
    return yaml.safe_dump(raw, sort_keys=False)
