"""``llmft plan RECIPE``: peak memory per device and, with ``--gpu-mem``, whether it fits and what to change."""

from __future__ import annotations

import argparse

from llmft.cli._common import world_size_default
from llmft.config import RecipeError, load_recipe


def register(sub) -> None:
    pl = sub.add_parser("plan", help="estimate peak memory per device (weights, gradients, optimizer states, "
                        "activations, logits) and, with --gpu-mem, whether it fits and what to change")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.gradient_checkpointing=true")
    pl.add_argument("--gpus", type=int, default=world_size_default(),
                    help="data-parallel ranks; more than 1 plans a DeepSpeed run (default: $WORLD_SIZE or 1)")
    pl.add_argument("--gpu-mem", default=None, metavar="SIZE",
                    help="memory per device, e.g. 80GB or 24GiB: say whether it fits (exit 1 if not) and what to "
                    "change")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="plan a GPU run (default) or a CPU run (everything in host memory)")
    pl.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory estimate per device; exit 1 when --gpu-mem is given and it does not fit.

    Raises:
        RecipeError: --gpus or --gpu-mem is invalid, or the recipe is.
    """
    from llmft.plan import estimate_memory, parse_bytes

    if args.gpus < 1:
        raise RecipeError([f"--gpus: got {args.gpus}; expected the number of data-parallel ranks, at least 1"])
    mem = parse_bytes(args.gpu_mem) if args.gpu_mem is not None else None
    recipe = load_recipe(args.recipe, args.overrides)
    plan = estimate_memory(recipe, args.gpus, mem, device=args.device, recipe_name=args.recipe)
    print(plan.report())
    return 1 if plan.fits is False else 0
