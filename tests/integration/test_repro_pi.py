"""`llmft repro pi --fast`: the whole Position Interpolation experiment, small, as an integration test of the
recipes, data reader, training loop, RoPE scaling and both evaluations (docs/results/pi_tiny.md is the full run)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from llmft.cli import main
from llmft.config import RecipeError
from llmft.eval.passkey import KEY_HIGH, KEY_LOW
from llmft.repro import (
    FAST,
    METHODS,
    PASSKEY_DEPTHS,
    PASSKEY_EVAL_SEED,
    POSITION_ROWS,
    SAVED_BASE,
    methods,
    prepare_books,
    saved_base,
)
from llmft.repro_report import write_outputs


@pytest.mark.slow
def test_repro_pi_fast_reproduces_the_ordering_and_writes_the_report(tmp_path):
    out, doc = tmp_path / "repro", tmp_path / "docs" / "pi_tiny.md"
    assert main(["repro", "pi", "--fast", "--fresh", "--out", str(out), "--doc", str(doc)]) == 0
    results = json.loads((out / "results.json").read_text())
    lengths = results["lengths"]
    assert lengths == [128, 256, 512, 1024] and results["scale"] == "fast" and results["seed"] == 0
    assert results["machine_gflops"] > 1  # the yardstick that makes its minutes comparable across machines
    ppl, run = results["ppl"], {m[0] for m in methods(FAST)}
    # --fast fine-tunes the two rows its checks need, (c) and YaRN, and evaluates every untrained row
    assert set(ppl) == run == {m[0] for m in METHODS} - {"ft_none", "ft_dynamic"}
    for row in ppl.values():
        for n in lengths:
            r = row[str(n)]
            assert math.isfinite(r["ppl_per_byte"]) and r["ppl_per_byte"] > 1 and r["tokens"] > 0
            # the metric is what it says: exp(NLL / bytes)
            assert r["ppl_per_byte"] == pytest.approx(math.exp(r["nll"] / r["bytes"]), rel=1e-9)

    # the CI assertion: PI + fine-tuning beats the base extrapolating at 8C
    L = str(lengths[-1])
    assert ppl["ft_linear"][L]["ppl_per_byte"] < ppl["base"][L]["ppl_per_byte"]
    ci = [c for c in results["checks"] if c["claim"].startswith("CI check")]
    assert len(ci) == 1 and ci[0]["holds"] is True

    # scaling without training changes the numbers; each fine-tune produced its own model
    assert ppl["pi"][L]["nll"] != ppl["base"][L]["nll"] and ppl["yarn"][L]["nll"] != ppl["pi"][L]["nll"]
    assert ppl["ft_linear"][L]["nll"] != ppl["ft_yarn"][L]["nll"]
    for name in ("ft_linear", "ft_yarn"):
        assert (out / name / "final" / "model.safetensors").is_file()
    assert not (out / "ft_none").exists() and not (out / "ft_dynamic").exists()
    # the two fine-tunes ran side by side, a core each, their output in their own logs
    t, threads = results["timings_s"], torch.get_num_threads()
    assert results["fine_tuning"] == {"precision": "bf16", "processes": min(2, threads),
                                      "threads_each": max(1, threads // 2)}
    if threads >= 2:
        assert t["fine_tunes"] < 0.75 * (t["ft_linear"] + t["ft_yarn"])  # one after the other: >= 1x
        for name in ("ft_linear", "ft_yarn"):
            log = (out / "logs" / f"{name}.log").read_text()
            assert f"{name} stage 1/1: 200 steps at 1024 tokens (x8)" in log and "step 200/200" in log
    # --fast starts from the shipped base of a full run instead of pre-training one
    assert results["settings"]["base"] == SAVED_BASE and not (out / "base").exists()
    assert results["base_source"].startswith("Made by the pre-training of `llmft repro pi")

    # the retrieval gap: the base retrieves within C, no further; a fine-tune retrieves at 8C
    claims = {c["claim"].split(":")[0]: c["holds"] for c in results["checks"]}
    assert claims["the base retrieves within C (passkey at 128 >= 80%)"] is True
    assert claims["(a) the base extrapolating retrieves <= 20% beyond C"] is True
    assert claims["the retrieval gap"] is True
    cfg = json.loads((out / "ft_linear" / "final" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 8.0
    assert cfg["max_position_embeddings"] == 1024

    # passkey: every row scored on the whole grid, beyond the base's 128 positions too
    assert set(results["passkey"]) == run
    for pk in results["passkey"].values():
        assert 0.0 <= pk["accuracy"] <= 1.0 and all(c["accuracy"] is not None for c in pk["cells"])
        assert len(pk["cells"]) == len(lengths) * len(PASSKEY_DEPTHS)

    s_niah = results["settings"]["niah_samples"]
    # RULER's needle: every row scored where its prompt fits (this tokenizer needs more than 2C for it)
    assert set(results["niah"]) == run
    for nh in results["niah"].values():
        assert nh["task"] == "niah_single_1" and nh["samples"] == s_niah
        assert all(0.0 <= nh["scores"][str(n)] <= 100.0 for n in lengths[2:])
        assert all(nh["scores"][str(n)] is None and "cannot hold" in nh["skipped"][str(n)] for n in lengths[:2])
        assert len(nh["preds"]) == 2 * s_niah and all(len(p["outputs"]) == 1 for p in nh["preds"])

    # the mix: as many documents as the settings say, passkeys disjoint from every key the evaluation drew
    s, mix = results["settings"], out / "mix"
    counts = {name: len((mix / f"{name}.jsonl").read_text().splitlines())
              for name in ("ft_retrieval", "ft_copies")}
    assert counts == {k: s[k] for k in counts} and not list(mix.glob("base_*"))
    train_keys = set()
    for name in ("ft_retrieval",):
        for line in (mix / f"{name}.jsonl").read_text().splitlines():
            train_keys |= set(re.findall(r"The pass key is (\d+)\.", json.loads(line)["text"]))
    assert len(train_keys) > s["ft_retrieval"] // 4  # a third of them are passkeys
    grid = (len(lengths), len(PASSKEY_DEPTHS), s["passkey_trials"])  # as run_passkey draws them
    rng = np.random.default_rng(PASSKEY_EVAL_SEED)
    eval_keys = {str(k) for k in rng.integers(KEY_LOW, KEY_HIGH + 1, size=grid).flat}
    assert not train_keys & eval_keys

    # the report: table rows per method, the checks, the command, and the plots
    for md in (out / "pi_tiny.md", doc):
        text = md.read_text()
        assert all((f"| {label} |" in text) == (key in run) for key, label, _, _ in METHODS)  # the tables' rows
        assert "This fast run leaves out (d) no interpolation + N steps up to 8C and (e) dynamic NTK" in text
        assert "llmft repro pi --fresh --fast --seed 0" in text and "CI check: (c) < (a) at 8C" in text
        assert "in bf16 autocast (fp32 master weights)" in text
        assert "At 8C on larger samples" not in text  # --fast scores only the grid
        assert (", 2 at a time side by side with 1 thread(s) each" in text) == (threads == 2)
        assert f"(fp32 matmul peak {results['machine_gflops']:.0f} GFLOP/s)" in text
        assert "## RULER niah_single_1 and effective length" in text and "| effective length |" in text
        assert f"not by this run: the saved base `{SAVED_BASE}`" in text and "no pre-training (a saved base)" in text
    pos = results["nll_by_position"]
    assert set(pos["rows"]) == set(POSITION_ROWS) & run and pos["length"] == 1024
    assert all(len(row) == math.ceil(1023 / pos["bucket"]) for row in pos["rows"].values())
    # the windows of the table and of the diagnosis are the same: the mean over positions is the table's NLL
    base = ppl["base"][L]
    mean_nll = sum(v * min(pos["bucket"], 1023 - i * pos["bucket"]) for i, v in enumerate(pos["rows"]["base"])) / 1023
    assert mean_nll == pytest.approx(base["nll"] / base["tokens"], rel=1e-5)
    for png in (out / "pi_tiny_ppl.png", out / "pi_tiny_passkey.png", out / "pi_tiny_positions.png",
                doc.with_name("pi_tiny_ppl.png")):
        assert Image.open(png).size[0] > 400

    # text a person appended under the marker survives a regeneration of the doc
    doc.write_text(doc.read_text() + "\nDiscussion by hand.\n")
    write_outputs(results, out, doc)
    assert doc.read_text().count("Discussion by hand.") == 1 and doc.read_text().count("# Position Interpolation") == 1


def test_books_are_split_or_taken_as_a_pg19_layout(tmp_path):
    # a flat directory of books: each split at the first paragraph break after 90% of its characters
    flat = tmp_path / "flat"
    flat.mkdir()
    texts = {"11": "\n\n".join(f"Paragraph {i} of book eleven." for i in range(100)),
             "22": "\n\n".join(f"Chapter {i}, book twenty-two." for i in range(50))}
    for name, text in texts.items():
        (flat / f"{name}.txt").write_text(text)
    train, test, how = prepare_books(tmp_path / "out", flat)
    assert "2 books" in how
    for name, text in texts.items():
        head, tail = (train / f"{name}.txt").read_text(), (test / f"{name}.txt").read_text()
        assert head + tail == text and head.endswith("\n\n") and tail.startswith(("Paragraph", "Chapter"))
        assert 0.88 <= len(head) / len(text) <= 0.93
    # a PG-19 layout is used as it is: whole held-out books
    pg19 = tmp_path / "pg19"
    for split in ("train", "test"):
        (pg19 / split).mkdir(parents=True)
        (pg19 / split / "1.txt").write_text(f"a {split} book")
    assert prepare_books(tmp_path / "out2", pg19)[:2] == (pg19 / "train", pg19 / "test")
    assert not (tmp_path / "out2" / "books").exists()
    (tmp_path / "flat" / "nothing-here").mkdir()
    with pytest.raises(RecipeError, match="no .txt books"):
        prepare_books(tmp_path / "out3", tmp_path / "flat" / "nothing-here")


def test_the_shipped_base_is_a_bf16_model_at_C_with_its_tokenizer_and_provenance(tmp_path):
    base = saved_base(SAVED_BASE)  # the installed copy when run outside the repository
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 128 and cfg["dtype"] == "bfloat16"
    assert (base / "tokenizer.json").is_file() or (base / "tokenizer.model").is_file()
    assert "llmft repro pi" in (base / "SOURCE.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"no model there \(config.json\).*--save-base"):
        saved_base(str(tmp_path / "empty"))
