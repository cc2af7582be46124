"""UL2 denoising (reconstructs exactly, real-vocabulary sentinels, rates as configured) and NI few-shot packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import REPO
from transformers import AutoTokenizer

from llmft.config.data import UL2Config, load_mix
from llmft.config.sources import SourceSpec
from llmft.data.build import build
from llmft.data.sources import Document, read_source
from llmft.data.transforms import ni_fewshot, ul2, ul2_reconstruct


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(REPO / "llmft/assets/tiny-llama")


def test_ul2_examples_reconstruct_the_text_exactly(book_text):
    cfg, rng = UL2Config(), np.random.default_rng(0)
    kinds = set()
    for i in range(300):
        text = book_text[i * 150 : i * 150 + int(rng.integers(20, 900))]
        d = ul2(Document(text=text, where="x"), rng, cfg)
        kinds.add(d.meta["ul2"][0])
        assert ul2_reconstruct(d, cfg) == text
        assert d.prompt.split(" ")[0] in {"[NLU]", "[S2S]", "[NLG]"}
    assert kinds == {"R", "S", "X"}


def test_ul2_corruption_rate_and_span_length(book_text):
    from llmft.config.data import Denoiser

    cfg = UL2Config(denoisers=[Denoiser(kind="R", mean_span=3, rate=0.15)])
    text = " ".join(book_text.split()[:2000])
    d = ul2(Document(text=text, where="x"), np.random.default_rng(1), cfg)
    spans = [s.split() for s in d.text.split("<extra_id_")[1:]]
    corrupted = sum(len(s) - 1 for s in spans)  # minus the "N>" remainder of the sentinel
    assert corrupted == round(2000 * 0.15)
    assert len(spans) == round(2000 * 0.15 / 3)


def test_ul2_sentinels_are_real_vocabulary_tokens(tok, book_text):
    d = ul2(Document(text=book_text[:3000], where="x"), np.random.default_rng(2), UL2Config())
    for part in (d.prompt, d.text):
        ids = tok(part, add_special_tokens=False)["input_ids"]
        assert max(ids) < len(tok) and tok.unk_token_id not in ids
        assert tok.decode(ids) == part  # decodable, byte for byte


def test_ni_fewshot_packs_many_instances_per_sequence(tok, shared_data):
    docs = list(read_source(SourceSpec(format="natural_instructions", path=shared_data / "natural_instructions")))
    examples = ni_fewshot(docs, tok, seq_len=512)
    assert all(len(e) <= 512 for e in examples) and len(examples) < len(docs) / 3
    answers = [d.text for d in docs]
    trained = "".join(tok.decode(e.tokens[e.loss_mask]) for e in examples)
    assert trained.count(tok.eos_token) == len(examples)  # each sequence ends with a trained EOS
    assert trained.replace(tok.eos_token, "") == "".join(a + "\n\n" for a in answers)  # every answer, once
    head = docs[0].meta["ni_head"]
    for e in examples:  # one header per sequence, then Input/Output pairs
        text = tok.decode(e.tokens[~e.loss_mask])
        assert text.count("Definition:") == 1 and text.startswith(tok.bos_token + head[:40])


def test_mix_with_transforms_builds(tmp_path, tok, book_text, shared_data):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": book_text[i : i + 3000]}) + "\n" for i in range(0, 30_000, 3000)))
    mix = {"tokenizer": str(REPO / "llmft/assets/tiny-llama"), "seq_len": 512, "sources": [
        {"name": "ul2", "weight": 0.5, "transform": "ul2", "source": {"format": "jsonl", "path": str(src)}},
        {"name": "ni", "weight": 0.5, "transform": "ni_fewshot", "max_epochs": 20,
         "source": {"format": "natural_instructions", "path": str(shared_data / "natural_instructions")}}]}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix))
    built = build(load_mix(path), tmp_path / "out", tok, 512)
    sources = built.stats["sources"].values()
    selected = sum(s["selected_tokens"] for s in sources)
    for s in sources:  # a source is taken in whole units (<= seq_len tokens each): overshoot < one unit
        assert 0 <= s["selected_tokens"] - s["target_tokens"] < 512
        assert abs(s["realized_share"] - 0.5) < 512 / selected  # ~0.017; ~0.005-0.009 seen, by the UL2 draws
    trained = (built.rows.materialize()[0].labels != -100).float().mean()
    assert 0.1 < trained < 0.9  # prompts (UL2 inputs, NI headers and queries) are context only
