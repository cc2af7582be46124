"""Chunked-prefill benchmark: peak memory (RSS) and time of ``llmft generate`` on a long prompt with the prompt
prefilled in one forward vs ``--prefill-chunk`` tokens at a time, at two or three prompt lengths, each run in a fresh
process, with the same greedy output checked.

    python bench/prefill_memory.py [--lengths 2048,4096,8192] [--chunk 1024] [--new-tokens 8]

Model: LLaMA, 4 layers, hidden 512, 8 heads, MLP 1376, the tiny BPE tokenizer (vocab 2048), random init, fp32,
SDPA. The KV cache (2 x layers x hidden x 4 B = 16 KiB a token) is the same in both modes; what chunking removes is
one forward's activations over the whole prompt (the MLP's L x 1376 and the attention's L x hidden tensors per
layer), which grow with the prompt length.
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
sys.path.insert(0, str(REPO))

from bench.common import write_section  # noqa: E402


def one_run(length: int, chunk: int, new_tokens: int) -> dict:
    """Runs in a child process: build the model, generate from a ``length``-token prompt, report peak RSS."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmft.generate import Sampling, generate
    from llmft.testing.memory import reset_peak, vm_bytes
    from llmft.testing.tiny import tiny_llama_config

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(REPO / "llmft" / "assets" / "tiny-llama")
    config = tiny_llama_config(vocab_size=len(tok), hidden_size=512, num_layers=4, num_heads=8,
                               intermediate_size=1376, max_position_embeddings=length + new_tokens + 1)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(5, len(tok), (1, length))  # (1, L)
    before = reset_peak()
    t0 = time.perf_counter()
    out = generate(model, tok, ids, Sampling(max_new_tokens=new_tokens, prefill_chunk=chunk))
    seconds = time.perf_counter() - t0
    peak = vm_bytes("VmHWM")
    return {"tokens": out.token_ids, "peak_mb": peak / 2**20,
            "growth_mb": (peak - before) / 2**20, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    p.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args.child[0], args.child[1], args.new_tokens)))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for n in lengths:
        runs = {}
        for chunk in (0, args.chunk):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), str(chunk), "--new-tokens",
                                  str(args.new_tokens)], capture_output=True, text=True, check=True)
            runs[chunk] = json.loads(out.stdout.strip().splitlines()[-1])
        whole, chunked = runs[0], runs[args.chunk]
        assert whole["tokens"] == chunked["tokens"], (n, whole["tokens"], chunked["tokens"])
        rows.append((n, whole, chunked))
        print(f"[bench] prompt {n:,}: growth {whole['growth_mb']:,.0f} MB whole vs {chunked['growth_mb']:,.0f} MB "
              f"chunked", flush=True)
    lines = [
        f"## prefill_memory — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `python bench/prefill_memory.py --lengths {args.lengths} --chunk {args.chunk} --new-tokens "
        f"{args.new_tokens}`; machine: {platform.machine()}, CPU. LLaMA 4 layers, hidden 512, MLP 1376, vocab 2048, "
        "fp32, SDPA, random init; `llmft.generate.generate` greedy, each run in a fresh process; the same tokens "
        "in both modes (checked). Growth = peak RSS during generation (VmHWM) minus the RSS before it, with the model "
        "and prompt built, freed heap returned to the OS and the high-water mark reset (`reset_peak`).",
        "",
        "| prompt tokens | whole prompt: growth (MB) | chunked: growth (MB) | ratio | whole: s | chunked: s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, whole, chunked in rows:
        lines.append(f"| {n:,} | {whole['growth_mb']:,.0f} | {chunked['growth_mb']:,.0f} | "
                     f"{chunked['growth_mb'] / max(whole['growth_mb'], 1e-9):.2f} | {whole['seconds']:.1f} | "
                     f"{chunked['seconds']:.1f} |")
    lines.append("")
    print("\n".join(lines))
    print("[bench] json " + json.dumps([{"length": n, "whole": w, "chunked": c} for n, w, c in rows]), flush=True)
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
