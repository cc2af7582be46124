"""``llmft merge``: fold LoRA adapters into their base as a plain Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    mg = sub.add_parser("merge", help="fold LoRA adapters (method: lora or qlora output) into their base: a "
                        "plain HF checkpoint (QLoRA: into the unquantized base); repeat --adapter to stack "
                        "adapters with weights")
    mg.add_argument("--base", required=True, help="the base model (hub id or directory) the adapter was trained on")
    mg.add_argument("--adapter", required=True, action="append", metavar="PATH[:WEIGHT]",
                    help="an adapter directory (RUN/final or RUN/checkpoints/step-N/model) or its "
                    "adapter_model.safetensors, with an optional weight (default 1; negative subtracts). Repeat to "
                    "stack: --adapter a:0.7 --adapter b:0.3 gives W0 + 0.7 delta_a + 0.3 delta_b exactly (warns "
                    "where two adapters change the same modules); stacked adapters need the same RoPE settings")
    mg.add_argument("--out", required=True, help="output directory")
    mg.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="dtype of the merged weights")
    mg.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from llmft.model.adapters import merge_adapters, parse_adapter_spec
    from llmft.model.load import DTYPES

    adapters = [parse_adapter_spec(spec) for spec in args.adapter]
    out = merge_adapters(args.base, adapters, Path(args.out), DTYPES[args.dtype])
    print(f"[llmft] merged {' + '.join(args.adapter)} into {args.base}: {out}")
    return 0
