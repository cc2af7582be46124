"""GPU MFU of llmft's training loop on a ~1B LLaMA built from config, at long context, with FlashAttention-2.

    python bench/gpu_mfu.py [--runs 8192:off 32768:on] [--warmup 2] [--steps 5] [--attention auto]
                            [--chunk 4096] [--quick] [--results bench/RESULTS.md]

Needs a CUDA GPU (``--quick`` runs the same code on the CPU bench model at 256 tokens in fp32, as a smoke test; its
table is not a GPU result). Model: the TinyLlama-1.1B shape (22 layers, hidden 2048, 32 heads, 4 key-value heads, MLP
5632, vocab 32000), random init, built from config; llmft's tiny tokenizer (so the ids use the first rows of the
embedding; the compute is that of the full vocabulary). Training: ``llmft.train.loop.train`` on a recipe,
``train.precision: bf16`` (autocast, fp32 master weights, fused AdamW), one sequence per step,
``train.loss_chunk_tokens`` = ``--chunk``, gradient checkpointing per run (``SEQ_LEN:on|off``), concat rows of the real
Gutenberg books (``bench/train_throughput.py``'s llmft run, which keeps the attention outputs of checkpointed layers).
``--attention auto``: ``flash_attention_2`` when the flash-attn package imports, else ``sdpa`` (whose CUDA flash backend
is FlashAttention-2's algorithm); the table says which ran.

A step's time: between the ends of consecutive optimizer steps, after ``torch.cuda.synchronize()``; the first
``--warmup`` steps are dropped; tokens/s = SEQ_LEN / median step. MFU = model FLOPs per token (6 N + 12 L h s, N =
matmul weights including the LM head, GQA-aware; recomputation not counted) x tokens/s / the best bf16 square
``torch.matmul`` measured on this GPU in the same run; also given against the H100 SXM datasheet peak (989 dense
bf16 TFLOP/s). Each run in its own process; peak memory: ``torch.cuda.max_memory_allocated`` (peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from llmft.machine import gemm_peak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODEL,
    RESULTS,
    book_paths,
    flops_per_token,
    matmul_params,
    peak_rss_bytes,
    run_child,
    write_model_dir,
    write_section,
)
from train_throughput import llmft_child  # noqa: E402  the same llmft run as the CPU benches

ONE_B = {"vocab_size": 32000, "hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4,
         "intermediate_size": 5632}
H100_BF16_DENSE = 989e12


def child(args: argparse.Namespace) -> None:
    import torch

    cfg = MODEL if args.quick else ONE_B
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r = llmft_child(write_model_dir(tmp / "model", args.seq_len, cfg), book_paths(tmp), args.seq_len,
                        args.warmup + args.steps, args.ckpt == "on", args.chunk, tmp, attention=args.attention,
                        precision="bf16" if cuda else "fp32")
        from llmft.config import load_recipe
        from llmft.plan import estimate_memory

        plan = estimate_memory(load_recipe(tmp / "recipe.yaml"), device="cuda" if cuda else "cpu")  # the same run
    ends = r["step_ends"]
    peak = (gemm_peak((4096, 8192), repeats=10, device="cuda", dtype=torch.bfloat16) if cuda
            else gemm_peak((1024,)))  # CPU: only the --quick smoke test gets here
    print(
        json.dumps(
            {
                "step_seconds": [b - a for a, b in zip(ends[args.warmup - 1 :], ends[args.warmup :])],
                "losses": r["losses"],
                "peak_mem": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
                "gpu": torch.cuda.get_device_name() if cuda else "CPU",
                "peak_flops": peak,
                "plan_bytes": plan.total_bytes,
            }
        )
    )


def run(spec: str, warmup: int, steps: int, attention: str, chunk: int, quick: bool) -> dict:
    """One ``SEQ_LEN:on|off`` run in its own process: tokens/s, MFU (measured peak and datasheet), peak memory and
    ``llmft plan``'s estimate for the same recipe.

    Raises:
        SystemExit: the run failed (its stderr's tail in the message).
    """
    seq_len, ckpt = spec.split(":")
    res = run_child([__file__, "--child", "--seq-len", seq_len, "--ckpt", ckpt, "--warmup", str(warmup),
                     "--steps", str(steps), "--attention", attention, "--chunk", str(chunk),
                     *(["--quick"] if quick else [])])
    if res["status"] != "ok":
        raise SystemExit(f"{spec} failed ({res['status']}):\n{res['stderr_tail']}")
    tps = int(seq_len) / statistics.median(res["step_seconds"])
    flops = flops_per_token(int(seq_len), MODEL if quick else ONE_B) * tps
    return {"seq_len": int(seq_len), "ckpt": ckpt, "tps": tps, "tflops": flops / 1e12, "mfu": flops / res["peak_flops"],
            "mfu_spec": flops / H100_BF16_DENSE, "peak_tflops": res["peak_flops"] / 1e12,
            "mem_gib": res["peak_mem"] / 2**30, "plan_gib": res["plan_bytes"] / 2**30, "gpu": res["gpu"],
            "losses": res["losses"]}


def resolve_attention(requested: str) -> str:
    """``auto``: flash_attention_2 when the flash-attn package imports, else sdpa."""
    if requested != "auto":
        return requested
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "sdpa"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["8192:off", "32768:on"], help="SEQ_LEN:on|off (checkpointing)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--attention", default="auto", choices=["auto", "flash_attention_2", "sdpa"])
    p.add_argument("--chunk", type=int, default=4096, help="train.loss_chunk_tokens")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: the bench model, 256:on, 1 + 1 steps")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    if args.quick:
        args.runs, args.warmup, args.steps, args.chunk, args.attention = ["256:on"], 1, 1, 128, "sdpa"
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_mfu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "--quick runs a CPU smoke test")
    args.attention = resolve_attention(args.attention)
    cfg = MODEL if args.quick else ONE_B
    rows = []
    for spec in args.runs:
        rows.append(run(spec, args.warmup, args.steps, args.attention, args.chunk, args.quick))
        print(f"[bench] {spec}: {rows[-1]['tps']:,.0f} tokens/s, MFU {rows[-1]['mfu']:.1%}, losses "
              f"{rows[-1]['losses']}", flush=True)
    print("[bench] json " + json.dumps(rows))
    cmd = (f"python bench/gpu_mfu.py --runs {' '.join(args.runs)} --warmup {args.warmup} --steps {args.steps} "
           f"--attention {args.attention} --chunk {args.chunk}" + (" --quick" if args.quick else ""))
    n = matmul_params(cfg)
    mem = "peak memory (GiB)" if not args.quick else "peak RSS (GiB)"
    lines = [
        f"## gpu_mfu — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; device: {rows[0]['gpu']}, torch {torch.__version__}. Model: "
        + (
            "the CPU bench model (smoke test, fp32: not a GPU result)"
            if args.quick
            else f"LLaMA 22 layers, hidden 2048, 32 heads (4 KV), MLP 5632, vocab 32000 "
            f"({n / 1e9:.2f} B matmul weights), "
            "random init; bf16 autocast, fp32 master weights"
        )
        + f", attention `{args.attention}`, `train.loss_chunk_tokens: {args.chunk}`, 1 sequence per step, "
        f"{args.warmup} warm-up steps dropped, median of {args.steps}. "
        "MFU: (6 N + 12 L h s) x tokens/s / the best bf16 "
        "square matmul measured on this GPU in each run (and / 989 TFLOP/s, the H100 SXM dense bf16 datasheet peak).",
        "",
        "| seq | checkpointing | tokens/s | model TFLOP/s | measured bf16 peak (TFLOP/s) | MFU | MFU vs datasheet | "
        + mem
        + " | llmft plan (GiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['seq_len']} | {r['ckpt']} | {r['tps']:,.0f} | {r['tflops']:.3g} | {r['peak_tflops']:.3g} | "
            f"{r['mfu']:.1%} | {100 * r['mfu_spec']:.3g}% | {r['mem_gib']:.1f} | {r['plan_gib']:.1f} |"
            for r in rows
        ],
        "",
    ]
    print("\n".join(lines))
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
