"""``llmft validate RECIPE``: check a training recipe (and its producer, data mix and DeepSpeed config); print it
resolved with the derived numbers."""

from __future__ import annotations

import argparse

from llmft.cli._common import world_size_default
from llmft.config import load_recipe, recipe_to_yaml


def register(sub) -> None:
    v = sub.add_parser("validate", help="check a recipe; print it resolved with the derived numbers")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-5")
    v.add_argument("--world-size", type=int, default=world_size_default(),
                   help="data-parallel ranks to assume (default: $WORLD_SIZE or 1)")
    v.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from llmft.summary import derived_numbers
    from llmft.train.engine import deepspeed_config

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.model.produced_by is not None:
        load_recipe(recipe.model.produced_by)
    if recipe.data.recipe is not None:
        from llmft.config.data import load_mix

        load_mix(recipe.data.recipe)
    deepspeed_config(recipe, args.world_size)
    print(f"# {args.recipe}: valid\n" + recipe_to_yaml(recipe))
    print("\n".join("# " + line for line in derived_numbers(recipe, args.world_size)))
    return 0
