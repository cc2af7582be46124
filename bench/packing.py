"""Packing benchmark: training tokens/s with isolated rows (block-diagonal attention) vs concat rows, measured
in the same run on the same model, plus packing efficiency on length distributions.

    python bench/packing.py [--seq-len 2048] [--steps 6]

Model: LLaMA, 4 layers, hidden 256, 4 heads, vocab 32000 (random init), fp32, SDPA, AdamW, micro-batch 1.
Prints a table and appends it to bench/RESULTS.md with the date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llmft.data.packing import Example, attention_kwargs, pack_concat, pack_isolated  # noqa: E402
from llmft.testing.tiny import tiny_llama_config  # noqa: E402


def examples(lengths, seed=0, vocab=32000):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(4, vocab, n).astype(np.int32), np.ones(n, bool)) for n in lengths]


def train_tokens_per_second(model, rows, isolate: bool, steps: int) -> float:
    """Slots per second over ``steps`` optimizer steps (after one warm-up step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    times = []
    for i in range(steps + 1):
        batch = {"input_ids": rows.input_ids[i : i + 1], "labels": rows.labels[i : i + 1],
                 "position_ids": rows.position_ids[i : i + 1]}
        if isolate:
            batch = attention_kwargs(batch, "sdpa", torch.float32)
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return rows.input_ids.shape[1] / float(np.median(times[1:]))


def ni_task_lengths(tokenizer) -> list[int]:
    """Token lengths of the real NI task 085 instances (definition + 2 demos + instance), if the file is there."""
    path = REPO.parent / "shared" / "data" / "natural_instructions" / "task085_unnatural_addsub_arithmetic.json"
    if not path.is_file():
        return []
    task = json.loads(path.read_text())
    d = " ".join(task["Definition"]) if isinstance(task["Definition"], list) else task["Definition"]
    demos = "".join(f"Input: {x['input']}\nOutput: {x['output']}\n\n" for x in task["Positive Examples"][:2])
    return [len(tokenizer(f"Definition: {d}\n\n{demos}Input: {i['input']}\nOutput: {i['output'][0]}")["input_ids"]) + 2
            for i in task["Instances"]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.manual_seed(0)
    s = args.seq_len
    model = LlamaForCausalLM(tiny_llama_config(32000, hidden_size=256, num_layers=4, num_heads=4,
                                               max_position_embeddings=s))
    model.config._attn_implementation = "sdpa"
    model.train()

    rng = np.random.default_rng(0)
    lognormal = np.clip(rng.lognormal(5.5, 0.8, 20000).astype(int), 2, s).tolist()
    concat_rows = pack_concat(examples(lognormal[:2000]), s)
    isolated_rows = pack_isolated(examples(lognormal[:2000]), s, pad_id=0)
    concat_tps = train_tokens_per_second(model, concat_rows, False, args.steps)
    isolated_tps = train_tokens_per_second(model, isolated_rows, True, args.steps)
    useful = isolated_tps * isolated_rows.efficiency

    tok = AutoTokenizer.from_pretrained(REPO / "llmft/assets/tiny-llama")
    dists = {"lognormal (median ~245 tokens)": lognormal,
             "uniform 1-500": rng.integers(1, 500, 20000).tolist()}
    ni = ni_task_lengths(tok)
    if ni:
        dists["NI task 085, resampled (144-187 tokens)"] = np.random.default_rng(0).choice(ni, 4000).tolist()
    effs = {name: pack_isolated(examples(lengths, seed=1, vocab=100), s, pad_id=0).efficiency
            for name, lengths in dists.items()}

    lines = [
        f"## packing — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python bench/packing.py --seq-len {s} --steps {args.steps}`; machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU. Model: LLaMA 4 layers, hidden 256, "
        "vocab 32000, fp32, SDPA, AdamW, micro-batch 1. Median step time over the measured steps.",
        "",
        "| rows | tokens/s (slots) | ratio vs concat |",
        "|---|---:|---:|",
        f"| concat | {concat_tps:,.0f} | 1.00 |",
        f"| isolated (block-diagonal mask) | {isolated_tps:,.0f} | {isolated_tps / concat_tps:.2f} |",
        f"| isolated, non-pad tokens only ({isolated_rows.efficiency:.2%} full) | {useful:,.0f} | "
        f"{useful / concat_tps:.2f} |",
        "",
        f"| length distribution | isolated packing efficiency at {s} |",
        "|---|---:|",
        *[f"| {name} | {eff:.2%} |" for name, eff in effs.items()],
        "",
    ]
    print("\n".join(lines))
    results = REPO / "bench" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results\n\nNewest runs are appended at the end. Ratios compare with a "
                           "baseline measured in the same run.\n\n")
    with open(results, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
