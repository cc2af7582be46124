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
    code = run(cmd_train, args)
    # leave the process group before the interpreter exits: torn down at exit instead, its communication threads
    # can abort a rank that already finished ("terminate called without an active exception", exit -6)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
