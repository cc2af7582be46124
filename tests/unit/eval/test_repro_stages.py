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
