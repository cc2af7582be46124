"""``llmft quickstart`` and ``llmft repro pi | mdqa``: the offline CPU demo and tiny-scale reproductions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    q = sub.add_parser("quickstart", help="offline CPU demo: pre-train a tiny base, extend it x8 with PI, "
                       "print perplexity by context length before and after")
    q.add_argument("--out", default="runs/quickstart", help="output directory")
    q.add_argument("--steps-scale", type=float, default=1.0, help="scale the number of training steps")
    q.add_argument("--fast", action="store_true", help="the CI-sized version: 5%% of the steps (--steps-scale 0.05)")
    q.set_defaults(func=cmd_quickstart)

    rp = sub.add_parser("repro", help="reproduce a published result at tiny scale (offline, CPU)")
    rpsub = rp.add_subparsers(dest="repro_command", required=True, metavar="EXPERIMENT")
    pi = rpsub.add_parser("pi", help="Position Interpolation: extend a base pre-trained at C x8 with PI / none / "
                          "YaRN / dynamic NTK, perplexity, passkey and RULER's needle at C..8C; writes a "
                          "PI-paper-shaped table and plots")
    pi.add_argument("--out", default="runs/repro-pi", help="output directory (default: runs/repro-pi)")
    size = pi.add_mutually_exclusive_group()
    size.add_argument("--fast", action="store_true",
                      help="the CI-sized version (a few minutes): two of the four fine-tunes (linear PI, YaRN), one "
                      "stage of fewer steps, less text evaluated")
    size.add_argument("--pretrain", action="store_true",
                      help="pre-train the base at C first (16 more minutes) instead of starting from the shipped one "
                      "(llmft/assets/repro-base, made by this with --save-base)")
    pi.add_argument("--seed", type=int, default=0, help="seed of every training run and of the passkey data")
    pi.add_argument("--books", type=Path, default=None,
                    help="a PG-19-shaped directory (train/ and test/) or a directory of books to split "
                    "(default: the two bundled books)")
    pi.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")
    pi.add_argument("--doc", type=Path, default=None,
                    help="also write the markdown and PNGs here (e.g. docs/results/pi_tiny.md)")
    pi.add_argument("--save-base", type=Path, default=None,
                    help="also save the pre-trained base in bf16 there (to start other experiments from)")
    pi.set_defaults(func=cmd_repro_pi)

    mq = rpsub.add_parser("mdqa", help="multi-document QA (Lost in the Middle protocol, synthetic stand-in): "
                          "accuracy by gold position of a PI-extended tiny model before and after fine-tuning")
    mq.add_argument("--out", default="runs/repro-mdqa", help="output directory (default: runs/repro-mdqa)")
    mq.add_argument("--model", type=Path, default=None,
                    help="the start model (default: the shipped llmft/assets/repro-pi-linear, the PI experiment's "
                    "linear PI x8 fine-tune)")
    mq.add_argument("--fast", action="store_true", help="the CI-sized version (a few minutes)")
    mq.add_argument("--lr", type=float, default=None,
                    help="the fine-tune's learning rate (default: recipes/repro/mdqa.yaml's, set for the default "
                    "start model)")
    mq.add_argument("--seed", type=int, default=0, help="seed of the data and the fine-tune")
    mq.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")
    mq.add_argument("--doc", type=Path, default=None,
                    help="also write the markdown and PNG here (e.g. docs/results/mdqa_tiny.md)")
    mq.set_defaults(func=cmd_repro_mdqa)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from llmft.quickstart import FAST_STEPS_SCALE, quickstart

    quickstart(Path(args.out), steps_scale=FAST_STEPS_SCALE if args.fast else args.steps_scale)
    return 0


def cmd_repro_pi(args: argparse.Namespace) -> int:
    from llmft.repro import run_pi

    command = "llmft repro pi " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["repro", "pi"] else None
    run_pi(Path(args.out), fast=args.fast, seed=args.seed, books=args.books, fresh=args.fresh, doc=args.doc,
           command=command, save_base=args.save_base, pretrain=args.pretrain)
    return 0


def cmd_repro_mdqa(args: argparse.Namespace) -> int:
    from llmft.repro_mdqa import run_mdqa_demo

    command = "llmft repro mdqa " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["repro", "mdqa"] else None
    run_mdqa_demo(Path(args.out), model=args.model, fast=args.fast, seed=args.seed, fresh=args.fresh, doc=args.doc,
                  command=command, lr=args.lr)
    return 0
