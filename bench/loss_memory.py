"""Chunked-loss benchmark: peak memory (RSS) and step time of one forward + backward with the full-logits loss
vs ``train.loss_chunk_tokens``, each in a fresh process, on the same model and batch.

    python bench/loss_memory.py [--seq-len 8192] [--chunk 1024]

Model: LLaMA, 4 layers, hidden 256, 4 heads, vocab 32000 (random init), fp32, SDPA, micro-batch 1. At 8192
tokens the fp32 logits alone are 8192 x 32000 x 4 B = 1.05 GB (and their gradient as much again).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_step(seq_len: int, chunk: int) -> dict:
    """Runs in a child process: build the model, one forward + backward, report peak RSS and time."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from llmft.testing.memory import reset_peak, vm_bytes
    from llmft.testing.tiny import tiny_llama_config
    from llmft.train.loss import causal_lm_loss

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                               max_position_embeddings=seq_len)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 32000, (1, seq_len))
    batch = {"input_ids": ids, "labels": ids.clone()}
    before = reset_peak()
    t0 = time.perf_counter()
    loss = causal_lm_loss(model, batch, seq_len - 1, chunk)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = vm_bytes("VmHWM")
    return {"loss": float(loss), "peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(one_step(args.seq_len, args.child)))
        return
    runs = {}
    for chunk in (0, args.chunk):
        out = subprocess.run([sys.executable, __file__, "--seq-len", str(args.seq_len), "--child", str(chunk)],
                             capture_output=True, text=True, check=True)
        runs[chunk] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = runs[0], runs[args.chunk]
    assert abs(full["loss"] - chunked["loss"]) < 1e-4, (full, chunked)
    lines = [
        f"## loss_memory — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python bench/loss_memory.py --seq-len {args.seq_len} --chunk {args.chunk}`; machine: "
        f"{platform.machine()}, CPU. LLaMA 4 layers, hidden 256, vocab 32000, fp32, SDPA; one forward + backward "
        "of one sequence, each mode in a fresh process. Same loss in both (checked).",
        "",
        "| loss | peak RSS (MB) | growth during the step (MB) | seconds | ratio (peak) |",
        "|---|---:|---:|---:|---:|",
        f"| full logits (the model's own loss) | {full['peak_mb']:,.0f} | {full['step_mb']:,.0f} | "
        f"{full['seconds']:.2f} | 1.00 |",
        f"| chunked, {args.chunk} positions | {chunked['peak_mb']:,.0f} | {chunked['step_mb']:,.0f} | "
        f"{chunked['seconds']:.2f} | {chunked['peak_mb'] / full['peak_mb']:.2f} |",
        "",
    ]
    print("\n".join(lines))
    with open(REPO / "bench" / "RESULTS.md", "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
