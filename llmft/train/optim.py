"""AdamW (torch, or bitsandbytes 8-bit / paged) and the learning-rate schedule (linear warmup, then cosine /
linear / constant)."""

from __future__ import annotations

import math
from functools import partial

import torch

from llmft.config import TrainConfig
from llmft.model.load import require_bitsandbytes


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warmup ramps linearly so that the first update already uses lr/warmup (never 0); the decay then runs from
    1 down to ``min_ratio`` at the last step.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


# train.optimizer -> bitsandbytes.optim class. They run on CPU too (bitsandbytes >= 0.49); there the paged ones
# fall back to unpaged states, with a warning from bitsandbytes.
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit"}


# torch's fused AdamW kernel: one pass over each parameter instead of foreach's dozen list ops (about 5x faster on
# the bench model on CPU, 13 vs 66 ms a step), the same update to float rounding (tests/unit/train/test_train.py)
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (``train.optimizer``: torch or bitsandbytes) over the trainable parameters; weight decay skips
    biases and norm weights (1-D tensors).

    Under ZeRO-3 (zero.Init) a parameter's local shape is empty, so its full shape (``ds_shape``) decides.
    ``fused`` picks torch's fused AdamW where every trainable parameter is a float tensor on a device it supports
    (else foreach); DeepSpeed, which flattens and partitions the parameters after this, keeps foreach.

    Raises:
        ModelLoadError: a bitsandbytes optimizer was asked for and bitsandbytes cannot run here.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def ndim(p: torch.nn.Parameter) -> int:
        return len(getattr(p, "ds_shape", p.shape))

    decay = [p for p in params if ndim(p) >= 2]
    no_decay = [p for p in params if ndim(p) < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; the scheduler must agree
    if cfg.optimizer == "adamw":
        fused = fused and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
        kernel = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernel)
    require_bitsandbytes(f"train.optimizer: {cfg.optimizer}")
    import bitsandbytes as bnb  # only for the 8-bit / paged optimizers (QLoRA)

    cls = BNB_OPTIMIZERS[cfg.optimizer]
    return getattr(bnb.optim, cls)(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """A LambdaLR implementing :func:`lr_factor`."""
    fn = partial(lr_factor, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.schedule,
                 min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
