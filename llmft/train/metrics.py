"""Where metrics go: ``RUN/metrics.jsonl`` always, wandb (online, offline or disabled) too.

Only rank 0 logs. On resume, lines of steps after the resumed checkpoint are dropped from metrics.jsonl (they
will be logged again) and the wandb run with the same id is continued.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from llmft.config import Recipe

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: Path, recipe: Recipe, rank: int, resume_step: int, wandb_id: str | None):
        self.enabled = rank == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        self.wandb_id = wandb_id
        if not self.enabled:
            return
        if resume_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        cfg = recipe.logging.wandb
        if cfg.mode != "disabled":
            import wandb

            self.wandb_id = wandb_id or uuid.uuid4().hex[:8]
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or Path(run_dir).name,
                tags=cfg.tags,
                mode=cfg.mode,
                dir=str(run_dir),
                id=self.wandb_id,
                resume="allow",
                config=recipe.model_dump(mode="json"),
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _step_of(line: str) -> float:
    """The step of a metrics line; a line torn by a kill mid-write (or an empty one) sorts after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
