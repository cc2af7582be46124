"""The GPU check: what only a CUDA machine can show, in one script of under 8 minutes.

    python bench/gpu_check.py [--results bench/RESULTS.md]            # on a CUDA GPU
    python bench/gpu_check.py --quick --results /tmp/check.md         # CPU smoke version (CI): same code, tiny sizes

Each check runs in its own process (a crash or a CUDA out-of-memory fails that check only) and the table of all of
them is appended to RESULTS.md:

1. ``fa2_packing``: isolated packed rows (lognormal lengths, 2 x 4096 tokens) scored by FlashAttention-2 varlen
   (``cu_seq_lens``) and by SDPA with the block-diagonal mask, same bf16 weights: per-token losses agree within bf16
   tolerance (mean |diff| < 0.02 nats, the means within 0.5%).
2. ``mfu_8k`` / ``mfu_32k``: the ~1B LLaMA of ``bench/gpu_mfu.py`` trained by llmft's loop at 8K and 32K with FA2,
   gradient checkpointing and the chunked loss: tokens/s, MFU against the bf16 GEMM peak measured in the same run,
   peak memory against ``llmft plan``'s estimate for the same recipe (within 25%).
3. ``qlora``: QLoRA steps on a 4-layer model of the 1B shape: NF4 with double quantization through CUDA bitsandbytes,
   bf16 compute, LoRA r=64 on every linear layer, ``paged_adamw_32bit``; the loss falls.
4. ``eval_fa2``: LoRA training with FA2 and isolated packing, evaluating perplexity by length and passkey during
   training (the forwards that used to hand fp32 to flash-attn).
5. ``zero2``: ``deepspeed --num_gpus 1 launch/train.py ... deepspeed.stage=2``: DeepSpeed's engine on one GPU.

``--quick`` (no GPU): the bench model, a few hundred tokens, fp32 where bf16 would be slow, SDPA against the eager
block mask in check 1, the CPU bitsandbytes backend and plain AdamW in check 3, DeepSpeed on 1 CPU rank (gloo) in
check 5. It proves the script runs; its numbers are not GPU results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_mfu  # noqa: E402
from common import MODEL, REPO, RESULTS, book_paths, run_child, write_model_dir, write_section  # noqa: E402

CHECKS = ("fa2_packing", "mfu_8k", "mfu_32k", "qlora", "eval_fa2", "zero2")
QLORA_MODEL = {**gpu_mfu.ONE_B, "num_layers": 4}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _peak_mem() -> float:
    import torch
    from common import peak_rss_bytes

    return torch.cuda.max_memory_allocated() / 2**30 if _cuda() else peak_rss_bytes() / 2**30


def _recipe(model_dir: Path, books: list[Path], out: Path, seq_len: int, steps: int, **sections) -> Path:
    """A training recipe over the bench books; ``sections`` update it section by section."""
    import yaml

    recipe = {"model": {"name": str(model_dir), "dtype": "float32", "attention": "auto", "max_seq_len": seq_len},
              "data": {"sources": [{"format": "text", "path": str(p)} for p in books]},
              "train": {"lr": 1e-3, "max_steps": steps, "micro_batch_size": 1, "seed": 0,
                        "precision": "bf16" if _cuda() else "fp32"},
              "checkpoint": {"dir": str(out / "run")}, "logging": {"every_steps": 1}}
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _saved_model(out: Path, seq_len: int, cfg: dict, dtype: str) -> Path:
    """A random-init model of shape ``cfg`` saved with weights (QLoRA and LoRA load pretrained weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = write_model_dir(out / "model", seq_len, cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=getattr(torch, dtype))
    model.save_pretrained(model_dir)
    return model_dir


def check_fa2_packing(quick: bool) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from llmft.data.packing import IGNORE, Example, attention_kwargs, pack_isolated

    cuda = _cuda()
    seq_len = 256 if quick else 4096
    dtype = torch.bfloat16 if cuda else torch.float32
    kernels = ("flash_attention_2", "sdpa") if cuda else ("sdpa", "eager")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _saved_model(Path(tmp), seq_len, MODEL, "float32")
        rng = np.random.default_rng(0)
        lengths = np.clip(rng.lognormal(np.log(seq_len / 8), 0.8, 64).astype(int), 8, seq_len).tolist()
        examples = [Example(rng.integers(4, 2000, n).astype(np.int32), np.ones(n, bool)) for n in lengths]
        rows = pack_isolated(examples, seq_len, pad_id=0)
        batch = {"input_ids": rows.input_ids[:2], "labels": rows.labels[:2], "position_ids": rows.position_ids[:2]}
        device = "cuda" if cuda else "cpu"
        nll = {}
        for kernel in kernels:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=kernel)
            model = model.to(device).eval()
            inputs = attention_kwargs({k: v.to(device) for k, v in batch.items()}, kernel, dtype)
            labels = inputs.pop("labels").reshape(-1)  # (b s,)
            with torch.no_grad():
                logits = model(**inputs).logits.float().reshape(-1, model.config.vocab_size)  # (b s, v)
            per_token = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE,
                                                          reduction="none")  # (b s - 1,)
            nll[kernel] = per_token[labels[1:] != IGNORE].cpu()
            del model
    a, b = (nll[k] for k in kernels)
    mean_abs, rel = float((a - b).abs().mean()), abs(float(a.mean() - b.mean())) / float(b.mean())
    tolerance = 0.02 if cuda else 1e-4
    return {"ok": mean_abs < tolerance and rel < 5e-3,
            "summary": f"{kernels[0]} vs {kernels[1]} (block mask), {len(a)} trained tokens in {len(lengths)} "
                       f"examples: mean |diff| {mean_abs:.2g} nats (< {tolerance}), means {float(a.mean()):.4f} vs "
                       f"{float(b.mean()):.4f} ({rel:.2%}), packing {rows.efficiency:.1%} full",
            "mean_abs_diff": mean_abs, "rel_mean_diff": rel}


def check_mfu(quick: bool, seq_len: int) -> dict:
    spec, chunk = ("256:on", 128) if quick else (f"{seq_len}:on", 4096)
    attention = "sdpa" if quick else gpu_mfu.resolve_attention("auto")
    r = gpu_mfu.run(spec, 1 if quick else 2, 1 if quick else 3, attention, chunk, quick)
    ratio = r["mem_gib"] / r["plan_gib"]
    ok = all(math.isfinite(x) for x in r["losses"]) and (quick or 0.75 <= ratio <= 1.25)
    return {"ok": ok, "summary": f"{attention}, {r['seq_len']} tokens, checkpointing: {r['tps']:,.0f} tokens/s, "
                                 f"MFU {r['mfu']:.1%} of the measured {r['peak_tflops']:.3g} TFLOP/s "
                                 f"({100 * r['mfu_spec']:.3g}% of 989), peak {r['mem_gib']:.1f} GiB vs plan "
                                 f"{r['plan_gib']:.1f} GiB ({ratio:.2f}x)", **r}


def _train(path: Path) -> tuple[list[float], float, list[dict]]:
    """(losses, seconds per step after the first, metrics rows) of one training run."""
    from llmft.config import load_recipe
    from llmft.train.loop import train

    t0 = time.perf_counter()
    result = train(load_recipe(path), resume=False)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.losses, seconds, rows


def check_qlora(quick: bool) -> dict:
    import torch

    cuda = _cuda()
    seq_len, steps, accum = (128, 6, 4) if quick else (4096, 8, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = _saved_model(tmp, seq_len, MODEL if quick else QLORA_MODEL, "bfloat16")
        path = _recipe(model_dir, book_paths(tmp), tmp, seq_len, steps,
                       model={"attention": "sdpa" if quick else "auto"}, method="qlora",
                       lora={"rank": 64, "alpha": 16, "target_modules": "all_linear"},
                       qlora={"quant_type": "nf4", "double_quant": True,
                              "compute_dtype": "bfloat16" if cuda else "float32"},
                       train={"optimizer": "paged_adamw_32bit" if cuda else "adamw", "lr": 1e-3,
                              "gradient_accumulation_steps": accum})
        torch.cuda.reset_peak_memory_stats() if cuda else None
        losses, seconds, _ = _train(path)
    fell = sum(losses[-2:]) < sum(losses[:2])  # the mean of the last two steps below the first two
    return {
        "ok": all(math.isfinite(x) for x in losses) and fell,
        "summary": f"NF4 + double quant, r=64 all linear, {'paged_adamw_32bit' if cuda else 'adamw'}, {seq_len} "
        f"tokens: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps of {accum} rows, {seconds:.0f} s, peak "
        f"{_peak_mem():.1f} GiB",
        "losses": losses,
    }


def check_eval_fa2(quick: bool) -> dict:
    cuda = _cuda()
    seq_len = 256 if quick else 4096
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = _saved_model(tmp, seq_len, MODEL, "float32")
        path = _recipe(model_dir, book_paths(tmp), tmp, seq_len, 2, model={"attention": "sdpa" if quick else "auto"},
                       method="lora", data={"packing": "isolated", "validation_fraction": 0.05},
                       eval={"every_steps": 2, "lengths": [seq_len // 2, seq_len], "max_windows": 2,
                             "passkey": {"lengths": [seq_len], "depths": [0.0, 1.0], "trials": 2}})
        losses, seconds, rows = _train(path)
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    ok = all(math.isfinite(x) for x in losses) and f"eval/ppl@{seq_len}" in evals and f"eval/passkey@{seq_len}" in evals
    return {"ok": ok, "summary": f"LoRA, {'bf16' if cuda else 'fp32'}, isolated packing, {seq_len} tokens: "
                                 + ", ".join(f"{k} {v:.4g}" for k, v in evals.items()), "evals": evals}


def check_zero2(quick: bool) -> dict:
    cuda = _cuda()
    seq_len = 256 if quick else 4096
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_dir(tmp / "model", seq_len, MODEL)
        path = _recipe(model_dir, book_paths(tmp), tmp, seq_len, 4, model={"init": "random", "attention": "sdpa"},
                       train={"lr": 1e-3})
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(29500 + os.getpid() % 1000)]
        launcher += ["--num_gpus", "1"] if cuda else ["--num_accelerators", "1"]
        env = {**os.environ, **({} if cuda else {"DS_ACCELERATOR": "cpu"})}
        t0 = time.perf_counter()
        done = subprocess.run([*launcher, "launch/train.py", str(path), "deepspeed.stage=2", "--no-resume"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=420)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()] \
            if (tmp / "run" / "metrics.jsonl").is_file() else []
    losses = [r["loss"] for r in rows if "loss" in r]
    ok = done.returncode == 0 and len(losses) == 4 and all(math.isfinite(x) for x in losses)
    return {"ok": ok, "summary": f"ZeRO-2, 1 {'GPU' if cuda else 'CPU rank'}, {seq_len} tokens: exit "
                                 f"{done.returncode}, losses {', '.join(f'{x:.3f}' for x in losses)}, {seconds:.0f} s"
                                 + ("" if done.returncode == 0 else f"; stderr: {done.stderr[-600:]}"),
            "losses": losses}


def child(name: str, quick: bool) -> None:
    fn = {"fa2_packing": check_fa2_packing, "qlora": check_qlora, "eval_fa2": check_eval_fa2,
          "zero2": check_zero2, "mfu_8k": lambda q: check_mfu(q, 8192), "mfu_32k": lambda q: check_mfu(q, 32768)}[name]
    print(json.dumps(fn(quick)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke version: tiny sizes, no GPU needed")
    p.add_argument("--checks", nargs="+", choices=CHECKS,
                   help="default: all (--quick: all but mfu_32k, which is mfu_8k's code at the same tiny size)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    import torch

    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); --quick runs the "
                         "CPU smoke version")
    checks = args.checks or [c for c in CHECKS if not (args.quick and c == "mfu_32k")]
    rows, t_all = [], time.perf_counter()
    for name in checks:
        res = run_child([__file__, "--child", name, *(["--quick"] if args.quick else [])], timeout_s=480)
        if res["status"] != "ok":
            res = {"ok": False, "summary": f"{res['status']} after {res['seconds']:.0f} s: "
                                           + " ".join(res["stderr_tail"].split())[-700:]}
        rows.append({"check": name, "seconds": res.get("seconds", 0.0), **res})
        print(f"[gpu_check] {name}: {'PASS' if res['ok'] else 'FAIL'} - {res['summary']}", flush=True)
    passed = sum(r["ok"] for r in rows)
    print("[gpu_check] json " + json.dumps([{k: v for k, v in r.items() if k != "stderr_tail"} for r in rows]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke version, not a GPU result)"
    try:
        import flash_attn

        fa = f"flash-attn {flash_attn.__version__}"
    except ImportError:
        fa = "flash-attn not installed"
    import bitsandbytes
    import deepspeed
    import transformers

    lines = [f"## gpu_check — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Command: `python bench/gpu_check.py{' --quick' if args.quick else ''}`; device: {device}; torch "
             f"{torch.__version__}, transformers {transformers.__version__}, {fa}, bitsandbytes "
             f"{bitsandbytes.__version__}, deepspeed {deepspeed.__version__}. {passed}/{len(rows)} checks passed in "
             f"{time.perf_counter() - t_all:.0f} s.", "",
             "| check | result | what was measured | seconds |", "|---|---|---|---:|",
             *[f"| {r['check']} | {'pass' if r['ok'] else '**FAIL**'} | {r['summary'].replace('|', '/')} | "
               f"{r['seconds']:.0f} |" for r in rows], ""]
    print("\n".join(lines))
    write_section(args.results, lines)
    raise SystemExit(0 if passed == len(rows) else 1)


if __name__ == "__main__":
    main()
