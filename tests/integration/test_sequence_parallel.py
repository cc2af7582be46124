"""Sequence parallelism (``parallel.sequence: 2``, DeepSpeed Ulysses) on 2 CPU ranks against one process on the
whole sequence, through the real training loop.

Gradients are read off the weights: one step of AdamW with eps = lr = 1e3 (no warmup, no clipping, no decay) moves
every weight by g / (1 + |g| / eps), i.e. by its gradient up to a monotone, rank-independent correction, so
weights that agree within 1e-5 after the step mean gradients that agree within 1e-5.

Slow: each case starts two DeepSpeed processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, free_ports, run_at_once, tiny_recipe, write_recipe
from safetensors.torch import load_file
from test_deepspeed import deepspeed_train, zero3_config
from transformers import AutoModelForCausalLM

from llmft.config import load_recipe
from llmft.testing.reweighted import write_reweighted_mix
from llmft.train.loop import train

pytestmark = pytest.mark.slow

# one AdamW step = one gradient step: eps >> |g| makes the update lr * g / eps
AS_SGD = {"lr": 1e3, "eps": 1e3, "warmup_steps": 0, "schedule": "constant", "grad_clip": None, "max_steps": 1}
LORA = {"rank": 4, "alpha": 8, "target_modules": "attention", "trainable_extra": ["embed", "norm"]}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, method: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    return load_file(run_dir / "final" / name)


@pytest.mark.parametrize(("method", "data", "stage", "sequence"), [
    ("full", "concat", 2, 2),
    ("full", "weighted", 3, 2),  # isolated packing, per-token loss weights, chunked loss, partitioned ZeRO-3 and
    #                              (in the SP run only) the tiled MLP
    ("lora", "weighted", 2, 2),
    ("qlora", "concat", 2, 2),  # NF4 base, computed in fp32 here
    ("full", "weighted", 3, 1),  # no SP: 2 data-parallel ranks x 1 row x 2 micro-batches, the same 4 rows
])
def test_sequence_parallel_step_equals_the_single_process_step(method, data, stage, sequence, tmp_path,
                                                               sharp_model, text_file, book_text, one_thread):
    """SP=2 (dp=1) takes the same 4 rows as one process and must give the same loss (1e-6) and gradients (1e-5):
    labels shifted across the slice boundary, positions and documents of the whole row, the loss divided by the
    tokens of the whole step. A position restarted per slice or a document seeing across it moves both.

    The last case is plain data parallelism under partitioned ZeRO-3 with the loss made outside the model (chunked,
    weighted): the forward must still go through the DeepSpeed engine, or ZeRO-3 lets the second micro-batch's
    gradients overwrite the first's (seen: update 0.25x in norm, cosine 0.6).

    One thread in the reference process: with two, its loss moved by 1.5e-5 between runs (1 of 3) on this model."""
    recipe = tiny_recipe(sharp_model, text_file, tmp_path / "one", train=dict(AS_SGD), method=method)
    if method != "full":
        recipe["lora"] = dict(LORA)
    if method == "qlora":
        recipe["qlora"] = {"compute_dtype": "float32"}
    if data == "weighted":
        recipe["data"] = {"recipe": str(write_reweighted_mix(tmp_path, book_text))}
        recipe["train"]["loss_chunk_tokens"] = 48
    one = train(load_recipe(write_recipe(tmp_path / "one.yaml", recipe)))

    recipe["checkpoint"]["dir"] = str(tmp_path / "sp")
    recipe["data"] = {"built": str(tmp_path / "one" / "data")}  # the same rows
    recipe["parallel"] = {"sequence": sequence}
    if sequence == 1:
        recipe["train"]["micro_batch_size"] = 1
    elif data == "weighted" and method == "full":
        recipe["model"]["tiled_mlp"] = 2
    zero = zero3_config(tmp_path) if stage == 3 else f"deepspeed.stage={stage}"
    proc = deepspeed_train(write_recipe(tmp_path / "sp.yaml", recipe), zero)
    assert f"2 (DeepSpeed ZeRO-{stage})" in proc.stdout
    if sequence == 2:
        assert "sequence parallel over 2 ranks (DeepSpeed Ulysses): 64 tokens" in proc.stdout
        assert "x 1 data-parallel ranks x 128 tokens" in proc.stdout
    if data == "weighted":
        assert "loss weights       per token" in proc.stdout

    (row,) = metrics(tmp_path / "sp")
    assert row["tokens_seen"] == 4 * 128
    assert abs(row["loss"] - one.losses[0]) < 1e-6, (row["loss"], one.losses[0])
    after_one, after_sp = weights(tmp_path / "one", method), weights(tmp_path / "sp", method)
    assert after_sp.keys() == after_one.keys()
    worst = max(float((after_sp[k] - after_one[k]).abs().max()) for k in after_one)
    print(f"{method} {data} ZeRO-{stage} SP={sequence}: |loss diff| {abs(row['loss'] - one.losses[0]):.2g}, "
          f"max |grad diff| {worst:.2g}")
    assert worst < 1e-5
    # the step moved the weights by their gradients, far beyond the tolerance
    if method == "full":
        before = load_file(sharp_model / "model.safetensors")
        moved = max(float((after_one[k] - before[k]).abs().max()) for k in after_one if k in before)
    else:
        moved = max(float(v.abs().max()) for k, v in after_one.items() if "lora_B" in k)  # B starts at 0
    assert moved > 1e-2, moved


def test_sigkill_under_sequence_parallelism_resumes_bitwise(tmp_path, tiny_model, text_file):
    """SP=2 killed (SIGKILL, whole launcher process group) after step 3 with a step-2 checkpoint on disk: the
    rerun resumes at step 3 and ends with weights bitwise equal to an uninterrupted SP=2 run, continuing the same
    wandb run (offline; rank 0 logs). The evaluation
    during training (every 3 steps, each window split over the 2 ranks) logs the perplexity one process computes
    on the exported model."""
    from llmft.data.build import load_built
    from llmft.eval.ppl import perplexity_by_length

    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "whole", train={"max_steps": 6},
                         checkpoint={"every_steps": 2}, parallel={"sequence": 2}, data={"packing": "isolated"},
                         eval={"every_steps": 3, "lengths": [64, 128], "max_windows": 2},
                         logging={"wandb": {"mode": "offline"}})
    deepspeed_train(write_recipe(tmp_path / "whole.yaml", recipe), "deepspeed.stage=2")
    runs = list((tmp_path / "whole" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs  # one wandb run, from rank 0 only
    evals = [r for r in metrics(tmp_path / "whole") if "eval/ppl@128" in r]
    assert [r["step"] for r in evals] == [3, 6]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final", dtype=torch.float32)
    val = load_built(tmp_path / "whole" / "data").validation_tokens
    with torch.no_grad():
        alone = perplexity_by_length(model, val, [64, 128], 2)
    for n in (64, 128):
        assert evals[-1][f"eval/ppl@{n}"] == pytest.approx(alone[n]["ppl"], rel=1e-5), (n, evals[-1], alone)

    recipe["checkpoint"]["dir"] = str(tmp_path / "killed")
    path = write_recipe(tmp_path / "killed.yaml", recipe)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [deepspeed, "--master_port", str(free_port()), "--num_accelerators", "2", "launch/train.py", str(path),
           "deepspeed.stage=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and sum('"loss"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    assert (tmp_path / "killed" / "checkpoints" / "step-00000002" / "manifest.json").is_file()

    again = deepspeed_train(path, "deepspeed.stage=2")
    assert "resume             from" in again.stdout and "step 1/6" not in again.stdout
    whole, resumed = weights(tmp_path / "whole", "full"), weights(tmp_path / "killed", "full")
    diff = max(float((resumed[k] - whole[k]).abs().max()) for k in whole)
    print(f"SP=2 killed and resumed: max |resumed - uninterrupted| = {diff:.3g}")
    assert diff == 0.0
    losses = [r["loss"] for r in metrics(tmp_path / "whole") if "loss" in r]
    assert [r["loss"] for r in metrics(tmp_path / "killed") if "loss" in r][-1] == losses[-1]
    # the resumed run continues the killed run's wandb run (same id)
    runs = sorted((tmp_path / "killed" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({f.name for r in runs for f in r.glob("run-*.wandb")}) == 1, runs


def _sharded_window_child(recipe_path: str) -> None:
    """One rank (under the deepspeed launcher): score one 128-token window split over the SP group
    (``SequenceParallel.window_nll``) and whole on this rank, recording what the embedding received each time."""
    from llmft.eval.ppl import nll_sum_by_rows
    from llmft.train import loop
    from llmft.train.engine import deepspeed_config

    recipe = load_recipe(recipe_path)
    procs = loop._setup_processes(recipe)
    ds_config = deepspeed_config(recipe, procs.world)
    built, model, _, sp = loop._setup_model(recipe, ds_config)
    engine = loop._setup_engine(recipe, model, built, 1, ds_config, False, sp)
    engine.model.eval()
    x = torch.randint(3, 500, (1, 128), generator=torch.Generator().manual_seed(0))
    shapes = []
    hook = engine.model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: shapes.append(list(inputs[0].shape)))
    sharded = sp.window_nll(engine.model, x, 1)
    with torch.no_grad():  # eval mode: DeepSpeed's attention runs the whole window locally
        whole = float(nll_sum_by_rows(engine.model(input_ids=x, use_cache=False).logits[0, :-1], x[0, 1:]))
    hook.remove()
    engine.close()
    out = Path(recipe.checkpoint.dir) / f"window-rank{procs.rank}.json"
    out.write_text(json.dumps({"sharded": sharded, "whole": whole, "shapes": shapes}))


def test_evaluation_windows_are_split_over_the_sequence_parallel_group(tmp_path, tiny_model, text_file):
    """Under SP an evaluation window is scored like a training row: each rank embeds and runs its 64 of the 128
    tokens (attention over all 128 through the all-to-all; the loss in chunks of 48 positions, as training's), and
    the group's NLL sum equals the whole window's on one rank."""
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run", parallel={"sequence": 2},
                         train={"loss_chunk_tokens": 48})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests" / "integration")])}
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    proc = subprocess.run([deepspeed, "--master_port", str(free_port()), "--num_accelerators", "2", __file__,
                           "--sharded-window", str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"window-rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["shapes"] == [[1, 64], [1, 128]], r["shapes"]  # split, then whole
        assert r["sharded"] == pytest.approx(r["whole"], rel=1e-5), r
    assert ranks[0]["sharded"] == ranks[1]["sharded"]


def _train_with_cpu_flash_child(recipe_path: str) -> None:
    """One rank (under the deepspeed launcher): train the recipe with transformers' flash_attention_2 path on the
    CPU stand-in kernels, and record which kernels ran."""
    from llmft.testing.cpu_flash_attention import cpu_flash_attention

    recipe = load_recipe(recipe_path)
    with cpu_flash_attention() as calls:
        train(recipe)
    rank = int(os.environ.get("RANK", 0))
    (Path(recipe.checkpoint.dir) / f"flash-calls-rank{rank}.json").write_text(json.dumps(dict(calls)))


def test_flash_attention_2_under_sequence_parallelism_isolates_documents_by_varlen(tmp_path, sharp_model, book_text):
    """flash_attention_2 under SP=2: the rows of a micro-batch are flattened into one, each rank keeps half, and
    after DeepSpeed's all-to-all transformers' flash path finds the documents from the gathered position ids and
    runs varlen attention (CPU stand-in kernels for flash-attn's two functions, everything else real). bf16, as
    flash-attn requires: the first loss equals one rank's on the same rows within 1e-5 (relative), later ones within
    1e-3, and a run whose documents see each other (concat packing) is off by more than 1e-3."""
    docs = [book_text[i : i + 90 + (i * 7) % 500] for i in range(0, 30_000, 600)]  # 50 documents, 90-590 chars
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests" / "integration")])}
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"

    runs = {"sp": (2, "isolated"), "one": (1, "isolated"),
            "across": (1, "concat")}  # the same text, documents attending to each other
    commands, ports = {}, free_ports(len(runs))
    for name, (ranks, packing) in runs.items():
        recipe = tiny_recipe(sharp_model, data, tmp_path / name, train={"max_steps": 3, "precision": "bf16"},
                             parallel={"sequence": ranks}, data={"packing": packing})
        recipe["model"]["attention"] = "flash_attention_2"
        path = write_recipe(tmp_path / f"{name}.yaml", recipe)
        commands[name] = [deepspeed, "--master_port", str(ports.pop()), "--num_accelerators", str(ranks), __file__,
                          "--train-cpu-flash", str(path)]
    run_at_once(commands, env)  # the three launches at once (4 one-thread ranks on 2 cores)
    losses = {}
    for name, (ranks, packing) in runs.items():
        for r in range(ranks):
            calls = json.loads((tmp_path / name / f"flash-calls-rank{r}.json").read_text())
            assert (calls.get("varlen", 0) > 0) == (packing == "isolated") and calls.get("torch.float32", 0) == 0, \
                calls
        losses[name] = [r["loss"] for r in metrics(tmp_path / name) if "loss" in r]

    sp, one = losses["sp"], losses["one"]
    print(f"flash_attention_2 SP=2 {sp}, one rank {one}")
    # the first step's loss comes before any bf16 update: equal (seen: bitwise); later ones drift (seen: 5e-5)
    assert abs(sp[0] - one[0]) <= 1e-5 * one[0], (sp, one)
    torch.testing.assert_close(torch.tensor(sp), torch.tensor(one), rtol=1e-3, atol=0)
    across = losses["across"][0]
    print(f"documents attending across: first loss {across}")
    assert abs(across - one[0]) > 1e-3 * one[0], (across, one[0])


def test_a_launch_sequence_parallelism_cannot_use_exits_2(tmp_path, tiny_model, text_file, python):
    """More sequence-parallel ranks than the launch has (deepspeed), or SP under plain python: exit 2, one message
    naming parallel.sequence and the fix, no traceback."""
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run", parallel={"sequence": 4})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    proc = subprocess.run([deepspeed, "--master_port", str(free_port()), "--num_accelerators", "2",
                           "launch/train.py", str(path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "parallel.sequence: 4 is more than the 2 ranks of this launch" in out and "Traceback" not in out

    proc = subprocess.run([python, "launch/train.py", str(path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parallel.sequence: 4 splits each sequence over 4 ranks, which needs the deepspeed launcher" in proc.stderr


if __name__ == "__main__" and "--sharded-window" in sys.argv:  # a rank of the window test (+ --local_rank=N)
    _sharded_window_child(sys.argv[sys.argv.index("--sharded-window") + 1])
if __name__ == "__main__" and "--train-cpu-flash" in sys.argv:  # a rank of the flash test
    _train_with_cpu_flash_child(sys.argv[sys.argv.index("--train-cpu-flash") + 1])
