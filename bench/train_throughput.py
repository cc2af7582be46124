"""Training throughput: llmft's training loop against transformers' ``Trainer`` on the same model, data, precision,
batch and gradient checkpointing; tokens/s, peak RSS and MFU of each, and the ratios.

    python bench/train_throughput.py [--runs 4096:off 4096:on 16384:on] [--warmup 1] [--steps 3] [--repeats 2]
                                     [--chunk 4096] [--compile] [--hf-compile] [--quick] [--results bench/RESULTS.md]

``--runs`` lists ``SEQ_LEN:CHECKPOINTING`` (on/off, the same for both sides). Model: LLaMA 4 layers, hidden 256,
4 heads, MLP 688, vocab 32000, random init (seed 0, the same weights on both sides), fp32, SDPA, one sequence per
step (no accumulation), AdamW, grad clip 1.0. Data: the real Gutenberg books (../shared/data/gutenberg, else the
bundled ones), each ``[BOS] book [EOS]``, concatenated and cut into rows of SEQ_LEN.

- llmft: a recipe written to a temp dir, run by ``llmft.train.loop.train`` (the entry point of
  ``python launch/train.py``); ``train.loss_chunk_tokens`` = ``--chunk``, ``data.packing: concat``, logging every
  step (metrics.jsonl), the final export after the loop (outside the timed steps, inside the peak RSS).
- transformers: ``Trainer`` with ``TrainingArguments(per_device_train_batch_size=1, learning_rate=<same>,
  activation_checkpointing=<same>, activation_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no",
  report_to="none", disable_tqdm=True)`` and its defaults otherwise (``adamw_torch_fused``, max_grad_norm 1.0,
  linear schedule, logging every 500 steps, ``default_data_collator``); the model built with
  ``attn_implementation="sdpa"``.

Each side runs in its own process (so ``ru_maxrss`` is per side), ``--repeats`` times, alternating which goes
first; both with ``MALLOC_MMAP_THRESHOLD_=131072``. A step's time is the interval between the ends of consecutive
optimizer steps (everything the loop does in between: data, forward, backward, clip, update, logging); the first
``--warmup`` steps are dropped; tokens/s = SEQ_LEN / median step time over all repeats. MFU = model FLOPs per token
(bench/common.py: 6 N + 12 L h s, N = 11,354,112 matmul weights including the LM head) x tokens/s / the best fp32
square ``torch.matmul`` of this machine, measured in the same run (before, between and after the runs).
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

from llmft.machine import gemm_peak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    RESULTS,
    book_paths,
    flops_per_token,
    machine,
    peak_rss_bytes,
    run_child,
    write_model_dir,
    write_section,
)

LR = 1e-4


def llmft_child(model_dir: Path, books: list[Path], seq_len: int, steps: int, checkpointing: bool, chunk: int,
                out: Path, compile_layers: bool = False, attention: str = "sdpa", precision: str = "fp32") -> dict:
    """One llmft run of ``steps`` optimizer steps through ``llmft.train.loop.train``; step-end times (and the start
    of the first forward) recorded by wrapping ``PlainEngine.step`` and ``forward`` (the loop itself is untouched;
    on a GPU a step ends after ``torch.cuda.synchronize()``). Also the llmft side of bench/compile.py and
    bench/gpu_mfu.py."""
    sys.path.insert(0, str(REPO))
    import torch

    from llmft.config import load_recipe
    from llmft.train import engine
    from llmft.train.loop import train

    recipe = {
        "model": {"name": str(model_dir), "init": "random", "dtype": "float32", "attention": attention,
                  "max_seq_len": seq_len, "gradient_checkpointing": checkpointing,
                  **({"checkpoint_keep_attention": True} if checkpointing else {}),
                  **({"compile": True} if compile_layers else {})},
        "data": {"sources": [{"format": "text", "path": str(p)} for p in books], "packing": "concat"},
        "train": {"lr": LR, "max_steps": steps, "precision": precision, "micro_batch_size": 1,
                  "loss_chunk_tokens": chunk, "seed": 0},
        "checkpoint": {"dir": str(out / "run")},
        "logging": {"every_steps": 1},
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    stamps: list[float] = []
    real_step = engine.PlainEngine.step
    cuda = torch.cuda.is_available()

    def timed_step(self):
        norm = real_step(self)
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return norm

    first_forward: list[float] = []

    def timed_forward(self, *a, **k):  # the start of the first step (the model is built and the data read)
        if not first_forward:
            first_forward.append(time.perf_counter())
        return real_forward(self, *a, **k)

    real_forward = engine.PlainEngine.forward
    engine.PlainEngine.step, engine.PlainEngine.forward = timed_step, timed_forward
    result = train(load_recipe(path), resume=False)
    return {"first_forward": first_forward[0], "step_ends": stamps, "losses": result.losses,
            "peak_rss": peak_rss_bytes()}


def hf_child(model_dir: Path, books: list[Path], seq_len: int, steps: int, checkpointing: bool, out: Path,
             compile_model: bool = False) -> dict:
    """One transformers ``Trainer`` run of ``steps`` optimizer steps; step-end times from a callback.
    ``compile_model``: the Trainer's own ``torch_compile=True`` (the whole model through ``torch.compile``)."""
    import datasets
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for p in books:
        ids += [tok.bos_token_id, *tok(p.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"],
                tok.eos_token_id]
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    torch.manual_seed(0)  # as llmft's build_model: the same initial weights
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation="sdpa",
                                             dtype=torch.float32)
    stamps: list[float] = []
    losses: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=1, max_steps=steps,
                             learning_rate=LR, activation_checkpointing=checkpointing,
                             activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
                             save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                             torch_compile=compile_model)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[Stamp()])
    result = trainer.train()
    losses.append(float(result.training_loss))
    return {"step_ends": stamps, "losses": losses, "peak_rss": peak_rss_bytes(), "optim": str(args.optim)}


def child_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        books = [Path(p) for p in args.books]
        steps = args.warmup + args.steps
        if args.child == "llmft":
            r = llmft_child(Path(args.model_dir), books, args.seq_len, steps, args.ckpt == "on", args.chunk, tmp,
                            args.compile)
        else:
            r = hf_child(Path(args.model_dir), books, args.seq_len, steps, args.ckpt == "on", tmp,
                         args.child == "hf_compile")
    ends = r.pop("step_ends")
    r.pop("first_forward", None)
    r["step_seconds"] = [b - a for a, b in zip(ends[args.warmup - 1 :], ends[args.warmup :])]
    print(json.dumps(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["4096:off", "4096:on", "16384:on"], help="SEQ_LEN:on|off ...")
    p.add_argument("--warmup", type=int, default=1, help="steps not timed (>= 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--repeats", type=int, default=2, help="processes per side and run, alternating the order")
    p.add_argument("--chunk", type=int, default=4096, help="llmft train.loss_chunk_tokens")
    p.add_argument("--compile", action="store_true", help="llmft side with model.compile (regional torch.compile; "
                   "the warm-up step absorbs the compile time); transformers' Trainer stays eager, its default")
    p.add_argument("--hf-compile", action="store_true", help="also run the Trainer with its own torch_compile=True "
                   "(a third side; ratios stay against the eager Trainer, its default)")
    p.add_argument("--quick", action="store_true", help="smoke test: 512:on, 1 + 1 steps, 1 repeat")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file the section is appended to")
    p.add_argument("--child", choices=["llmft", "hf", "hf_compile"], help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--books", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return
    if args.quick:
        args.runs, args.warmup, args.steps, args.repeats, args.chunk = ["512:on"], 1, 1, 1, 256
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step includes one-time setup)")
    runs = [(int(s), c) for s, c in (r.split(":") for r in args.runs)]
    import torch

    peak_sizes = (1024,) if args.quick else (2048, 3072, 4096)
    peaks = [gemm_peak(peak_sizes)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_dir(tmp / "model", max(s for s, _ in runs))
        books = [str(b) for b in book_paths(tmp)]
        for seq_len, ckpt in runs:
            sides = ["llmft", "hf", *(["hf_compile"] if args.hf_compile else [])]
            got: dict[str, list[dict]] = {side: [] for side in sides}
            for r in range(args.repeats):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    cmd = [__file__, "--child", side, "--seq-len", str(seq_len), "--ckpt", ckpt, "--model-dir",
                           str(model_dir), "--warmup", str(args.warmup), "--steps", str(args.steps),
                           "--chunk", str(args.chunk), *(["--compile"] if args.compile else []), "--books", *books]
                    res = run_child(cmd)
                    if res["status"] != "ok":
                        raise SystemExit(f"{side} at {seq_len} failed ({res['status']}):\n{res['stderr_tail']}")
                    print(f"[bench] {side:10s} s={seq_len} ckpt={ckpt} repeat {r}: steps "
                          f"{', '.join(f'{t:.2f}' for t in res['step_seconds'])} s, peak RSS "
                          f"{res['peak_rss'] / 2**20:,.0f} MiB, load {res['load1']:.2f}", flush=True)
                    got[side].append(res)
            peaks.append(gemm_peak(peak_sizes))
            rows.append((seq_len, ckpt, got))
    peak = max(peaks)

    def summary(runs_of_side: list[dict], seq_len: int) -> dict:
        times = [t for r in runs_of_side for t in r["step_seconds"]]
        tps = seq_len / statistics.median(times)
        return {"tps": tps, "min_tps": seq_len / max(times), "max_tps": seq_len / min(times),
                "rss": max(r["peak_rss"] for r in runs_of_side), "mfu": flops_per_token(seq_len) * tps / peak,
                "load": statistics.mean(r["load1"] for r in runs_of_side), "n": len(times)}

    cmd = (f"python bench/train_throughput.py --runs {' '.join(args.runs)} --warmup {args.warmup} --steps "
           f"{args.steps} --repeats {args.repeats} --chunk {args.chunk}" + (" --compile" if args.compile else "")
           + (" --hf-compile" if args.hf_compile else "") + (" --quick" if args.quick else ""))
    lines = [
        f"## train_throughput — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{cmd}`; machine: {machine()}. Model: LLaMA 4 layers, hidden 256, 4 heads, MLP 688, vocab "
        "32000, random init (seed 0), fp32, SDPA, 1 sequence per step, real Gutenberg books, concat rows. llmft: "
        f"`llmft.train.loop.train` on a recipe, `train.loss_chunk_tokens: {args.chunk}`"
        + (", `model.compile: true`" if args.compile else "") + ". transformers: `Trainer`, "
        "same lr, checkpointing and batch, defaults otherwise (adamw_torch_fused)"
        + ("; 'Trainer, torch_compile' adds `torch_compile=True` (ratios stay against the eager Trainer)"
           if args.hf_compile else "") + ". Each side in its own process, "
        f"{args.repeats} processes per side alternating the order, {args.warmup} warm-up step(s) dropped, median "
        f"of the timed steps (range in brackets). Peak RSS: ru_maxrss of the side's process "
        "(MALLOC_MMAP_THRESHOLD_=131072 for both). MFU: (6 N + 12 L h s) FLOPs per token, N = 11,354,112 matmul "
        f"weights incl. the LM head, x tokens/s / measured GEMM peak {peak / 1e9:.1f} GFLOP/s (best fp32 "
        f"square matmul, {torch.get_num_threads()} threads, measured {len(peaks)} times in this run: "
        f"{', '.join(f'{x / 1e9:.0f}' for x in peaks)}). Load: mean 1-minute load average during the side's runs "
        "(the machine is shared).",
        "",
        "| seq | checkpointing | side | tokens/s [range] | ratio | peak RSS (MiB) | ratio | MFU | load |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    table = []
    for seq_len, ckpt, got in rows:
        s_l, s_h = summary(got["llmft"], seq_len), summary(got["hf"], seq_len)
        s_c = summary(got["hf_compile"], seq_len) if got.get("hf_compile") else None
        table.append({"seq_len": seq_len, "checkpointing": ckpt, "llmft": s_l, "hf": s_h, "hf_compile": s_c,
                      "tps_ratio": s_l["tps"] / s_h["tps"], "rss_ratio": s_l["rss"] / s_h["rss"]})
        named = [("transformers Trainer", s_h), *([("Trainer, torch_compile", s_c)] if s_c else []), ("llmft", s_l)]
        for name, s in named:
            tr, rr = s["tps"] / s_h["tps"], s["rss"] / s_h["rss"]
            lines.append(f"| {seq_len} | {ckpt} | {name} | {s['tps']:,.0f} [{s['min_tps']:,.0f}-{s['max_tps']:,.0f}] "
                         f"| {tr:.2f} | {s['rss'] / 2**20:,.0f} | {rr:.2f} | {s['mfu']:.1%} | {s['load']:.2f} |")
    lines.append("")
    print("\n".join(lines))
    print("[bench] json " + json.dumps({"gemm_peak": peak, "rows": table}))
    write_section(args.results, lines)


if __name__ == "__main__":
    main()
