"""Train a recipe: ``python launch/train.py RECIPE [key=value ...]`` on one device, or
``deepspeed launch/train.py RECIPE ...`` on many (the same recipe file; its ``deepspeed`` section applies only
under the DeepSpeed launcher). Resumes from the newest complete checkpoint unless ``--no-resume``.
"""

import argparse
import sys

from llmft.cli import parse_args, run, setup_logging
from llmft.cli.train import add_train_args, cmd_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__)
    add_train_args(parser)
    args = parse_args(parser, None)
    setup_logging()
    sys.exit(run(cmd_train, args))
