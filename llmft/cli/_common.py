"""What every command shares: logging set-up, parsing with ``key=value`` overrides anywhere, and running a command
so that user errors become one message per problem and exit code 2, without a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from llmft.config import RecipeError

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[Exception], ...]:
    from llmft.data.chat import ChatTemplateError
    from llmft.data.sources import DataError
    from llmft.generate import GenerationError
    from llmft.model.load import ModelLoadError
    from llmft.train.checkpoint import CheckpointError

    return RecipeError, ModelLoadError, DataError, CheckpointError, GenerationError, ChatTemplateError


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[llmft] %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft imports bitsandbytes, which warns on CPU about an optional 4-bit kernel LoRA never uses
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # DeepSpeed's ZeRO collectives still call torch APIs that torch marks deprecated; nothing for users to do
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")


def run(func, args: argparse.Namespace) -> int:
    """Run a command; user errors become messages and exit code 2; a run stopped on purpose (preempted: 75,
    diverged: 3) one message and its own code."""
    from llmft.train.stop import TrainingStopped

    try:
        return func(args)
    except TrainingStopped as e:
        print(f"llmft: {type(e).__name__.lower()}: {e}", file=sys.stderr)
        return e.exit_code
    except _user_errors() as e:
        messages = e.messages if isinstance(e, RecipeError) else [str(e)]
        for line in messages:
            print(f"llmft: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides appear anywhere (also after flags such as --no-resume)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def world_size_default() -> int:
    """$WORLD_SIZE, else 1: the data-parallel ranks a command assumes."""
    return int(os.environ.get("WORLD_SIZE", "1"))
