"""Training through the real entry points on a tiny LLaMA: loss falls, the output reloads with plain
transformers (same logits, RoPE settings kept), runs are deterministic, a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from llmft.cli import main
from llmft.config import load_recipe
from llmft.train import checkpoint as ckpt
from llmft.train.loop import train


def run(tmp_path: Path, tiny_model: Path, text_file: Path, name: str = "run", overrides=(), **sections):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / name, **sections)
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    return train(load_recipe(path, list(overrides))), path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_output_reloads_with_same_logits(tmp_path, tiny_model, text_file):
    result, _ = run(tmp_path, tiny_model, text_file, overrides=["train.max_steps=12"])
    losses = result.losses
    assert len(losses) == 12 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    config = AutoConfig.from_pretrained(result.final_dir)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.max_position_embeddings == 128  # 32 x 4
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    x = torch.randint(0, 500, (2, 128))
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, result.model(x).logits, atol=1e-5, rtol=0)
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "tokens_seen"} <= set(rows[0])
    assert rows[-1]["tokens_seen"] == 12 * 2 * 2 * 128
    assert (result.run_dir / "recipe.yaml").is_file()


def test_lr_schedule_warmup_then_cosine(tmp_path, tiny_model, text_file):
    result, _ = run(tmp_path, tiny_model, text_file, overrides=["train.max_steps=10", "train.warmup_steps=4",
                                                                  "train.min_lr_ratio=0.1"])
    lrs = [r["lr"] for r in metrics(result.run_dir)]  # the lr each step's update used
    assert lrs[:5] == pytest.approx([3e-3 * 1 / 4, 3e-3 * 2 / 4, 3e-3 * 3 / 4, 3e-3, 3e-3])
    assert lrs[-1] == pytest.approx(3e-4)  # min_lr_ratio x peak at the last step
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_deterministic_on_cpu(tmp_path, tiny_model, text_file):
    a, _ = run(tmp_path, tiny_model, text_file, name="a", overrides=["train.max_steps=4"])
    b, _ = run(tmp_path, tiny_model, text_file, name="b", overrides=["train.max_steps=4"])
    assert a.losses == b.losses
    wa, wb = load_file(a.final_dir / "model.safetensors"), load_file(b.final_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_resume_starts_fresh(tmp_path, tiny_model, text_file, capsys):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "r", train={"max_steps": 4}, checkpoint={"every_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--no-resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("resume             fresh start") == 2
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2, 3, 4]


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    run_dir = tmp_path / "run"
    good = ckpt.staging_dir(run_dir, 2)
    (good / "w.bin").write_bytes(b"x" * 100)
    ckpt.publish(good, 2, keep_last=3)
    no_manifest = run_dir / "checkpoints" / ckpt.step_dir_name(4)
    no_manifest.mkdir()
    (no_manifest / "w.bin").write_bytes(b"x" * 100)
    truncated = ckpt.staging_dir(run_dir, 6)
    (truncated / "w.bin").write_bytes(b"x" * 100)
    ckpt.publish(truncated, 6, keep_last=3)
    (run_dir / "checkpoints" / ckpt.step_dir_name(6) / "w.bin").write_bytes(b"x" * 10)  # torn write
    ckpt.staging_dir(run_dir, 8)  # a crash mid-write leaves only .tmp-step-00000008
    assert ckpt.latest_complete(run_dir) == run_dir / "checkpoints" / ckpt.step_dir_name(2)


def test_a_damaged_checkpoint_is_skipped_on_resume(tmp_path, tiny_model, text_file, caplog):
    """Same size, one byte flipped (bit rot, a bad copy): the SHA-256 in the manifest catches it; the rerun resumes
    from the older checkpoint and still ends bitwise equal to an uninterrupted run."""
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run", train={"max_steps": 6},
                         checkpoint={"every_steps": 2, "keep_last": 3})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    first = train(load_recipe(path))
    newest = tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(4)
    weights = newest / "state" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert ckpt.is_complete(newest) and "model.safetensors does not match its SHA-256" in ckpt.verify(newest)
    assert ckpt.latest_complete(tmp_path / "run") == tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(2)
    assert "is damaged" in caplog.text
    shutil.rmtree(first.final_dir)
    again = train(load_recipe(path))
    assert again.resumed_from == 2
    expected = load_file(tmp_path / "run" / "final" / "model.safetensors")
    reference, _ = run(tmp_path, tiny_model, text_file, name="straight", train={"max_steps": 6})
    straight = load_file(reference.final_dir / "model.safetensors")
    assert all(torch.equal(expected[k], straight[k]) for k in straight)


def test_rotation_keeps_last_k_complete(tmp_path):
    run_dir = tmp_path / "run"
    for step in (1, 2, 3, 4):
        tmp = ckpt.staging_dir(run_dir, step)
        (tmp / "f").write_text(str(step))
        ckpt.publish(tmp, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3, 4]


def test_wandb_offline_writes_a_local_run_and_disabled_writes_nothing(tmp_path, tiny_model, text_file):
    on, _ = run(
        tmp_path, tiny_model, text_file, name="on", overrides=["train.max_steps=2", "logging.wandb.mode=offline"]
    )
    runs = list((on.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    off, _ = run(tmp_path, tiny_model, text_file, name="off", overrides=["train.max_steps=2"])
    assert not (off.run_dir / "wandb").exists()


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, tiny_model, text_file):
    overrides = ["train.max_steps=4", "checkpoint.every_steps=2", "logging.wandb.mode=offline"]
    first, _ = run(tmp_path, tiny_model, text_file, name="w", overrides=overrides)
    saved = json.loads((first.run_dir / "checkpoints" / "step-00000002" / "state" / "trainer.json").read_text())
    shutil.rmtree(first.final_dir)  # as if killed after the step-2 checkpoint
    again, _ = run(tmp_path, tiny_model, text_file, name="w", overrides=overrides)
    assert again.resumed_from == 2
    runs = sorted((first.run_dir / "wandb").glob("offline-run-*"))
    # each run dir holds run-<id>.wandb (its name ends in -<id>, plus -1 when both runs start in the same second)
    assert len(runs) == 2 and all((r / f"run-{saved['wandb_id']}.wandb").is_file() for r in runs)


def test_eval_hook_logs_ppl_by_length(tmp_path, tiny_model, text_file):
    result, _ = run(tmp_path, tiny_model, text_file, overrides=["train.max_steps=4"],
                    eval={"every_steps": 2, "lengths": [32, 64, 128], "max_windows": 2})
    evals = [r for r in metrics(result.run_dir) if "eval/ppl@128" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(1 < r["eval/ppl@32"] < 600 for r in evals)


def test_bad_jsonl_lines_are_counted_and_located(tmp_path, tiny_model, book_text, capsys):
    data = tmp_path / "docs.jsonl"
    good = [json.dumps({"text": book_text[i : i + 5000]}) for i in range(0, 50_000, 5000)]
    lines = good[:3] + ['{"text": "unterminated'] + good[3:6] + ['{"body": "no text field"}'] + good[6:]
    data.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    recipe = tiny_recipe(tiny_model, data, tmp_path / "run", train={"max_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "10 documents" in out and "3 bad records skipped" in out
    rc = main(["train", str(path), "--no-resume", "data.on_error=stop"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:4: malformed JSON" in err and "Traceback" not in err


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "llmft.cli", "--help"], capture_output=True, text=True).stdout
    assert all(cmd in out for cmd in ("validate", "train", "quickstart"))


def test_flash_attention_requested_without_cuda_is_a_clear_error(tmp_path, tiny_model, text_file, capsys,
                                                                 monkeypatch):
    from llmft.model import load as model_load

    monkeypatch.setattr(model_load, "flash_attn_available", lambda: False)  # as here, also on a machine that has it
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run", model={"attention": "flash_attention_2"},
                         train={"precision": "bf16"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "flash_attention_2 cannot run here" in err and "model.attention: sdpa" in err


def test_weight_decay_skips_norms_and_biases(tiny_model):
    from llmft.config import ModelConfig, TrainConfig
    from llmft.model.load import build_model
    from llmft.train.optim import build_optimizer

    model = build_model(ModelConfig(name=str(tiny_model), max_seq_len=32, dtype="float32")).model
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1, max_steps=1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert len(no_decay["params"]) == len(norms) and len(decay["params"]) + len(norms) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_fused_adamw_matches_foreach(tiny_model, text_file):
    """The plain engine's fused AdamW makes the same updates as the foreach one, to float rounding."""
    from llmft.config import ModelConfig, TrainConfig
    from llmft.model.load import build_model
    from llmft.train.optim import build_optimizer

    cfg = TrainConfig(lr=1e-3, weight_decay=0.1, max_steps=1)
    models = [build_model(ModelConfig(name=str(tiny_model), max_seq_len=32, dtype="float32")).model for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(models[0], cfg, fused=True), build_optimizer(models[1], cfg)]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"] and opts[1].defaults["foreach"]
    x = torch.randint(0, models[0].config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = [[], []]
    for _ in range(4):
        for k, (model, opt) in enumerate(zip(models, opts)):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[k].append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0][-1] < losses[0][0] - 0.1
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=0)


def test_bf16_autocast_in_a_single_process(tmp_path, tiny_model, text_file):
    result, _ = run(tmp_path, tiny_model, text_file, overrides=["train.max_steps=6", "train.precision=bf16"])
    assert all(0 < x < 10 for x in result.losses) and result.losses[-1] < result.losses[0]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # fp32 master weights


def test_isolated_packing_step_loss_equals_examples_scored_alone(tmp_path, sharp_model, book_text):
    """The first step's loss (before any update) with isolated packing, through the real loop, equals the
    token-weighted mean of each packed document's loss when that document is run on its own. The model is the
    sharpened tiny LLaMA: with a near-uniform one, a step that lets examples attend to each other, or that trains
    each example's first token, moves the mean by less than the tolerance."""
    tiny_model = sharp_model
    from transformers import AutoTokenizer

    from llmft.data.build import load_built
    from llmft.data.loader import PackedLoader

    rng = __import__("random").Random(0)
    docs = [book_text[i : i + rng.randint(40, 600)] for i in range(0, 40_000, 700)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    overrides = ["train.max_steps=1", "data.packing=isolated", "data.validation_fraction=0"]
    result, path = run(tmp_path, tiny_model, data, overrides=overrides)
    recipe = load_recipe(path, overrides)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = load_built(tmp_path / "run" / "data").rows  # the rows the run built, served in the run's order
    assert rows.index["real_tokens"] == sum(
        len(tok(d, add_special_tokens=False)["input_ids"]) + 2 for d in docs
    )  # + BOS, EOS
    loader = PackedLoader(rows, micro_batch_size=2, seed=0)
    from llmft.model.load import build_model

    model = build_model(recipe.model).model.eval()  # initial weights, RoPE x4 as in training
    nll, count = 0.0, 0
    with torch.no_grad():
        for _ in range(2):  # gradient_accumulation_steps
            batch = loader.next_batch()
            for ids, pos in zip(batch["input_ids"], batch["position_ids"]):
                starts = torch.nonzero(pos == 0).flatten().tolist() + [len(pos)]
                for a, b in zip(starts[:-1], starts[1:]):
                    if (ids[a:b] == tok.pad_token_id).all():
                        continue  # the padding segment
                    alone = ids[a:b][None]
                    logits = model(alone).logits
                    nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], alone[0, 1:], reduction="sum"))
                    count += b - a - 1
    assert rows.efficiency > 0.9
    assert result.losses[0] == pytest.approx(nll / count, abs=1e-5)


def test_natural_instructions_trains_on_answers_only(tmp_path, tiny_model, shared_data):
    """Real NI task: prompt (definition + demos + input) is context only; loss on the answer and EOS."""
    from transformers import AutoTokenizer

    from llmft.config.sources import SourceSpec
    from llmft.data.build import encode_documents
    from llmft.data.sources import SourceReport, read_source

    spec = {"format": "natural_instructions", "path": str(shared_data / "natural_instructions")}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = json.loads(next((shared_data / "natural_instructions").glob("*.json")).read_text())
    examples = encode_documents(list(read_source(SourceSpec(**spec), "stop", SourceReport())), tok)
    assert len(examples) == len(task["Instances"]) == 30
    for e, inst in zip(examples, task["Instances"]):
        trained = tok.decode(e.tokens[e.loss_mask])
        assert trained == inst["output"][0] + tok.eos_token
        assert "Input: " + inst["input"] in tok.decode(e.tokens[~e.loss_mask])

    recipe = tiny_recipe(tiny_model, tmp_path / "unused.txt", tmp_path / "run", train={"max_steps": 3},
                         model={"max_seq_len": 256, "rope": {"type": "linear", "factor": 8.0}})
    recipe["data"] = {"sources": [spec], "packing": "isolated"}
    result = train(load_recipe(write_recipe(tmp_path / "ni.yaml", recipe)))
    assert len(result.losses) == 3 and all(0 < x < 10 for x in result.losses)


def test_a_step_with_only_prompt_tokens_is_a_zero_loss_not_nan(tmp_path, tiny_model, caplog, shared_data):
    """At 32 tokens every NI example is split, and some steps hold only prompt chunks."""

    spec = {"format": "natural_instructions", "path": str(shared_data / "natural_instructions")}
    recipe = tiny_recipe(tiny_model, tmp_path / "unused.txt", tmp_path / "run", train={"max_steps": 6},
                         model={"max_seq_len": 32, "rope": None})
    recipe["data"] = {"sources": [spec], "packing": "isolated"}
    result = train(load_recipe(write_recipe(tmp_path / "ni.yaml", recipe)))
    assert all(x == x and x >= 0 for x in result.losses)
    assert "prompt/completion examples are longer than seq_len=32" in caplog.text
    assert "has no trained tokens" in caplog.text  # the case this test exists for did occur


def test_periodic_eval_logs_perplexity_passkey_and_ruler(tmp_path, tiny_model, text_file):
    """eval: every_steps runs ppl-by-length and, with eval.passkey / eval.ruler, passkey retrieval and RULER tasks;
    all land in metrics.jsonl."""
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run", train={"max_steps": 4},
                         eval={"every_steps": 2, "lengths": [64, 128], "max_windows": 2,
                               "passkey": {"lengths": [200], "depths": [0.0, 1.0], "trials": 2},
                               "ruler": {"tasks": ["niah_single_1", "niah_multikey_2"], "lengths": [512],
                                         "samples": 2, "max_new_tokens": 4}})
    recipe["model"]["rope"]["factor"] = 16.0  # 32 -> 512 positions: room for the passkey and RULER prompts
    train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppl = [r for r in rows if "eval/ppl@128" in r]
    passkey = [r for r in rows if "eval/passkey@200" in r]
    assert [r["step"] for r in ppl] == [2, 4] and [r["step"] for r in passkey] == [2, 4]
    assert all(r["eval/ppl@64"] > 1 for r in ppl)
    assert all(r["eval/passkey@200"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in passkey)  # 4 trials per eval
    ruler = [r for r in rows if "eval/ruler@512" in r]
    assert [r["step"] for r in ruler] == [2, 4]
    for r in ruler:  # the average of the two tasks, each the mean of 2 samples scored 0 or 100
        tasks = [r["eval/ruler/niah_single_1@512"], r["eval/ruler/niah_multikey_2@512"]]
        assert all(t in (0.0, 50.0, 100.0) for t in tasks) and r["eval/ruler@512"] == sum(tasks) / 2
