"""`llmft repro pi`'s fine-tunes in stages (llmft.repro.fine_tune): each stage sets its method's RoPE scaling anew
over C (not composed with the previous stage's), starts from the previous stage's weights and trains its own steps
at its own length; the last stage's model is the method's final."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from llmft.cli import main
from llmft.repro import SAVED_BASE, Stage, fine_tune, saved_base

C = 128
STAGES = (Stage(2, 256, 2), Stage(8, 512, 1))
# (rope type, factor, max_position_embeddings) of each stage's model, per method
EXPECTED = {
    "ft_linear": [("linear", 2.0, 256), ("linear", 8.0, 1024)],
    "ft_dynamic": [("dynamic", 2.0, C), ("dynamic", 8.0, C)],  # transformers' dynamic NTK keeps the original length
    "ft_none": [("default", None, 1024), ("default", None, 1024)],
}


@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_each_stage_scales_over_C_from_the_previous_stages_weights(recipe, tmp_path, book_text):
    books = tmp_path / "books"
    books.mkdir()
    (books / "book.txt").write_text(book_text[:40_000])  # ample for 3 rows of 256 and 512 tokens
    out = tmp_path / "run"
    final = fine_tune(recipe, out, 0, books, [], saved_base(SAVED_BASE), STAGES, C, fresh=True)
    assert final == out / recipe / "final"

    for i, (stage, (kind, factor, positions)) in enumerate(zip(STAGES, EXPECTED[recipe], strict=True), 1):
        run = out / recipe / f"stage-{i}"
        cfg = json.loads((run / "final" / "config.json").read_text())
        rope = cfg["rope_parameters"]
        assert (rope["rope_type"], rope.get("factor"), cfg["max_position_embeddings"]) == (kind, factor, positions)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert rows[-1]["step"] == stage.steps  # the stage's own steps (logged at the last), from step 1
        assert rows[-1]["tokens_seen"] == stage.steps * stage.length  # micro-batch 1, rows of the stage's length
        started = yaml.safe_load((run / "recipe.yaml").read_text())["model"]["name"]
        if i == 1:
            assert started.endswith("repro-base")
        else:  # the previous stage's weights, its scaling removed from the config
            start = out / recipe / f"stage-{i}-start"
            assert started == str(start)
            assert os.path.samefile(start / "model.safetensors", out / recipe / f"stage-{i - 1}" / "final" /
                                    "model.safetensors")
            cfg = json.loads((start / "config.json").read_text())
            assert cfg["rope_parameters"]["rope_type"] == "default" and cfg["max_position_embeddings"] == C
    assert os.path.samefile(final / "model.safetensors", out / recipe / f"stage-{len(STAGES)}" / "final" /
                            "model.safetensors")


def test_pretrain_and_fast_together_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["repro", "pi", "--fast", "--pretrain"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_every_method_trains_with_the_same_settings_but_its_rope():
    """The report says each fine-tune gets the same steps, data, learning rate, precision and seed: the shipped
    recipes of the methods differ only in their RoPE scaling (or, without one, the positions they declare) and their
    checkpoint directory."""
    from llmft.config import load_recipe
    from llmft.config.loading import shipped_path
    from llmft.repro import METHODS, RECIPES

    dumps = {}
    for _, _, recipe, _ in METHODS:
        if recipe is not None:
            rec = load_recipe(shipped_path(f"{RECIPES}/{recipe}.yaml"), ["model.name=base"]).model_dump()
            rec["model"].pop("rope")
            rec["model"].pop("max_position_embeddings")
            rec["checkpoint"].pop("dir")
            dumps[recipe] = rec
    assert len(dumps) == 4 and all(d == dumps["ft_linear"] for d in dumps.values())
    assert dumps["ft_linear"]["train"]["precision"] == "bf16"


def test_the_schedule_is_worded_once_for_the_log_and_the_report():
    from dataclasses import asdict

    from llmft.repro import schedule
    from llmft.repro_report import stages_text

    stages = (Stage(2, 256, 2400), Stage(8, 512, 1200))
    words = "2,400 steps at 256 tokens (x2), then 1,200 steps at 512 tokens (x8); 1.23M tokens"
    assert schedule(stages) == words
    assert schedule(stages, scaled=False) == "2,400 steps at 256 tokens, then 1,200 steps at 512 tokens; 1.23M tokens"
    results = {"settings": {"stages": [asdict(s) for s in stages]}}
    assert stages_text(results) == f"in 2 stages, {words} ((d) trains at the same lengths without scaling)"
    assert stages_text({"settings": {"stages": [asdict(Stage(8, 1024, 200))]}}) == "200 steps at 1024 tokens"
