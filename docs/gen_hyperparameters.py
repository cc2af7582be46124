"""Generate the table of shipped recipes in docs/hyperparameters.md from the recipes themselves.

    python docs/gen_hyperparameters.py           # rewrite the table between the BEGIN/END markers
    python docs/gen_hyperparameters.py --check   # exit 1 if the table is stale (CI: tests/unit/test_docs.py)

Every number comes from files in this repository, never from the network: each recipe under ``recipes/`` (all
subfolders) is loaded and validated with llmft's own loader; total parameters are counted by instantiating the
model on the meta device from its config (a local directory, the config of the recipe named by
``model.produced_by`` when the directory does not exist yet, or for a hub id the published config shipped under
``llmft/assets/configs/``); trainable parameters come from the closed form ``lora_parameter_count``. The number of
data-parallel ranks is the one in the first launch command of the recipe's header (``--num_gpus N``, else 1).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the table must not depend on the network (set before any HF import)

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "hyperparameters.md"
BEGIN, END = "<!-- BEGIN GENERATED TABLE -->", "<!-- END GENERATED TABLE -->"
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HEADER = ("| recipe | method | RoPE | max_seq_len | r | alpha | scale | targets | trainable extras | lr | warmup | "
          "steps | ranks | effective batch (tokens) | total params | trainable params | trainable % |")
ALIGN = "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"


@dataclass
class Row:
    """One shipped recipe, as the table shows it."""

    path: str  # relative to the repository root, e.g. recipes/cpu/tiny_pi8x_lora.yaml
    method: str
    rope: str
    max_seq_len: int
    rank: int | None
    alpha: float | None
    scale: str
    targets: str
    extras: str
    lr: float
    warmup: int
    steps: int
    ranks: int
    sequences: int  # per optimizer step, over all ranks
    total: int
    trainable: int


@contextlib.contextmanager
def in_repo():
    """Run from the repository root: recipes name their data and models relative to it."""
    old = Path.cwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(old)


def recipe_paths() -> list[Path]:
    """Every shipped training recipe, relative to the repository root, sorted."""
    return sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml"))


def launch_ranks(path: Path) -> int:
    """Data-parallel ranks of the first launch command in the recipe's header comment (1 for plain python)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if "launch/train.py" in line:
            found = re.search(r"--num_(?:gpus|accelerators)[ =](\d+)", line)
            return int(found.group(1)) if found else 1
    return 1


def _scale(rank: int, alpha: float, rslora: bool) -> str:
    if rslora:
        return f"α/√r = {alpha / rank ** 0.5:.3g}"
    return f"α/r = {alpha / rank:.3g}"


def _targets(names: list[str]) -> str:
    return " ".join(n.removesuffix("_proj") for n in names)


def _model_rope(config) -> str:
    """The scaling a model's own config already applies (a recipe without a rope section keeps it), or "—"."""
    rp = getattr(config, "rope_parameters", None) or {}
    kind = rp.get("rope_type", "default")
    return "—" if kind == "default" else f"{kind} ×{rp.get('factor', 1.0):g} (model's)"


def recipe_row(path: Path) -> Row:
    """Load and validate one recipe (from the repository root) and derive its row.

    Raises:
        RecipeError: the recipe is invalid.
        SystemExit: its model's config cannot be found offline (ship it under llmft/assets/configs/).
    """
    from llmft.config import load_recipe
    from llmft.model.adapters import lora_parameter_count
    from llmft.model.load import architecture_config, parameter_count_from_config

    recipe = load_recipe(path)
    m, t = recipe.model, recipe.train
    total = parameter_count_from_config(m)
    if total is None:
        raise SystemExit(f"{path}: no config for model.name {m.name!r} offline; ship its published config.json "
                         "under llmft/assets/configs/<org>--<name>/")
    ranks = launch_ranks(path)
    method, rank, alpha, scale, targets, extras, trainable = recipe.method, None, None, "—", "all", "—", total
    if recipe.uses_adapters:
        lo = recipe.adapter
        rank, alpha, scale = lo.rank, lo.alpha, _scale(lo.rank, lo.alpha, lo.use_rslora)
        targets, extras = _targets(lo.targets), ", ".join(lo.trainable_extra) or "—"
        trainable = lora_parameter_count(architecture_config(m), lo)
    if recipe.method == "qlora":
        q = recipe.qlora
        method = f"qlora ({q.quant_type}{', double quant' if q.double_quant else ''}, " \
                 f"{SHORT_DTYPE[q.compute_dtype]} compute, {t.optimizer})"
    rope = f"{m.rope.type} ×{m.rope.factor:g}" if m.rope is not None else _model_rope(architecture_config(m))
    return Row(path=path.as_posix(), method=method, rope=rope, max_seq_len=m.max_seq_len, rank=rank, alpha=alpha,
               scale=scale, targets=targets, extras=extras, lr=t.lr, warmup=t.warmup_steps,
               steps=recipe.total_steps(ranks), ranks=ranks, sequences=recipe.sequences_per_step(ranks), total=total,
               trainable=trainable)


def _lr(x: float) -> str:
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def render(rows: list[Row]) -> str:
    """The markdown table (header, alignment, one line per recipe)."""
    lines = [HEADER, ALIGN]
    for r in rows:
        name = r.path.removeprefix("recipes/")
        cells = [
            f"[`{name}`](../{r.path})", r.method, r.rope, f"{r.max_seq_len:,}",
            "—" if r.rank is None else str(r.rank), "—" if r.alpha is None else f"{r.alpha:g}", r.scale,
            r.targets, r.extras, _lr(r.lr), str(r.warmup), f"{r.steps:,}", str(r.ranks),
            f"{r.sequences * r.max_seq_len:,} ({r.sequences} × {r.max_seq_len:,})",
            f"{r.total:,}", f"{r.trainable:,}", f"{100 * r.trainable / r.total:.2f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows() -> list[Row]:
    """A row per shipped recipe."""
    with in_repo():
        return [recipe_row(p) for p in recipe_paths()]


def splice(text: str, table: str, doc: Path) -> str:
    """``text`` with the block between the markers replaced by ``table``.

    Raises:
        SystemExit: the markers are missing or out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{doc}: needs the markers {BEGIN} and {END} (in that order) around the table")
    return text[: start + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the file's table differs from a fresh one")
    p.add_argument("--doc", type=Path, default=DOC, help="the markdown file to update (default: %(default)s)")
    args = p.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    logger = logging.getLogger("llmft")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the shipped-config notice is expected here
    try:
        fresh = splice(text, render(rows()), args.doc)
    finally:
        logger.setLevel(level)
    if args.check:
        if fresh != text:
            print(f"{args.doc}: the recipe table is stale. Fix: python docs/gen_hyperparameters.py", file=sys.stderr)
            return 1
        print(f"{args.doc}: the recipe table is up to date")
        return 0
    if fresh != text:
        args.doc.write_text(fresh, encoding="utf-8")
    print(f"{args.doc}: {'rewrote' if fresh != text else 'unchanged'} the table of {len(recipe_paths())} recipes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
