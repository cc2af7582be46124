"""`llmft repro mdqa --fast`: multi-document QA end to end (the shipped PI-extended model, synthetic
Lost-in-the-Middle data, evaluation before, answer-only fine-tune with isolated packing, evaluation after, report):
the fine-tune gains retrieval at 2.5x the base's pre-training length, and every reported number is recomputed here
from the files the run wrote (docs/results/mdqa_tiny.md is the full run)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from PIL import Image

from llmft.cli import main
from llmft.config import load_recipe
from llmft.data.sources.applications import answer_in
from llmft.eval.applications import mdqa_files
from llmft.repro_mdqa import FAST, FULL, RECIPE, START_MODEL


@pytest.mark.slow
def test_repro_mdqa_fast_gains_retrieval_and_reports_what_it_measured(tmp_path, monkeypatch):
    out, doc = tmp_path / "repro", tmp_path / "docs" / "mdqa_tiny.md"
    monkeypatch.chdir(tmp_path)  # the shipped start model and recipe are found from anywhere
    assert main(["repro", "mdqa", "--fast", "--fresh", "--out", str(out), "--doc", str(doc)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["scale"] == "fast" and r["start_model"].endswith(START_MODEL)  # no --model: the shipped one
    assert r["start_rope"] == "1024 positions, RoPE linear x8"
    assert r["lr"] == r["stage_lrs"][0] == load_recipe(RECIPE).train.lr  # the recipe's: no --lr given
    stage = FAST.stages[0]
    assert FAST.stages == FULL.stages[:1]  # --fast is the full run's first stage

    # the gain the demonstration exists for: the start model answers in no usable form, the fine-tuned one finds the
    # passage far above chance (25% at k = 4: the right one of the 4 codes at random), most answers from a passage
    n = FAST.eval_examples * 4
    before, after = r["overall"]["before"]["4"], r["overall"]["after"]["4"]
    assert before <= 0.05 and after >= 0.40, (before, after, n)
    assert after - r["overall"]["chance"]["4"] >= 0.12  # p < 0.005 for a chance-level model over these n questions
    assert r["behaviour"]["after"]["from_a_passage"] >= 0.6

    # the evaluation data: every gold position of each k, disjoint from the training questions
    files = mdqa_files(out / "data" / "eval")
    assert set(files) == {(k, i) for k in FAST.eval_ks for i in range(k)}
    train = [json.loads(x) for x in (out / "data" / "train-1.jsonl").read_text().splitlines()]
    assert len(train) == stage.examples and {len(t["ctxs"]) for t in train} == set(stage.ks)
    asked = {(rec["question"], rec["answers"][0]) for p in files.values()
             for rec in map(json.loads, gzip.open(p, "rt"))}
    assert not asked & {(t["question"], t["answers"][0]) for t in train}

    # the fine-tune ran through the training loop for the scale's steps and learned something of the answers
    losses = r["train_losses"]
    assert len(losses) == stage.steps and (out / "ft" / "final" / "config.json").is_file()
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10

    gold = {(k, i): [rec["answers"] for rec in map(json.loads, gzip.open(p, "rt"))] for (k, i), p in files.items()}
    # every reported accuracy recomputed from the answers the run recorded, each re-scored against the files
    for which in ("before", "after"):
        outputs = r[which]["outputs"]
        assert len(outputs) == FAST.eval_examples * sum(FAST.eval_ks)
        seen: dict = {}
        for o in outputs:
            n = seen.setdefault((o["k"], o["gold"]), 0)
            assert o["correct"] == answer_in(o["output"], gold[(o["k"], o["gold"])][n])
            seen[(o["k"], o["gold"])] = n + 1
        for k in FAST.eval_ks:
            mine = [o["correct"] for o in outputs if o["k"] == k]
            assert r["overall"][which][str(k)] == pytest.approx(sum(mine) / len(mine))
            for i in range(k):
                cell = r[which]["cells"][str(k)][str(i)]
                assert cell["n"] == FAST.eval_examples and cell["too_long"] == 0
                assert cell["correct"] == sum(o["correct"] for o in outputs if (o["k"], o["gold"]) == (k, i))
        b = r["behaviour"][which]
        said = [o["output"].strip() for o in outputs]
        assert b["distinct_answers"] == len(set(said)) and b["n"] == len(outputs)
        assert b["from_a_passage"] == pytest.approx(sum(o["in_context"] for o in outputs) / len(outputs))
    assert r["overall"]["chance"] == {str(k): 1 / k for k in FAST.eval_ks}

    # the report: the run's copy and --doc, the same tables, and a plot
    for md in (out / "mdqa_tiny.md", doc):
        text = md.read_text()
        for k in FAST.eval_ks:
            o = {which: 100 * r["overall"][which][str(k)] for which in ("before", "after")}
            row = f"| {k} | {o['before']:.1f}% | {o['after']:.1f}% | {100 / k:.1f}% |"
            assert row in text
        assert "llmft repro mdqa --fresh --fast" in text
        assert f"{stage.steps} steps at lr 0.001 on 1,500 examples with k in {{2, 4}}; the gold passage" in text
        with Image.open(md.with_name("mdqa_tiny.png")) as im:
            assert im.size[0] > 400 and im.size[1] > 300


@pytest.mark.slow
def test_the_full_runs_stages_chain_models_and_scale_the_lr_and_a_rerun_trains_nothing_again(tmp_path):
    """The full run's staging, at 2 steps a stage: stage 2 starts from stage 1's final model at its lr factor, the
    last stage's model is published as ``ft/final``, and running the stages again (a resumed run) trains nothing."""
    from llmft.data.synthetic import mdqa_training_records
    from llmft.repro_mdqa import Stage, _write, fine_tune, shipped_path

    stages = (Stage(steps=2, examples=40, ks=(2,)), Stage(steps=2, examples=40, ks=(4,), lr_factor=0.3))
    files = []
    for i, stage in enumerate(stages, 1):
        files.append(tmp_path / f"train-{i}.jsonl")
        _write(files[-1], "".join(json.dumps(r) + "\n" for r in mdqa_training_records(40, ks=stage.ks, seed=i)))
    start = shipped_path(START_MODEL)
    final, losses, lrs = fine_tune(start, tmp_path / "ft", files, stages, seed=0, lr=None)

    base_lr = load_recipe(RECIPE).train.lr
    assert lrs == [base_lr, pytest.approx(0.3 * base_lr)] and len(losses) == 4
    assert final == tmp_path / "ft" / "final" and (final / "model.safetensors").is_file()
    last = tmp_path / "ft" / "stage-2" / "final" / "model.safetensors"
    assert (final / "model.safetensors").read_bytes() == last.read_bytes()
    # each stage read its own file and started from the model before it; stage 2 peaked at its own lr
    for i, model in ((1, start), (2, tmp_path / "ft" / "stage-1" / "final")):
        rec = load_recipe(tmp_path / "ft" / f"stage-{i}" / "recipe.yaml")
        assert Path(rec.model.name) == model and Path(rec.data.sources[0].path) == files[i - 1]
    assert load_recipe(tmp_path / "ft" / "stage-2" / "recipe.yaml").train.lr == pytest.approx(0.3 * base_lr)

    again = fine_tune(start, tmp_path / "ft", files, stages, seed=0, lr=None)
    assert again[0] == final and again[1] == []  # both stages were done: resumed at their last step
