"""How one optimizer step is executed: plain PyTorch (one process) or DeepSpeed (ZeRO 0-3, many ranks).

Both engines expose the same five operations, so the training loop reads the same for both:

    loss = engine.forward(batch, num_tokens)   # sum of token losses / tokens in the whole optimizer step
                                               # (with N ranks: all ranks' tokens / N, as the grads are averaged)
    engine.backward(loss)
    grad_norm = engine.step()                  # clip, update, advance the lr schedule, zero grads
    engine.save(state_dir) / engine.load(state_dir)
    engine.full_state_dict()                   # every parameter, gathered on rank 0 (for the HF export)
    engine.trainable_state_dict()              # the trainable ones only (LoRA adapters), gathered on rank 0

Master weights are fp32; bf16/fp16 compute uses autocast (plain) or DeepSpeed's bf16/fp16 modes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist

from llmft.config import Recipe, RecipeError
from llmft.data.packing import attention_kwargs
from llmft.train.loss import causal_lm_loss
from llmft.train.optim import build_optimizer, build_scheduler
from llmft.train.sequence_parallel import SequenceParallel

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def launched_by_deepspeed() -> bool:
    """True under the ``deepspeed`` launcher (it sets these variables for every rank)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_process_group() -> None:
    """``deepspeed.init_distributed()`` for this rank. On the CPU accelerator, DeepSpeed would first JIT-compile its
    shared-memory all-reduce (a C++ build of 30-60 s on a fresh machine, and a compiler to have), which serves only
    DeepSpeed-Inference's tensor parallelism (``inference_all_reduce``); training reduces through the gloo process
    group, so the build is skipped and nothing changes but the start-up time."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm is not None:
            deepspeed.ops.__compatible_ops__[shm.NAME] = False
    deepspeed.init_distributed()


class PlainEngine:
    """Single process, fp32 master weights, torch AdamW, autocast for bf16/fp16."""

    rank, world_size = 0, 1

    def __init__(self, model: torch.nn.Module, recipe: Recipe, total_steps: int, device: torch.device,
                 attention: str, isolate: bool):
        self.model = model.to(device)
        self.isolate = isolate  # rows hold isolated examples: confine attention to each
        self.attention = attention
        self.device = device
        self.cfg = recipe.train
        self.optimizer = build_optimizer(model, recipe.train, fused=True)
        self.scheduler = build_scheduler(self.optimizer, recipe.train, total_steps)
        self.amp_dtype = _AMP.get(recipe.train.precision)  # None: plain fp32
        self.scaler = torch.amp.GradScaler(device.type, enabled=recipe.train.precision == "fp16")
        self.frozen = any(not p.requires_grad for p in self.model.parameters())  # e.g. a LoRA base

    def autocast(self) -> torch.autocast:
        """The precision every forward runs in, training and evaluation alike: autocast to bf16/fp16 over the fp32
        master weights, or plain fp32."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def forward(self, batch: dict[str, torch.Tensor], num_tokens: int) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.isolate:
            batch = attention_kwargs(batch, self.attention, self.amp_dtype or torch.float32)
        with self.autocast():
            return causal_lm_loss(self.model, batch, num_tokens, self.cfg.loss_chunk_tokens)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        """Clip, update, advance the schedule. A non-finite gradient norm skips the update (and the schedule) and
        is returned as is; with fp16 the grad scaler handles overflow itself."""
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            return float(grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, state_dir: Path) -> None:
        """fp32 master weights (safetensors; only the trainable ones when part of the model is frozen, as with
        LoRA), optimizer, scheduler and grad-scaler state."""
        state_dir.mkdir(parents=True, exist_ok=True)
        if self.frozen:  # LoRA: the frozen base is rebuilt from model.name; keep only what trains
            trainable = {n: p.contiguous() for n, p in self.trainable_state_dict().items()}
            safetensors.torch.save_file(trainable, str(state_dir / "model.safetensors"))
        else:
            safetensors.torch.save_model(self.model, str(state_dir / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), state_dir / "optimizer.pt")
        torch.save({"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                   state_dir / "scheduler.pt")

    def load(self, state_dir: Path) -> None:
        """Load the model (the trainable parameters only, for adapters), optimizer and scheduler states.

        Raises:
            RuntimeError: the checkpoint's parameters are not the model's.
        """
        if self.frozen:  # exactly the trainable parameters, bit for bit
            saved = safetensors.torch.load_file(str(state_dir / "model.safetensors"), device=str(self.device))
            params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
            if not missing and not unexpected:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(saved[n])
        else:
            missing, unexpected = safetensors.torch.load_model(self.model, str(state_dir / "model.safetensors"),
                                                               device=str(self.device))
        if missing or unexpected:
            raise RuntimeError(f"{state_dir}: checkpoint does not match the model ({missing=}, {unexpected=})")
        self.optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
        sched = torch.load(state_dir / "scheduler.pt", weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])
        self.scaler.load_state_dict(sched["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed config for a recipe: from ``deepspeed.config`` (JSON, 'auto' values filled in) or built
    from the recipe's fields.

    Raises:
        RecipeError: an explicit value in the JSON contradicts the recipe (message names both).
    """
    t, d = recipe.train, recipe.deepspeed
    derived = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip if t.grad_clip is not None else 0.0,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
    }
    zero: dict = {"stage": d.stage}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {
            "device": d.offload_optimizer,
            **({"nvme_path": str(d.nvme_path)} if d.offload_optimizer == "nvme" else {}),
        }
    if d.offload_param != "none":
        zero["offload_param"] = {
            "device": d.offload_param,
            **({"nvme_path": str(d.nvme_path)} if d.offload_param == "nvme" else {}),
        }
    if d.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if d.config is None:
        cfg = {**derived, "zero_optimization": zero}
    else:
        cfg = json.loads(Path(d.config).read_text())
        for key, value in derived.items():
            have = cfg.get(key, "auto")
            if isinstance(value, dict):  # {"enabled": bool}
                have = have if isinstance(have, dict) else {"enabled": have}
                if have.get("enabled", "auto") == "auto":
                    cfg[key] = {**have, "enabled": value["enabled"]}
                elif bool(have["enabled"]) != value["enabled"]:
                    raise RecipeError([
                        f"{d.config}: {key}.enabled is {have['enabled']} but train.precision is "
                        f"{t.precision!r}; make them agree or set it to \"auto\""
                    ])
            elif have == "auto":
                cfg[key] = value
            elif have != value:
                raise RecipeError([f"{d.config}: {key} is {have} but the recipe gives {value}; make them "
                                   "agree or set it to \"auto\""])
        cfg.setdefault("zero_optimization", zero)
        cfg["zero_optimization"].setdefault("stage", recipe.zero_stage)  # DeepSpeed's own default would be 0
        if cfg["zero_optimization"].get("stage") == 3:
            cfg["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise RecipeError([f"{d.config}: remove the {section!r} section; llmft builds AdamW and the lr "
                               "schedule from the recipe's train section"])
    cfg["train_batch_size"] = recipe.sequences_per_step(world_size)
    if recipe.parallel.sequence > 1:  # read where no mpu is passed (ZeRO-3's zero.Init while the model loads)
        cfg["sequence_parallel_size"] = recipe.parallel.sequence
        if cfg["zero_optimization"].get("stage") == 3:
            cfg["zero_optimization"]["reduce_scatter"] = False
    cfg["zero_allow_untested_optimizer"] = True
    cfg["zero_force_ds_cpu_optimizer"] = False
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


class DeepSpeedEngine:
    """A DeepSpeed engine around the model with llmft's AdamW and schedule (launched by ``deepspeed``)."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, total_steps: int, ds_config: dict,
                 attention: str, isolate: bool, sp: SequenceParallel | None = None):
        import deepspeed

        self.isolate = isolate  # rows hold isolated examples: confine attention to each
        self.attention = attention
        self.sp = sp  # sequence parallelism: each rank computes its slice of every row
        self.cfg = recipe.train
        optimizer = build_optimizer(model, recipe.train)
        scheduler = build_scheduler(optimizer, recipe.train, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            mpu=sp.mpu if sp is not None else None)
        self.model = self.engine.module
        self.device = self.engine.device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.stage = ds_config["zero_optimization"]["stage"]
        self.dtype = _AMP.get(recipe.train.precision, torch.float32)  # the module's (and the attention's) dtype
        self.frozen = any(not p.requires_grad for p in self.model.parameters())  # e.g. a LoRA base
        self._stage0_norm = float("nan")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision every forward runs in: DeepSpeed already holds the module in the training dtype (bf16/fp16
        or fp32), and its training forward runs without autocast, so evaluation does the same."""
        return contextlib.nullcontext()

    def forward(self, batch: dict[str, torch.Tensor], num_tokens: int) -> torch.Tensor:
        if self.sp is not None:  # this rank's slice of each row; isolation comes from the whole rows' position ids
            batch = {k: v.to(self.device) for k, v in self.sp.shard(batch).items()}
            return causal_lm_loss(self.model, batch, num_tokens, self.cfg.loss_chunk_tokens, run=self.engine)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.isolate:
            batch = attention_kwargs(batch, self.attention, self.dtype)
        if self.cfg.loss_chunk_tokens or "weight" in batch:  # the loss made here, the forward still the engine's
            # (ZeRO-3 gathers the head per chunk); per-token weights need logits, which the model's loss cannot take
            return causal_lm_loss(self.model, batch, num_tokens, self.cfg.loss_chunk_tokens, run=self.engine)
        return self.engine(**batch, num_items_in_batch=num_tokens).loss

    def backward(self, loss: torch.Tensor) -> None:
        # the loss is already divided by the tokens of the whole step: no extra 1/accumulation scaling
        self.engine.backward(loss, scale_wrt_gas=False)
        if self.stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # ZeRO-0 in fp32 does not report the norm; the grads are already all-reduced here
            grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            self._stage0_norm = float(torch.stack(grads).norm()) if grads else float("nan")
        # DeepSpeed counts micro-steps: step() after every backward; it clips, updates and advances the
        # scheduler only at the accumulation boundary
        self.engine.step()

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()  # before clipping, like clip_grad_norm_ in PlainEngine
        return float(norm) if norm is not None else self._stage0_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, state_dir: Path) -> None:
        # a frozen base (LoRA) is rebuilt from model.name on resume: keep only what trains
        self.engine.save_checkpoint(str(state_dir), tag="deepspeed", save_latest=False,
                                    exclude_frozen_parameters=self.frozen)

    def load(self, state_dir: Path) -> None:
        """Load a DeepSpeed checkpoint (model, optimizer and scheduler states) from ``state_dir/deepspeed``.

        Raises:
            CheckpointError: a file of the DeepSpeed checkpoint would run code when unpickled.
            RuntimeError: DeepSpeed finds no checkpoint there.
        """
        check_deepspeed_pickles(state_dir / "deepspeed")
        path, _ = self.engine.load_checkpoint(str(state_dir), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=not self.frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {state_dir}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All parameters on rank 0 (None elsewhere). Every rank must call it (ZeRO-3 gathers)."""
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return sd if self.rank == 0 else None
        return self.model.state_dict() if self.rank == 0 else None

    def trainable_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trainable parameters (LoRA adapters, trained extras), whole, on rank 0 (None elsewhere). Every rank
        must call it: under ZeRO-3 each rank holds a slice of every parameter, gathered here."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in named} if self.rank == 0 else None
        return {n: p.detach().cpu() for n, p in named} if self.rank == 0 else None

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Free this rank's CPU shared-memory all-reduce buffer, if there is one. DeepSpeed's shared-memory
        all-reduce (not built by :func:`join_process_group`, but by a process group joined elsewhere) creates one
        66 MB file in /dev/shm per rank and run and never unlinks it."""
        dist.barrier()  # every rank is done with the buffers
        name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('LOCAL_RANK', self.rank)}")
        Path("/dev/shm", name).unlink(missing_ok=True)


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoints: plain data, no code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def check_deepspeed_pickles(ckpt_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint that ``torch.load(weights_only=True)`` would refuse.

    DeepSpeed unpickles its ``*.pt`` files with ``weights_only=False``, which runs whatever code a crafted file
    names. Each file is first loaded here the safe way (memory-mapped, so tensors are not read), allowing only
    tensors, containers and the few DeepSpeed data types above; DeepSpeed then loads the same bytes.

    Raises:
        CheckpointError: a file names another global (it was not written by llmft's DeepSpeed engine).
    """
    from llmft.train.checkpoint import CheckpointError

    for path in sorted(Path(ckpt_dir).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - the unpickler raises UnpicklingError, RuntimeError, ...
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path} is not a plain-data checkpoint file ({why}); llmft will not unpickle "
                                  "it. Resume from a checkpoint this llmft wrote, or start fresh with --no-resume"
                                  ) from None
