"""``llmft train RECIPE`` (the same as ``python launch/train.py``, or ``deepspeed launch/train.py`` on many
devices): train, resuming from the newest complete checkpoint unless ``--no-resume``."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    t = sub.add_parser("train", help="train a recipe (same as python launch/train.py)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-5 model.rope.factor=4")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints and start at step 0")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def cmd_train(args: argparse.Namespace) -> int:
    from llmft.train.loop import train_recipe

    train_recipe(args.recipe, args.overrides, resume=not args.no_resume)
    return 0
