"""The same recipe under the real DeepSpeed launcher on 2 CPU ranks (gloo/shm), ZeRO-2 and ZeRO-3.

Slow: each run starts two processes (the first run on a machine also builds DeepSpeed's shm comm op).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_recipe, write_recipe
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_train(recipe_path, *overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [deepspeed, "--master_port", str(free_port()), "--num_accelerators", "2", "launch/train.py",
           str(recipe_path), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(("stage", "precision", "packing"),
                         [(0, "fp32", "concat"), (2, "fp32", "concat"), (3, "fp32", "concat"), (2, "bf16", "concat"),
                          (3, "fp32", "isolated")])
def test_deepspeed_two_ranks_trains_checkpoints_and_resumes(stage, precision, packing, tmp_path, tiny_model, text_file):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, text_file, run_dir, train={"max_steps": 6, "precision": precision},
                         checkpoint={"every_steps": 3}, data={"packing": packing})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = deepspeed_train(path, f"deepspeed.stage={stage}")
    assert f"2 (DeepSpeed ZeRO-{stage})" in proc.stdout
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
    again = deepspeed_train(path, f"deepspeed.stage={stage}")
    assert "resume             from" in again.stdout and "step-00000003" in again.stdout
    assert "step 4/6" in again.stdout and "step 1/6" not in again.stdout
    second = load_file(final / "model.safetensors")
    for k in first:
        torch.testing.assert_close(second[k], first[k], atol=1e-6, rtol=0)
