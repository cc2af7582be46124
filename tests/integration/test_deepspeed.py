"""The same recipe under the real DeepSpeed launcher on 2 CPU ranks (gloo/shm), ZeRO-0/2/3, for full fine-tuning,
LoRA and QLoRA.

ZeRO-3 runs use stage3_param_persistence_threshold 0: with DeepSpeed's default (1e5 elements) every tensor of
the tiny model would stay whole on every rank and nothing would be partitioned.

Slow: each run starts two processes (the first run on a machine also builds DeepSpeed's shm comm op).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, tiny_recipe, write_recipe
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from llmft.config import load_recipe
from llmft.data.packing import attention_kwargs
from llmft.model.load import build_model
from llmft.testing.reweighted import reference, shard_columns, write_reweighted_mix
from llmft.train.loop import train

pytestmark = pytest.mark.slow


def zero3_config(tmp_path) -> str:
    """deepspeed.config=... for ZeRO-3 that really partitions every parameter of a tiny model."""
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                                      "stage3_gather_16bit_weights_on_model_save": True}}))
    return f"deepspeed.config={path}"


def deepspeed_train(recipe_path, *overrides) -> subprocess.CompletedProcess:
    # one intra-op thread per rank (2 ranks on 2 cores): multi-threaded CPU kernels can differ in the last bits
    # between two runs, and the bitwise resume checks below compare two runs (see the one_thread fixture)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    port = free_port()
    cmd = [deepspeed, "--master_port", str(port), "--num_accelerators", "2", "launch/train.py",
           str(recipe_path), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, leaked  # the CPU all-reduce buffers are freed at the end of the run
    return proc


# ZeRO-2 in fp32 runs in the LoRA test below and in bench/gpu_check.py's smoke test: here it runs in bf16, as on GPUs.
# Full fine-tuning under ZeRO-3 runs once, with isolated packing and the chunked loss: the plain forward under ZeRO-3
# runs in the LoRA test and in tests/integration/test_sequence_parallel.py. ZeRO-0 (no recipe uses it; llmft's path
# is ZeRO-2's, DeepSpeed only skips the partitioning) is not run: its 30 s went to CI time.
@pytest.mark.parametrize(("stage", "precision", "packing"), [(2, "bf16", "concat"), (3, "fp32", "isolated")])
def test_deepspeed_two_ranks_trains_checkpoints_and_resumes(stage, precision, packing, tmp_path, tiny_model, text_file):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, text_file, run_dir, train={"max_steps": 6, "precision": precision},
                         checkpoint={"every_steps": 3}, data={"packing": packing})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    zero = zero3_config(tmp_path) if stage == 3 else f"deepspeed.stage={stage}"
    if packing == "isolated":  # the chunked loss under partitioned ZeRO-3 (decoder and head called directly)
        zero = f"{zero} train.loss_chunk_tokens=48"
    proc = deepspeed_train(path, *zero.split())
    assert f"2 (DeepSpeed ZeRO-{stage})" in proc.stdout
    assert "shm_comm" not in proc.stdout + proc.stderr  # the CPU-inference all-reduce is not compiled for training
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["tokens_seen"] == 6 * 2 * 2 * 2 * 128  # micro x accum x ranks x seq
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    norms = [r["grad_norm"] for r in rows]
    assert all(math.isfinite(n) and n > 0 for n in norms), norms
    assert len(set(norms)) == 6  # one real optimizer update per step, not one per micro-batch

    final = run_dir / "final"
    config = AutoConfig.from_pretrained(final)
    assert config.rope_parameters["rope_type"] == "linear" and config.max_position_embeddings == 128
    model = AutoModelForCausalLM.from_pretrained(final)
    assert torch.isfinite(model(torch.randint(0, 500, (1, 128))).logits).all()
    assert (run_dir / "checkpoints" / "step-00000003" / "manifest.json").is_file()

    # "crash" after the step-3 checkpoint: drop the final export and run the same command again
    first = load_file(final / "model.safetensors")
    shutil.rmtree(final)
    again = deepspeed_train(path, *zero.split())
    assert "resume             from" in again.stdout and "step-00000003" in again.stdout
    assert "step 4/6" in again.stdout and "step 1/6" not in again.stdout
    second = load_file(final / "model.safetensors")
    diff = max(float((second[k] - first[k]).abs().max()) for k in first)
    print(f"ZeRO-{stage} {precision} {packing}: max |resumed - uninterrupted| = {diff:.3g}")
    assert diff == 0.0  # bitwise on CPU (gloo); on GPUs NCCL's reduction order may vary: docs/reliability.md


LORA = {"rank": 4, "alpha": 8, "target_modules": "attention", "trainable_extra": ["embed", "norm"]}


def adapter_run(tmp_path, tiny_model, text_file, method: str, zero: str, name: str, **sections):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / name, method=method, lora=dict(LORA),
                         train={"max_steps": 6}, checkpoint={"every_steps": 3}, **sections)
    if method == "qlora":
        recipe["model"]["init"] = "pretrained"
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    proc = deepspeed_train(path, zero)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return path, proc, rows, load_file(tmp_path / name / "final" / "adapter_model.safetensors")


def test_lora_under_zero2_and_zero3_trains_saves_and_resumes(tmp_path, tiny_model, text_file):
    """LoRA + LongLoRA extras on 2 ranks: ZeRO-2 and a fully partitioned ZeRO-3 give the same adapter (ZeRO-3
    gathers each trainable parameter for the export), the adapter reloads with plain peft, and a rerun after a
    crash resumes from the step-3 checkpoint (which holds no frozen base weights) to the same adapter."""
    from peft import PeftModel

    path2, proc2, rows2, adapter2 = adapter_run(tmp_path, tiny_model, text_file, "lora", "deepspeed.stage=2", "z2")
    assert "2 (DeepSpeed ZeRO-2)" in proc2.stdout and "trainable" in proc2.stdout
    assert rows2[-1]["loss"] < rows2[0]["loss"]
    _, proc3, rows3, adapter3 = adapter_run(tmp_path, tiny_model, text_file, "lora", zero3_config(tmp_path), "z3")
    assert "2 (DeepSpeed ZeRO-3)" in proc3.stdout
    assert adapter3.keys() == adapter2.keys() and len(adapter2) == 2 * 8 + 5 + 1  # A/B x 4 x 2 layers, norms, embed
    # ZeRO-2 all-reduces and ZeRO-3 reduce-scatters, so gradients differ in the last bits; Adam turns that into
    # sign flips of near-zero updates (seen: 5e-4 absolute, 39 of 256 elements). Compare tensors relatively.
    for k in adapter2:
        assert adapter3[k].shape == adapter2[k].shape and adapter2[k].numel() > 0, k
        assert float((adapter3[k] - adapter2[k]).norm() / adapter2[k].norm()) < 1e-2, k
    for r2, r3 in zip(rows2, rows3):
        assert r3["loss"] == pytest.approx(r2["loss"], abs=1e-4)

    final = tmp_path / "z2" / "final"
    base = AutoModelForCausalLM.from_pretrained(tiny_model, config=AutoConfig.from_pretrained(final))
    model = PeftModel.from_pretrained(base, final)
    torch.testing.assert_close(model.get_base_model().model.embed_tokens.weight.detach(),
                               adapter2["base_model.model.model.embed_tokens.weight"])
    assert torch.isfinite(model(torch.randint(0, 500, (1, 128))).logits).all()

    state = tmp_path / "z2" / "checkpoints" / "step-00000003" / "state" / "deepspeed"
    saved = torch.load(next(state.glob("*model_states.pt")), weights_only=True)["module"]
    assert saved and all("lora_" in k or "modules_to_save" in k for k in saved)  # frozen base left out
    shutil.rmtree(final)
    again = deepspeed_train(path2, "deepspeed.stage=2")
    assert "resume             from" in again.stdout and "step 4/6" in again.stdout
    resumed = load_file(final / "adapter_model.safetensors")
    diff = max(float((resumed[k] - adapter2[k]).abs().max()) for k in adapter2)
    print(f"LoRA ZeRO-2: max |resumed - uninterrupted| = {diff:.3g}")
    assert diff == 0.0  # bitwise on CPU, as above


def test_qlora_under_zero2_and_zero3_with_matching_quant_storage(tmp_path, tiny_model, text_file):
    """QLoRA on 2 ranks: ZeRO-2 with the default uint8 storage, and partitioned ZeRO-3 with the packed 4-bit
    weights stored in the training dtype (float32 here), train the same adapter."""
    _, proc2, rows2, adapter2 = adapter_run(tmp_path, tiny_model, text_file, "qlora", "deepspeed.stage=2", "q2")
    assert "QLoRA nf4" in proc2.stdout and rows2[-1]["loss"] < rows2[0]["loss"]
    _, _, rows3, adapter3 = adapter_run(tmp_path, tiny_model, text_file, "qlora", zero3_config(tmp_path), "q3",
                                        qlora={"quant_storage_dtype": "float32"})
    # the same up to float noise, which Adam amplifies on the zero-initialised B (measured: <= 0.2% relative)
    for k in adapter2:
        assert adapter2[k].numel() > 0, k
        assert float((adapter3[k] - adapter2[k]).norm() / adapter2[k].norm()) < 1e-2, k
    assert rows3[-1]["loss"] == pytest.approx(rows2[-1]["loss"], abs=1e-4)


def test_reweighted_build_under_zero2_logs_the_plain_engines_weighted_loss(tmp_path, tiny_model, book_text):
    """Per-token loss weights (a ``reweight:`` build) on 2 ranks: a step's loss is Σ w·nll / Σ w over the tokens
    of *all* ranks, so ZeRO-2 with 2 ranks x 2 accumulation logs the same losses as one process with 4
    accumulation on the same rows (rank r takes rows r, r + 2, ... of the step's 8). A mean of per-rank ratios
    (each rank dividing by its own Σ w) would not: 3.6e-4 off at step 1, 1.2e-3 at step 2."""
    mix = write_reweighted_mix(tmp_path, book_text)
    recipe = tiny_recipe(tiny_model, tmp_path / "a.jsonl", tmp_path / "plain",
                         train={"max_steps": 2, "gradient_accumulation_steps": 4})
    recipe["data"] = {"recipe": str(mix)}
    cfg = load_recipe(write_recipe(tmp_path / "plain.yaml", recipe))
    plain = train(cfg)

    recipe["checkpoint"]["dir"], recipe["train"]["gradient_accumulation_steps"] = str(tmp_path / "ds"), 2
    recipe["data"] = {"built": str(tmp_path / "plain" / "data")}  # the same rows, not built again
    proc = deepspeed_train(write_recipe(tmp_path / "ds.yaml", recipe), "deepspeed.stage=2")
    assert "2 (DeepSpeed ZeRO-2)" in proc.stdout and "loss weights       per token" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["loss"] for r in rows] == pytest.approx(plain.losses, abs=1e-5)

    # the first step by hand: global Σ w·nll / Σ w over its 8 rows, against the mean of the two ranks' own ratios
    col = shard_columns(tmp_path / "plain" / "data")
    order = torch.randperm(len(col["weight"]), generator=torch.Generator().manual_seed(0))[:8]
    initial = build_model(cfg.model, seed=cfg.train.seed, dtype=torch.float32).model

    def loss_of(idx):
        batch = {k: (v[idx].long() if k != "weight" else v[idx].float()) for k, v in col.items()}
        with torch.no_grad():
            return float(reference(initial, attention_kwargs(batch, "sdpa", torch.float32)))

    global_loss = loss_of(order)
    per_rank_mean = (loss_of(order[0::2]) + loss_of(order[1::2])) / 2
    assert abs(rows[0]["loss"] - global_loss) < 1e-5 and abs(plain.losses[0] - global_loss) < 1e-5
    assert abs(per_rank_mean - global_loss) > 1e-4, (per_rank_mean, global_loss)  # 10x the tolerance
