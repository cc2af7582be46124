"""The ``perplexity`` document filter (llmft/data/filters.py): token perplexity under a small causal LM.

A tiny LLaMA (hidden 64, 2 layers) is trained for 80 steps on the bundled Frankenstein, once per module. It then
scores held-out English (Moby Dick paragraphs from the shared Gutenberg data) against the same paragraphs with
their characters shuffled and against random token strings: the filter must remove exactly the gibberish, with
scores equal to a one-document-at-a-time computation, through apply_filters and through the real build.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.config import RecipeError
from llmft.config.data import TextFilter, load_mix
from llmft.data.build import build
from llmft.data.filters import apply_filters, perplexities
from llmft.data.sources import DataError
from llmft.testing.tiny import BOOK, make_tiny_model, read_text

THRESHOLD = 175.0  # after 80 steps: English ~90-150, shuffled characters ~200-330, random tokens > 10_000


@contextmanager
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two contending threads make the tiny model ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scoring_lm(tmp_path_factory) -> Path:
    """A tiny LLaMA trained 80 steps (64 x 32 tokens each) on Frankenstein; safetensors, max 128 positions."""
    text = read_text(BOOK)[:200_000]
    out = make_tiny_model(tmp_path_factory.mktemp("ppl") / "lm", text=text[:60_000], vocab_size=512,
                          hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                          max_position_embeddings=128)
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor(tok(text)["input_ids"])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(80):
            starts = torch.randint(0, len(ids) - 32, (64,), generator=g)
            x = torch.stack([ids[s : s + 32] for s in starts])  # (64, 32)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out)  # safetensors
    return out


@pytest.fixture(scope="module")
def corpus(shared_data) -> tuple[list[str], np.ndarray]:
    """(texts, (n,) bool gibberish): 12 English paragraphs, 6 of them character-shuffled, 6 random token strings."""
    path = shared_data / "gutenberg" / "2701.txt"
    book = path.read_text(encoding="utf-8-sig")
    paras = [p for p in (" ".join(x.split()) for x in book.split("\n\n")) if len(p.split()) > 60][50:62]
    rng = random.Random(0)
    shuffled = ["".join(rng.sample(p, len(p))) for p in paras[:6]]
    tok = AutoTokenizer.from_pretrained(REPO / "llmft" / "assets" / "tiny-llama")  # another vocabulary
    noise = [tok.decode(np.random.default_rng(i).integers(4, len(tok), 150).tolist()) for i in range(6)]
    texts, gibberish = [], []
    for k in range(12):  # interleaved
        texts.append(paras[k]), gibberish.append(False)
        if k < 6:
            texts.append(shuffled[k] if k % 2 else noise[k]), gibberish.append(True)
            texts.append(noise[k] if k % 2 else shuffled[k]), gibberish.append(True)
    return texts, np.array(gibberish)


def reference_perplexity(model_dir: Path, text: str, max_tokens: int) -> float:
    """One text, no padding or batching: exp of the model's own mean next-token loss."""
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([tok(text)["input_ids"][:max_tokens]])  # (1, s)
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids).loss))


def test_perplexity_filter_removes_gibberish_and_keeps_english(scoring_lm, corpus):
    texts, gibberish = corpus
    f = TextFilter(kind="perplexity", model=str(scoring_lm), threshold=THRESHOLD, batch_size=5, examples=3)
    with one_thread():
        res = apply_filters(texts, "a", [f], where=[f"doc{i}" for i in range(len(texts))])
        scores = perplexities(texts, str(scoring_lm), max_tokens=512, batch_size=5)
    assert np.array_equal(~res.keep, gibberish)
    rep = res.report["perplexity"]
    assert rep["documents"] == 24 and rep["removed"] == rep["removed_only_here"] == 12
    assert rep["words_removed"] == sum(len(t.split()) for t, g in zip(texts, gibberish) if g)
    assert [e["where"] for e in rep["examples"]] == [f"doc{i}" for i in np.flatnonzero(gibberish)[:3]]
    assert all(e["score"] > THRESHOLD for e in rep["examples"])
    assert np.median(scores[~gibberish]) * 1.5 < THRESHOLD < scores[gibberish].min()

    # batched and right-padded (sorted by length), truncated at the model's 128 positions: equal to one at a time
    for i in (0, 1, 2, 5):
        assert scores[i] == pytest.approx(reference_perplexity(scoring_lm, texts[i], 128), rel=1e-5)
    assert perplexities(["", "x"], str(scoring_lm)).tolist() == [1.0, 1.0]  # nothing to predict

    # recall mode: English with a gibberish tail; the document's first 128 tokens are clean, a window is not
    long = " ".join(texts[0].split() * 3) + " " + texts[1]
    doc_mode, rec_mode = f.model_copy(update={"max_tokens": 128}), f.model_copy(update={"mode": "recall",
                                                                                       "window_words": 40})
    with one_thread():
        assert apply_filters([long], "a", [doc_mode]).keep.tolist() == [True]
        assert apply_filters([long], "a", [rec_mode]).keep.tolist() == [False]


def test_perplexity_filter_in_a_build_reports_what_it_removed(tmp_path, scoring_lm, corpus):
    texts, gibberish = corpus
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    mix = {"tokenizer": str(REPO / "llmft" / "assets" / "tiny-llama"), "seq_len": 256, "seed": 0,
           "filters": [{"kind": "perplexity", "name": "ppl", "model": str(scoring_lm), "threshold": THRESHOLD,
                        "max_tokens": 256}],
           "sources": [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}]}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    tok = AutoTokenizer.from_pretrained(REPO / "llmft" / "assets" / "tiny-llama")
    with one_thread():
        st = build(load_mix(path), tmp_path / "out", tok, 256).stats
    f = st["filters"]["by_filter"]["ppl"]
    assert f["removed"] == st["sources"]["a"]["filtered"] == int(gibberish.sum())
    assert f["settings"] == {"kind": "perplexity", "name": "ppl", "model": str(scoring_lm), "threshold": THRESHOLD,
                             "max_tokens": 256}
    assert st["filters"]["by_source"]["a"] == {"documents": 24, "removed": 12, "kept": 12}
    md = (tmp_path / "out" / "filters.md").read_text()
    assert "## ppl" in md and "| a | 24 | 12 (" in md
    kept = [t for t, g in zip(texts, gibberish) if not g]  # BOS + text + EOS each
    assert st["sources"]["a"]["available_tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 2
                                                         for t in kept)

    # a model that cannot be loaded: a DataError naming it
    missing = str(tmp_path / "no-model")
    with pytest.raises(DataError, match="filters perplexity model .*no-model.*: cannot load it"):
        build(load_mix(path, [f"filters.0.model={missing}"]), tmp_path / "out2", tok, 256)


def test_perplexity_filter_settings_are_validated_with_the_yaml_path(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    src = [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}]
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"sources": src, "filters": [
        {"kind": "perplexity", "modle": "m", "threshold": 100},
        {"kind": "perplexity", "model": "m", "max_tokens": 1, "batch_size": 0, "threshold": 100},
    ]}))
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    msgs = "\n".join(info.value.messages)
    assert "filters.0.modle: unknown key. Fix: remove it" in msgs
    assert "filters.1.max_tokens: got 1; expected a number greater than or equal to 2" in msgs
    assert "filters.1.batch_size: got 0" in msgs
    path.write_text(yaml.safe_dump({"sources": src, "filters": [
        {"kind": "perplexity"},
        {"kind": "perplexity", "name": "p1", "model": "m", "threshold": 1},
        {"kind": "keywords", "words": ["x"], "model": "m", "batch_size": 4},
    ]}))
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    msgs = "\n".join(info.value.messages)
    assert "filters.0.model: a perplexity filter needs model" in msgs
    assert "filters.0.threshold: a perplexity filter needs threshold" in msgs
    assert "filters.1.threshold: got 1; expected a perplexity > 1" in msgs
    assert "filters.2.model: model is a setting of kind perplexity, not keywords; remove it" in msgs
    assert "filters.2.batch_size: batch_size is a setting of kind perplexity, not keywords" in msgs
