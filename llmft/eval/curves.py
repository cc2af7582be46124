"""``llmft report RUN_DIR``: learning curves of a run and a diagnosis (underfitting, overfitting, well fit).

Reads ``RUN/metrics.jsonl``: training loss per logged step, and the validation evaluations the recipe's ``eval:``
block logged (``eval/ppl@L``; the validation loss is ``ln(ppl)`` at the longest length L). Writes
``RUN/report/learning_curves.png`` and ``RUN/report/report.md``.

The diagnosis looks at the last ``window`` evaluations (default 3) and states which rule fired:

- **overfitting**: the validation loss rose by more than ``tol`` (relative, default 1%) from its best value, and
  the training loss fell over the same steps. Suggested: stop near the best step (it says which), lower the
  learning rate, add data, or regularize (dropout, weight decay).
- **underfitting**: the validation loss still fell by more than ``tol`` over the window (it has not flattened).
  Suggested: train longer (more steps or tokens), raise the learning rate, or add capacity (a larger LoRA rank,
  all linear layers).
- **well fit**: neither: the validation loss changed by at most ``tol`` over the window.
- **not enough evaluations**: fewer than ``window`` + 1 evaluations; set ``eval.every_steps`` so a run has more.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Curves:
    train: list[tuple[int, float]]  # (step, training loss)
    val: list[tuple[int, float]]  # (step, validation loss = ln ppl at the longest evaluated length)
    val_length: int | None


def read_curves(run_dir: Path) -> Curves:
    """The curves of a run directory.

    Raises:
        FileNotFoundError: no metrics.jsonl in ``run_dir``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run directory, checkpoint.dir of a recipe?)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        ppl = {int(k.split("@")[1]): v for k, v in row.items() if k.startswith("eval/ppl@")}
        if ppl:
            evals.append((row["step"], ppl))
    length = max({n for _, p in evals for n in p}, default=None)
    val = [(s, math.log(p[length])) for s, p in evals if length in p and p[length] > 0]
    return Curves(train, val, length)


def diagnose(curves: Curves, window: int = 3, tol: float = 0.01) -> dict:
    """``{"verdict", "rule", "suggestion", "best_step"}`` by the rules in the module docstring."""
    val = curves.val
    if len(val) < window + 1:
        return {"verdict": "not enough evaluations", "best_step": None,
                "rule": f"{len(val)} validation evaluations; the rules need at least {window + 1}",
                "suggestion": "set eval.every_steps so the run evaluates more often"}
    best_step, best = min(val, key=lambda sv: sv[1])
    last_step, last = val[-1]
    start_step, start = val[-window - 1]
    train_then = _train_near(curves.train, start_step)
    train_now = _train_near(curves.train, last_step)
    train_fell = train_then is not None and train_now is not None and train_now < train_then
    if last > best * (1 + tol) and best_step < last_step and train_fell:
        return {"verdict": "overfitting", "best_step": best_step,
                "rule": f"validation loss {last:.4f} at step {last_step} is more than {tol:.0%} above its best "
                        f"{best:.4f} (step {best_step}) while the training loss fell ({train_then:.4f} -> "
                        f"{train_now:.4f}) over the last {window} evaluations",
                "suggestion": f"stop near step {best_step} (train.max_steps), lower train.lr, add data, or regularize "
                              "(lora.dropout, train.weight_decay)"}
    if last < start * (1 - tol):
        return {"verdict": "underfitting", "best_step": best_step,
                "rule": f"validation loss still fell by {100 * (1 - last / start):.1f}% (> {tol:.0%}) over the last "
                        f"{window} evaluations ({start:.4f} at step {start_step} -> {last:.4f} at step {last_step})",
                "suggestion": "train longer (train.max_steps / max_tokens), raise train.lr, or add capacity "
                              "(a larger lora.rank, target_modules: all_linear)"}
    return {"verdict": "well fit", "best_step": best_step,
            "rule": f"validation loss changed by {100 * abs(1 - last / start):.1f}% (<= {tol:.0%}) over the last "
                    f"{window} evaluations and is within {tol:.0%} of its best",
            "suggestion": "keep these settings; more steps would change little"}


def _train_near(train: list[tuple[int, float]], step: int, span: int = 3) -> float | None:
    """Mean training loss of the ``span`` logged steps up to ``step`` (smooths the per-step noise)."""
    before = [loss for s, loss in train if s <= step][-span:]
    return sum(before) / len(before) if before else None


def plot_curves(curves: Curves, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if curves.train:
        ax.plot(*zip(*curves.train), label="training loss", alpha=0.8)
    if curves.val:
        ax.plot(*zip(*curves.val), marker="o", label=f"validation loss (ln ppl @ {curves.val_length})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: Path, window: int = 3, tol: float = 0.01) -> dict:
    """Plot and diagnose a run: RUN/report/learning_curves.png and report.md.

    Raises:
        FileNotFoundError: no metrics.jsonl in ``run_dir``.
    """
    run_dir = Path(run_dir)
    curves = read_curves(run_dir)
    verdict = diagnose(curves, window, tol)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, out / "learning_curves.png", f"{run_dir.name}: {verdict['verdict']}")
    text = (f"# {run_dir.name}: {verdict['verdict']}\n\n![learning curves](learning_curves.png)\n\n"
            f"- rule: {verdict['rule']}\n- suggestion: {verdict['suggestion']}\n"
            f"- training steps logged: {len(curves.train)}; validation evaluations: {len(curves.val)}\n")
    (out / "report.md").write_text(text)
    return {**verdict, "plot": out / "learning_curves.png", "markdown": out / "report.md"}
