"""Passkey retrieval: the prompt's wording, length and key depth; scoring on a random tiny LLaMA (~0%) and on the
PI repro's shipped base, which retrieves within its 128 positions; the JSON / markdown / PNG report; lengths beyond
the model's positions."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from llmft.eval.passkey import (
    FILLER,
    KEY_LINE,
    QUESTION,
    TASK,
    accuracy_grid,
    extract_answer,
    format_passkey_table,
    passkey_prompt,
    plot_passkey_heatmap,
    run_passkey,
    write_passkey_report,
)
from llmft.repro import SAVED_BASE, saved_base
from llmft.testing.tiny import make_tiny_model

RETRIEVER_LENGTHS = [104, 116, 128]  # within the shipped base's 128 positions (its prompt needs more than 80)
RETRIEVER_FLOOR = 0.7  # it scored 90% when this test was written (70% at 128: 35% with the key at depth 0)
DEPTHS = [0.0, 0.5, 1.0]


def _prompt_words() -> str:
    """Text for a tokenizer that has the prompt's words as whole tokens and no digit merges (digits stay single
    characters: a key is 5 tokens)."""
    return "\n".join([TASK, " ".join(FILLER), KEY_LINE.format(key=""), QUESTION]) * 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: at hidden 128 thread overhead exceeds the work, and on a shared 2-core
    machine two threads per process made decoding 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def passkey_model_dir(tmp_path_factory):
    """A random tiny LLaMA (2 layers, hidden 128, 4 heads) whose tokenizer knows the prompt's words; 256 positions.

    The prompt without filler is 66 tokens with this tokenizer (132 with the book tokenizer of ``tiny_model``).
    """
    return make_tiny_model(tmp_path_factory.mktemp("passkey") / "model", seed=0, text=_prompt_words(),
                           vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=64,
                           max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer(passkey_model_dir):
    return AutoTokenizer.from_pretrained(passkey_model_dir)


@pytest.fixture(scope="module")
def random_model(passkey_model_dir):
    return LlamaForCausalLM.from_pretrained(passkey_model_dir).eval()


@pytest.fixture(scope="module")
def retriever():
    """The PI repro's shipped base: a 4-layer LLaMA pre-trained at 128 tokens with passkeys and copies in its mix
    (docs/results/pi_tiny.md), in bf16, evaluated in fp32."""
    base = saved_base(SAVED_BASE)
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(base)


# ---------------------------------------------------------------------------------------------------- the prompt


@pytest.mark.parametrize("which", ["prompt_words", "book"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_wording_length_and_depth(which, depth, tokenizer, tiny_model):
    tok = tokenizer if which == "prompt_words" else AutoTokenizer.from_pretrained(tiny_model)
    longest_sentence = max(len(tok(" " + s, add_special_tokens=False).input_ids) for s in FILLER)
    for length in [200, 333, 1000]:
        p = passkey_prompt(tok, length, depth, key=40527)
        key_line = KEY_LINE.format(key=40527)
        assert key_line == "The pass key is 40527. Remember it. 40527 is the pass key."
        assert p.text.startswith(TASK + "\n") and p.text.endswith("\n" + QUESTION)
        assert p.text.count("40527") == 2 and p.text.count(key_line) == 1
        assert QUESTION == "What is the pass key? The pass key is"
        # as long as possible without exceeding the target: one more sentence would not fit
        assert p.n_tokens == len(tok(p.text).input_ids) <= length
        assert length - p.n_tokens <= longest_sentence + 1, (length, p.n_tokens)
        # the key line sits after round(depth * n) whole filler sentences, within one sentence of the request
        before, after = p.text.split(key_line)
        n_before = sum(before.count(s) for s in FILLER)
        assert n_before + sum(after.count(s) for s in FILLER) == p.filler_sentences > 0
        assert n_before == p.prefix_sentences and abs(n_before - depth * p.filler_sentences) <= 1
        if depth == 0.0:
            assert before == TASK + "\n"
        if depth == 1.0:
            assert after == "\n" + QUESTION
        # in tokens too: the filler tokens before the key line are depth x all filler tokens, +- one sentence
        assert p.key_token_index is not None and tok.decode(p.input_ids[p.key_token_index:]).startswith(key_line)
        bare = tok("\n".join([TASK, key_line, QUESTION]))
        filler_tokens = p.n_tokens - len(bare.input_ids)
        filler_before = p.key_token_index - bare.char_to_token(len(TASK) + 1)
        assert abs(filler_before - depth * filler_tokens) <= longest_sentence + 1


def test_prompt_key_from_rng_and_errors(tokenizer):
    keys = [passkey_prompt(tokenizer, 100, 0.5, rng=np.random.default_rng(7)).key for _ in range(2)]
    assert keys[0] == keys[1] and 10000 <= keys[0] <= 99999
    bare = passkey_prompt(tokenizer, 66, 0.5, key=12345)  # no room for filler
    assert bare.filler_sentences == 0 and bare.text == "\n".join([TASK, KEY_LINE.format(key=12345), QUESTION])
    with pytest.raises(ValueError, match="already has 66 tokens"):
        passkey_prompt(tokenizer, 65, 0.5, key=12345)
    with pytest.raises(ValueError, match=r"expected a fraction in \[0, 1\]"):
        passkey_prompt(tokenizer, 100, 1.5, key=12345)


def test_extract_answer():
    assert extract_answer(" 12345.") == "12345"
    assert extract_answer(" 1234567") == "12345"  # budget outlasting the key: the first 5 digits count
    assert extract_answer(" 12.345") == "12"
    assert extract_answer(" the key") is None


# ---------------------------------------------------------------------------------------------------- scoring


def test_random_model_scores_about_zero(random_model, tokenizer):
    r = run_passkey(random_model, tokenizer, [80, 160], DEPTHS, trials=10, seed=0, batch_size=10)
    assert r["accuracy"] is not None and r["accuracy"] <= 0.1
    assert len(r["records"]) == 60 and len(r["cells"]) == 6
    keys = [rec["key"] for rec in r["records"]]
    assert all(10000 <= k <= 99999 for k in keys) and len(set(keys)) > 50
    again = run_passkey(random_model, tokenizer, [80], DEPTHS, trials=10, seed=0, progress=False)  # batch 1
    assert [rec["key"] for rec in again["records"]] == keys[:30]  # the same seed draws the same keys
    assert [rec["continuation"] for rec in again["records"]] == [rec["continuation"] for rec in r["records"][:30]]


def test_a_model_that_retrieves_scores_high(retriever, tmp_path):
    """The scorer on a model that can retrieve: the shipped base within its 128 positions, 20 keys per (length,
    depth) cell; RETRIEVER_FLOOR is below what it scored when this test was written."""
    model, tok = retriever
    r = run_passkey(model, tok, RETRIEVER_LENGTHS, DEPTHS, trials=20, seed=123, batch_size=20, progress=False)
    print(format_passkey_table(r))
    assert r["accuracy"] >= RETRIEVER_FLOOR, format_passkey_table(r)
    for rec in r["records"]:
        assert rec["correct"] == (rec["answer"] == str(rec["key"]))
    assert len({rec["answer"] for rec in r["records"]}) >= 0.8 * len(r["records"])  # it copies, not guesses one key
    # by the key's first token: this tokenizer starts keys 1xxxx and 2xxxx with " 1" and " 2", the rest with " "
    expected: dict[str, list[float]] = {}
    for rec in r["records"]:
        cell = expected.setdefault(f" {rec['key'] // 10000}" if rec["key"] < 30000 else " ", [0.0, 0])
        cell[0], cell[1] = cell[0] + rec["correct"], cell[1] + 1
    assert {t: [c["correct"], c["n"]] for t, c in r["by_first_token"].items()} == expected
    paths = write_passkey_report(r, tmp_path)
    md = paths["md"].read_text()
    assert "| 128 |" in md and "By the key's first token" in md
    assert all(f"| `{t!r}` | {c:g} | {n} |" in md for t, (c, n) in expected.items())


# ---------------------------------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def results_with_gap(random_model, tokenizer):
    """A 3 x 4 grid on the random model: 512 > max_position_embeddings (256) and 40 (< the 66-token prompt) are
    reported, not run."""
    return run_passkey(random_model, tokenizer, [40, 128, 512], [0.0, 0.25, 0.75, 1.0], trials=3, seed=1,
                       model_name="tiny-random", batch_size=3)


def test_length_beyond_max_positions_is_reported_not_run(results_with_gap, random_model, tokenizer):
    by_length = {}
    for c in results_with_gap["cells"]:
        by_length.setdefault(c["length"], []).append(c)
    assert all(c["accuracy"] is None and "max_position_embeddings 256" in c["reason"] for c in by_length[512])
    assert all(c["accuracy"] is None and "already has 66 tokens" in c["reason"] for c in by_length[40])
    assert all(c["accuracy"] is not None and c["reason"] is None and c["trials"] == 3 for c in by_length[128])
    assert {rec["length"] for rec in results_with_gap["records"]} == {128}
    assert results_with_gap["accuracy"] is not None
    # the caller may allow it: RoPE runs past max_position_embeddings
    allowed = run_passkey(random_model, tokenizer, [300], [0.5], trials=2, seed=1, allow_beyond_max_positions=True,
                          progress=False)
    assert allowed["cells"][0]["reason"] is None and allowed["cells"][0]["trials"] == 2
    assert 290 <= allowed["cells"][0]["mean_tokens"] <= 300
    nothing = run_passkey(random_model, tokenizer, [512], [0.5], trials=2, progress=False)
    assert nothing["accuracy"] is None and nothing["records"] == []


def test_table_grid_json_and_heatmap(results_with_gap, tmp_path):
    r = results_with_gap
    grid = accuracy_grid(r)
    assert grid.shape == (3, 4) and np.isnan(grid[0]).all() and np.isnan(grid[2]).all()
    assert not np.isnan(grid[1]).any()

    table = format_passkey_table(r).splitlines()
    assert table[0] == "| length \\ depth | 0% | 25% | 75% | 100% | mean |"
    assert len(table) == 2 + 3
    assert [row.split("|")[1].strip() for row in table[2:]] == ["40", "128", "512"]
    assert all(len(row.strip("|").split("|")) == 6 for row in table)
    assert table[2].count("n/a") == 5 and "n/a" not in table[3]
    assert all(re.fullmatch(r"\d+%", cell.strip()) for cell in table[3].strip("|").split("|")[1:])

    paths = write_passkey_report(r, tmp_path / "report")
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"passkey.json", "passkey.md", "passkey.png"}
    assert json.loads(paths["json"].read_text()) == r  # round-trips: plain JSON types only
    md = paths["md"].read_text()
    assert "# Passkey retrieval: tiny-random" in md and "\n".join(table) in md
    assert "length 512: length 512 > max_position_embeddings 256" in md

    png = paths["png"]
    assert png.stat().st_size > 5_000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 600)
        colours = len(set(im.convert("RGB").getdata()))
    assert colours > 50  # cells, text, colourbar: not a blank canvas
    small = plot_passkey_heatmap(r, tmp_path / "small.png", figsize=(4, 3), dpi=50)
    with Image.open(small) as im:
        assert im.size == (200, 150)
