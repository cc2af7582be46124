"""``llmft report RUN_DIR``: learning curves and the fit diagnosis, on real tiny training runs that overfit (a
1.4K-token book slice, high lr, many epochs) and underfit (a few low-lr steps), plus the rule edges."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_recipe, write_recipe
from PIL import Image

from llmft.cli import main
from llmft.config import load_recipe
from llmft.eval.curves import Curves, diagnose
from llmft.train.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, book_text):
    tmp = tmp_path_factory.mktemp("fit")
    (tmp / "small.txt").write_text(book_text[:3000])
    for name, steps, lr, every in (("over", 56, 1e-2, 8), ("under", 12, 3e-4, 3)):
        recipe = tiny_recipe(tiny_model, tmp / "small.txt", tmp / name,
                             train={"max_steps": steps, "lr": lr, "warmup_steps": 2, "schedule": "constant"},
                             eval={"every_steps": every, "lengths": [128], "max_windows": 4},
                             data={"validation_fraction": 0.2}, logging={"every_steps": 1})
        train(load_recipe(write_recipe(tmp / f"{name}.yaml", recipe)), resume=False)
    return tmp


def test_overfitting_run_is_diagnosed_with_its_best_step(runs, capsys):
    assert main(["report", str(runs / "over")]) == 0
    out = capsys.readouterr().out
    assert ": overfitting" in out and "stop near step" in out and "while the training loss fell" in out
    evals = [json.loads(line) for line in (runs / "over" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["eval/ppl@128"]) for r in evals if "eval/ppl@128" in r]
    best = min(val, key=lambda sv: sv[1])[0]
    assert f"stop near step {best} " in out and val[-1][1] > 1.2 * min(v for _, v in val)
    img = Image.open(runs / "over" / "report" / "learning_curves.png")
    assert img.size[0] >= 700 and (runs / "over" / "report" / "learning_curves.png").stat().st_size > 15_000
    assert "# over: overfitting" in (runs / "over" / "report" / "report.md").read_text()


def test_underfitting_run_is_diagnosed(runs, capsys):
    assert main(["report", str(runs / "under")]) == 0
    out = capsys.readouterr().out
    assert ": underfitting" in out and "train longer" in out


def test_rule_edges_and_errors(tmp_path, capsys):
    train_curve = [(s, 3.0 - 0.01 * s) for s in range(1, 41)]
    flat = Curves(train_curve, [(10, 2.40), (20, 2.395), (30, 2.392), (40, 2.39)], 128)
    assert diagnose(flat)["verdict"] == "well fit"
    assert diagnose(flat, tol=0.001)["verdict"] == "underfitting"  # a stricter tolerance sees it still falling
    few = Curves(train_curve, [(10, 2.5), (20, 2.4)], 128)
    assert diagnose(few)["verdict"] == "not enough evaluations"
    # validation up but the training loss up too: not overfitting (both got worse: e.g. a too-high lr)
    rising = Curves([(s, 2.0 + 0.01 * s) for s in range(1, 41)], [(10, 2.4), (20, 2.3), (30, 2.5), (40, 2.6)], 128)
    assert diagnose(rising)["verdict"] != "overfitting"
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
