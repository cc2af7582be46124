"""GPU MFU of llmft's training loop on a ~1B LLaMA built from config, at long context, with FlashAttention-2.

    python bench/gpu_mfu.py [--runs 8192:off 32768:on] [--warmup 2] [--steps 5] [--attention auto]
                            [--chunk 4096] [--quick] [--results bench/RESULTS.md]

Needs a CUDA GPU (``--quick`` runs the same code on the CPU bench model at 256 tokens in fp32, as a smoke test;
its table is not a GPU result). Model: the TinyLlama-1.1B shape (22 layers, hidden 2048, 32 heads, 4 key-value heads, MLP 5632,
vocab 32000), random init, built from config; llmft's tiny tokenizer (so the ids use the first rows of the
embedding; the compute is that of the full vocabulary). Training: ``llmft.train.loop.train`` on a recipe,
``train.precision: bf16`` (autocast, fp32 master weights, fused AdamW), one sequence per step,
``train.loss_chunk_tokens`` = ``--chunk``, gradient checkpointing per run (``SEQ_LEN:on|off``), concat rows of the
real Gutenberg books. ``--attention auto``: ``flash_attention_2`` when the flash-attn package imports, else
``sdpa`` (whose CUDA flash backend is FlashAttention-2's algorithm); the table says which ran.

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
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, REPO, RESULTS, book_paths, peak_rss_bytes, run_child, write_section  # noqa: E402

ONE_B = {"vocab_size": 32000, "hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4,
         "intermediate_size": 5632}
H100_BF16_DENSE = 989e12


def matmul_params(cfg: dict) -> int:
    """q and o (h x h), k and v (h x kv_dim), gate, up, down (3 h i) per layer, and the LM head (h v)."""
    h, kv_dim = cfg["hidden_size"], cfg["hidden_size"] * cfg.get("num_kv_heads", cfg["num_heads"]) // cfg["num_heads"]
    return cfg["num_layers"] * (2 * h * h + 2 * h * kv_dim + 3 * h * cfg["intermediate_size"]) + h * cfg["vocab_size"]


def flops_per_token(cfg: dict, seq_len: int) -> float:
    return 6 * matmul_params(cfg) + 12 * cfg["num_layers"] * cfg["hidden_size"] * seq_len


def bf16_gemm_peak(device: str, sizes=(4096, 8192), repeats: int = 10) -> float:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from llmft.config import load_recipe
    from llmft.model.tiny import ASSETS, tiny_llama_config
    from llmft.train import engine
    from llmft.train.loop import train

    cfg = MODEL if args.quick else ONE_B
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        tiny_llama_config(max_position_embeddings=args.seq_len, **cfg).save_pretrained(model_dir)
        for f in (ASSETS / "tiny-llama").iterdir():
            if f.name.startswith("tokenizer"):
                (model_dir / f.name).write_bytes(f.read_bytes())
        recipe = {
            "model": {"name": str(model_dir), "init": "random", "dtype": "bfloat16", "attention": args.attention,
                      "max_seq_len": args.seq_len, "gradient_checkpointing": args.ckpt == "on"},
            "data": {"sources": [{"format": "text", "path": str(p)} for p in book_paths(tmp)], "packing": "concat"},
            "train": {"lr": 1e-5, "max_steps": args.warmup + args.steps, "precision": "bf16" if cuda else "fp32",
                      "micro_batch_size": 1, "loss_chunk_tokens": args.chunk, "seed": 0},
            "checkpoint": {"dir": str(tmp / "run")},
            "logging": {"every_steps": 1},
        }
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        stamps: list[float] = []
        real_step = engine.PlainEngine.step

        def timed_step(self):
            norm = real_step(self)
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return norm

        engine.PlainEngine.step = timed_step
        result = train(load_recipe(path), resume=False)
    steps = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])]
    print(json.dumps({"step_seconds": steps, "losses": result.losses,
                      "peak_mem": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
                      "gpu": torch.cuda.get_device_name() if cuda else "CPU",
                      "peak_flops": bf16_gemm_peak("cuda" if cuda else "cpu", (1024,) if args.quick else (4096, 8192))}))


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
    if args.attention == "auto":
        try:
            import flash_attn  # noqa: F401

            args.attention = "flash_attention_2"
        except ImportError:
            args.attention = "sdpa"
    cfg = MODEL if args.quick else ONE_B
    rows = []
    for run in args.runs:
        seq_len, ckpt = run.split(":")
        res = run_child([__file__, "--child", "--seq-len", seq_len, "--ckpt", ckpt, "--warmup", str(args.warmup),
                         "--steps", str(args.steps), "--attention", args.attention, "--chunk", str(args.chunk),
                         *(["--quick"] if args.quick else [])])
        if res["status"] != "ok":
            raise SystemExit(f"{run} failed ({res['status']}):\n{res['stderr_tail']}")
        tps = int(seq_len) / statistics.median(res["step_seconds"])
        flops = flops_per_token(cfg, int(seq_len)) * tps
        rows.append({"seq_len": int(seq_len), "ckpt": ckpt, "tps": tps, "tflops": flops / 1e12,
                     "mfu": flops / res["peak_flops"], "mfu_spec": flops / H100_BF16_DENSE,
                     "peak_tflops": res["peak_flops"] / 1e12, "mem_gib": res["peak_mem"] / 2**30, "gpu": res["gpu"],
                     "losses": res["losses"]})
        print(f"[bench] {run}: {tps:,.0f} tokens/s, MFU {rows[-1]['mfu']:.1%}, losses {res['losses']}", flush=True)
    print("[bench] json " + json.dumps(rows))
    cmd = (f"python bench/gpu_mfu.py --runs {' '.join(args.runs)} --warmup {args.warmup} --steps {args.steps} "
           f"--attention {args.attention} --chunk {args.chunk}" + (" --quick" if args.quick else ""))
    n = matmul_params(cfg)
    mem = "peak memory (GiB)" if not args.quick else "peak RSS (GiB)"
    lines = [
        f"## gpu_mfu — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; device: {rows[0]['gpu']}, torch {torch.__version__}. Model: "
        + ("the CPU bench model (smoke test, fp32: not a GPU result)" if args.quick else
           f"LLaMA 22 layers, hidden 2048, 32 heads (4 KV), MLP 5632, vocab 32000 ({n / 1e9:.2f} B matmul weights), "
           "random init; bf16 autocast, fp32 master weights")
        + f", attention `{args.attention}`, `train.loss_chunk_tokens: {args.chunk}`, 1 sequence per step, "
        f"{args.warmup} warm-up steps dropped, median of {args.steps}. MFU: (6 N + 12 L h s) x tokens/s / the best bf16 "
        "square matmul measured on this GPU in each run (and / 989 TFLOP/s, the H100 SXM dense bf16 datasheet peak).",
        "",
        "| seq | checkpointing | tokens/s | model TFLOP/s | measured bf16 peak (TFLOP/s) | MFU | MFU vs datasheet | " + mem + " |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['seq_len']} | {r['ckpt']} | {r['tps']:,.0f} | {r['tflops']:.3g} | {r['peak_tflops']:.3g} | "
          f"{r['mfu']:.1%} | {100 * r['mfu_spec']:.3g}% | {r['mem_gib']:.1f} |" for r in rows],
        "",
    ]
    print("\n".join(lines))
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
