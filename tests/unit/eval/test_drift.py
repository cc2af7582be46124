"""``llmft eval --drift``: KL(base || variant) and the perplexity change on held-out text, for adapters trained here
on one book each, their stacks and the cumulative stacks. Each adapter moves the base on both books and lowers
perplexity on its own book more than on the other, a zero-weight stack does not drift at all, and the KL equals
torch's own KL divergence on the same windows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.cli import main
from llmft.config import load_recipe
from llmft.eval.drift import DEFAULT_TEXTS, held_out_windows, parse_stack, read_text, run_drift
from llmft.train.loop import train

BATCH = {"micro_batch_size": 8, "gradient_accumulation_steps": 1}


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """The first 90% of each shipped book (training text) and the whole books (their last 10% is scored)."""
    d = tmp_path_factory.mktemp("books")
    out = {}
    for path in DEFAULT_TEXTS:
        text = read_text(path)
        name = path.name.split(".")[0]
        (d / f"{name}_train.txt").write_text(text[: int(len(text) * 0.9)][-150_000:])
        out[name] = d / f"{name}_train.txt"
    both = d / "both.txt"
    both.write_text(out["frankenstein"].read_text() + "\n\n" + out["mobydick"].read_text())
    return out, both


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, books):
    """A base trained briefly on both books, and a LoRA adapter on it per book."""
    per_book, both = books
    d = tmp_path_factory.mktemp("drift")
    base_recipe = tiny_recipe(tiny_model, both, d / "base", train={"max_steps": 300, "lr": 3e-3, **BATCH},
                              data={"validation_fraction": 0.0})
    train(load_recipe(write_recipe(d / "base.yaml", base_recipe)))
    base = d / "base" / "final"
    adapters = {}
    for name, path in per_book.items():
        recipe = tiny_recipe(base, path, d / name, train={"max_steps": 150, "lr": 1e-2, **BATCH},
                             method="lora",
                             lora={"rank": 8, "alpha": 16}, data={"validation_fraction": 0.0})
        recipe["model"].pop("rope")  # the base's config already carries the x4 scaling
        train(load_recipe(write_recipe(d / f"{name}.yaml", recipe)))
        adapters[name] = d / name / "final"
    return base, adapters


@pytest.mark.slow
def test_an_adapter_drifts_more_on_its_own_book_and_a_zero_stack_not_at_all(trained, tmp_path, capsys):
    base, adapters = trained
    a, b = str(adapters["frankenstein"]), str(adapters["mobydick"])
    r = run_drift(str(base), [a, b], stacks=[f"{a}:0,{b}:0", f"{a}:0.5,{b}:0.5"], length=64, max_windows=32)
    rows = {row["name"]: row for row in r["rows"]}
    assert r["texts"] == ["frankenstein", "mobydick"] and r["windows"] == {"frankenstein": 32, "mobydick": 32}
    fr, mo = rows["frankenstein"]["per_text"], rows["mobydick"]["per_text"]
    # each adapter moved the base's predictions on both books; its perplexity fell on its own book, by more than
    # 1% and by more than on the other book (which it may even raise)
    assert all(x["kl"] > 1e-3 for row in (fr, mo) for x in row.values())
    assert fr["frankenstein"]["ppl_change"] < min(-0.01, fr["mobydick"]["ppl_change"] - 0.01)
    assert mo["mobydick"]["ppl_change"] < min(-0.01, mo["frankenstein"]["ppl_change"] - 0.01)
    zero = rows[f"stack {a}:0,{b}:0"]["per_text"]
    assert all(abs(x["kl"]) < 1e-6 and abs(x["ppl_change"]) < 1e-6 for x in zero.values())
    cumulative = [row for row in r["rows"] if row["kind"] == "cumulative"]
    assert [row["k"] for row in cumulative] == [1, 2]
    # the first cumulative stack is the first adapter alone; adding the Moby Dick adapter moves Moby Dick further
    assert cumulative[0]["per_text"]["mobydick"]["kl"] == pytest.approx(fr["mobydick"]["kl"], rel=1e-4)
    assert cumulative[1]["per_text"]["mobydick"]["kl"] > cumulative[0]["per_text"]["mobydick"]["kl"]

    # the KL is torch's KL divergence of the two next-token distributions, averaged over positions
    from llmft.model.adapters import merged_model

    base_m = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    model = merged_model(json.loads((adapters["frankenstein"] / "adapter_config.json").read_text())
                         ["base_model_name_or_path"], [(adapters["frankenstein"], 1.0)])
    windows = held_out_windows(tok, read_text(DEFAULT_TEXTS[1]), 64, 32)
    with torch.no_grad():
        lp_b = torch.log_softmax(base_m(input_ids=windows).logits, -1)
        lp_m = torch.log_softmax(model(input_ids=windows).logits, -1)
    ref = torch.nn.functional.kl_div(lp_m, lp_b, log_target=True, reduction="none").sum(-1).mean()
    assert fr["mobydick"]["kl"] == pytest.approx(float(ref), rel=1e-4)

    # the CLI writes the report; a bad stack is one clear error
    out = tmp_path / "drift"
    assert main(["eval", "--drift", str(base), "--model", a, "--model", b, "--drift-length", "64",
                 "--drift-windows", "4", "--out", str(out)]) == 0
    assert "first 2 adapters" in capsys.readouterr().out
    report = json.loads((out / "drift.json").read_text())
    assert [row["kind"] for row in report["rows"]] == ["adapter", "adapter", "cumulative", "cumulative"]
    assert Image.open(out / "drift.png").size[0] > 1000
    assert "| frankenstein | adapter |" in (out / "drift.md").read_text()
    assert main(["eval", "--drift", str(base), "--stack", f"{a}:heavy", "--out", str(out)]) == 2
    assert "is not a weight" in capsys.readouterr().err


def test_stack_specs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert parse_stack(f"{tmp_path / 'a'}:0.7, {tmp_path / 'a'}") == ((str(tmp_path / "a"), 0.7),
                                                                      (str(tmp_path / "a"), 1.0))
    with pytest.raises(ValueError, match="not an llmft adapter"):
        parse_stack(f"{tmp_path}:1")
    with pytest.raises(ValueError, match="expected PATH:WEIGHT"):
        parse_stack(" , ")
