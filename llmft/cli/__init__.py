"""``llmft`` command line: validate, plan, train, data (build / dedup / report / inspect / validate), merge, eval,
report, generate, chat, quickstart, repro.

Each command group is a module here that registers its parser (``register(subparsers)``) and calls one library
function; user errors (bad recipe, missing model or data, impossible backend) print one message per problem and
exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse

from llmft.cli import data, evaluate, experiments, generate, merge, plan, train, validate
from llmft.cli._common import EXIT_USER_ERROR, parse_args, run, setup_logging

__all__ = ["EXIT_USER_ERROR", "build_parser", "main", "parse_args", "run", "setup_logging"]

COMMAND_GROUPS = (validate, plan, train, data, merge, evaluate, generate, experiments)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmft", description="Long-context fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging()
    return run(args.func, args)
