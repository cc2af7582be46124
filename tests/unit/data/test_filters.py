"""Document filters, their report, the reweighting probe and the keyword-shift report (llmft/data/filters.py,
reweight.py, keyword_shift.py), through the real build and CLI.

The shift corpus: documents of real sentences from the two bundled books, in two classes. A "woman" document draws
its sentences 70% from Frankenstein and 30% from Moby Dick and has the word "woman" twice; a "man" document the
reverse, with "man". A profanity marker ("damn") is inserted into 14% of the woman documents and 6% of the man
documents, and a keyword filter removes it: like a content filter that cuts "woman" by 14% but "man" by 6%. The
filter shifts the keywords' frequencies; the reweighting must undo >= 70% of the shift.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from transformers import AutoTokenizer

from llmft.cli import main
from llmft.config import RecipeError
from llmft.config.data import Reweight, TextFilter, load_mix
from llmft.data.build import build, curate_recipe, load_built
from llmft.data.filters import apply_filters
from llmft.data.keyword_shift import keyword_shift
from llmft.data.reweight import reweight
from llmft.data.sources import DataError
from llmft.testing.corpora import shift_corpus

TOKENIZER = "llmft/assets/tiny-llama"
ASSETS = REPO / "llmft" / "assets"


def toxicity(texts: list[str]) -> list[float]:
    """A user classifier for the tests (filters: {kind: classifier, function: test_filters:toxicity}): the share of
    words that are 'damn' or 'hell'."""
    bad = ("damn", "hell")
    return [sum(w.lower().strip(".,;!?") in bad for w in t.split()) / max(1, len(t.split())) for t in texts]


def mix_file(tmp_path: Path, docs: list[str], **mix) -> Path:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    mix = {"tokenizer": str(REPO / TOKENIZER), "seq_len": 1024, "seed": 0,
           "sources": [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}],
           **mix}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(REPO / TOKENIZER)


def test_keyword_length_and_user_classifier_filters(book_text):
    words = book_text.split()
    base = [" ".join(words[i : i + 300]) for i in range(0, 300 * 20, 300)]
    docs = [*base[:10],
            base[10] + " Damn it.",  # a whole word, any case
            base[11].replace(" the ", " THE damnation ", 1),  # inside a longer word: not a match
            "too short",
            base[12][:300] + " dam" + "n" * 5,  # the regex
            base[13] + " hell " + " ".join(["damn"] * 2)]  # the classifier
    kw = TextFilter(kind="keywords", words=["damn"], patterns=[r"\bdamn{3,}\b"])
    length = TextFilter(kind="length", min_words=20)
    clf = TextFilter(kind="classifier", name="tox", function="test_filters:toxicity", threshold=0.005, examples=1)
    r = apply_filters(docs, "a", [kw, length, clf], where=[f"doc{i}" for i in range(len(docs))])
    assert np.flatnonzero(~r.keep).tolist() == [10, 12, 13, 14]
    assert r.report["keywords"]["removed"] == 3 and r.report["keywords"]["removed_only_here"] == 2  # 14 also tox
    assert r.report["length"]["removed"] == r.report["length"]["removed_only_here"] == 1
    assert r.report["tox"]["removed"] == 1 and r.report["tox"]["examples"][0]["where"] == "doc14"
    assert r.report["keywords"]["words_removed"] == sum(len(docs[i].split()) for i in (10, 13, 14))

    # recall mode: one 'damn' in a 1000-word document is 1 per 1000 words, but 10 per 1000 in its 100-word window
    long = " ".join(words[:1000]) + " damn"
    doc_mode = TextFilter(kind="keywords", words=["damn"], threshold=2)
    rec_mode = TextFilter(kind="keywords", words=["damn"], threshold=2, mode="recall", window_words=100)
    texts = [long, *base[:5], *[b + " damn" for b in base[5:10]]]
    kd, kr = apply_filters(texts, "a", [doc_mode]).keep, apply_filters(texts, "a", [rec_mode]).keep
    assert kd[0] and not kr[0]
    assert not (kr & ~kd).any() and (~kr).sum() > (~kd).sum()  # recall removes a superset


def test_filter_and_reweight_errors_name_the_yaml_path(tmp_path):
    path = mix_file(tmp_path, ["x"], filters=[
        {"kind": "keywords", "word": ["x"]},
        {"kind": "keywords", "words": ["x"], "patterns": ["(unclosed"], "min_words": 3},
        {"kind": "classifier", "function": "nodots"},
        {"kind": "length", "min_words": 10, "max_words": 5, "mode": "recall", "sources": ["b"]},
        {"kind": "fuzzy"},
    ], reweight={"l2": -1, "min_weight": 3, "max_weight": 2, "bogus": 1})
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    msgs = "\n".join(info.value.messages)
    assert "filters.0.word: unknown key. Fix: remove it; did you mean 'words'?" in msgs
    assert "filters.4.kind: got \"fuzzy\"" in msgs
    assert "reweight.bogus: unknown key" in msgs
    assert "reweight.l2: got -1; expected a number greater than 0" in msgs
    path = mix_file(tmp_path, ["x"], filters=[
        {"kind": "keywords", "words": ["x"], "patterns": ["(unclosed"], "min_words": 3},
        {"kind": "classifier", "function": "nodots"},
        {"kind": "length", "min_words": 10, "max_words": 5, "mode": "recall", "sources": ["b"]},
        {"kind": "length", "max_words": 5},
    ], reweight={"min_weight": 3, "max_weight": 2})
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    msgs = "\n".join(info.value.messages)
    assert "filters.0.min_words: min_words is a setting of kind length, not keywords" in msgs
    assert "filters.0.patterns.0: '(unclosed' is not a valid regex" in msgs
    assert "filters.1.function: got 'nodots'; expected 'package.module:function'" in msgs
    assert "filters.1.threshold: a classifier filter needs threshold" in msgs
    assert "filters.2.min_words: 10 is larger than max_words 5" in msgs
    assert "filters.2.mode: a length filter scores the whole document" in msgs
    assert "filters.2.sources.0: 'b' is not a source of this mix" in msgs
    assert "filters.3.name: 'length' names two filters" in msgs
    assert "reweight.min_weight: 3.0 is not below max_weight 2.0" in msgs
    with pytest.raises(RecipeError, match="reweight: reweight undoes the shift of filters, and there are none"):
        load_mix(mix_file(tmp_path, ["x"], reweight={}))
    assert main(["data", "validate", str(path)]) == 2


def test_build_records_filters_carries_weights_and_keys_the_cache(tmp_path, tok):
    texts, cls, marked = shift_corpus(300, seed=1)
    filters = [{"kind": "keywords", "words": ["damn"], "examples": 2},
               {"kind": "classifier", "name": "tox", "function": "test_filters:toxicity", "threshold": 0.5}]
    path = mix_file(tmp_path, texts, packing="isolated", filters=filters, reweight={})
    out = tmp_path / "out"
    built = build(load_mix(path), out, tok, 1024)
    st = built.stats
    f = st["filters"]["by_filter"]["keywords"]
    assert f["removed"] == f["by_source"]["a"]["removed"] == st["sources"]["a"]["filtered"] == marked.sum() > 10
    assert st["filters"]["by_filter"]["tox"]["removed"] == 0
    assert len(f["by_source"]["a"]["examples"]) == 2 and "damn" in f["by_source"]["a"]["examples"][0]["excerpt"]
    md = (out / "filters.md").read_text()
    assert "## keywords" in md and f"| a | 300 | {marked.sum()} (" in md and "## Reweighting" in md
    # only the kept documents were tokenized: BOS + text + EOS each
    kept = [t for t, m in zip(texts, marked) if not m]
    assert st["sources"]["a"]["available_tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 2
                                                         for t in kept)

    # the weights: one per kept document, constant over each packed segment, 0 on padding, same after a reload
    expected = curate_recipe(load_mix(path))["a"].weights
    assert len(expected) == len(kept) and expected.mean() == pytest.approx(1.0)
    rows, w = built.rows.materialize()
    assert w.shape == rows.input_ids.shape and w.dtype == torch.float32
    seg_w = []
    for r in range(len(rows)):
        pos = rows.position_ids[r]
        starts = torch.nonzero(pos == 0).flatten().tolist() + [len(pos)]
        for s, e in zip(starts[:-1], starts[1:]):
            if (rows.labels[r, s:e] != -100).any():  # a document, not padding
                assert torch.all(w[r, s:e] == w[r, s])
                seg_w.append(float(w[r, s]))
            else:
                assert torch.all(w[r, s:e] == 0)
    assert np.allclose(sorted(seg_w), sorted(expected), atol=1e-6)  # every kept document once (1 epoch)
    assert (out / "rows" / "weight.bin").stat().st_size == 4 * w.numel()
    assert torch.equal(load_built(out).rows.materialize()[1], w)

    # the cache key covers the filters and the reweighting
    assert build(load_mix(path), out, tok, 1024, load_rows=False).cached
    assert not build(load_mix(path, ["reweight.l2=0.1"]), out, tok, 1024, load_rows=False).cached
    assert not build(load_mix(path, ["filters.1.threshold=0.01"]), out, tok, 1024, load_rows=False).cached
    plain = build(load_mix(mix_file(tmp_path, texts)), out, tok, 1024)
    assert (
        not plain.rows.has_weights
        and not (out / "rows" / "weight.bin").exists()
        and plain.stats["filters"] is None
        and not (out / "filters.md").exists()
    )

    missing = mix_file(tmp_path, texts, filters=[{"kind": "classifier", "function": "no_such_mod:f", "threshold": 1}])
    with pytest.raises(DataError, match="cannot import f from no_such_mod"):
        build(load_mix(missing), out, tok, 1024)


def test_reweighting_undoes_70_percent_of_the_keyword_shift(tmp_path, capsys):
    texts, cls, marked = shift_corpus(2000, seed=0)
    assert abs(marked[cls == 0].mean() - 0.14) < 0.02 and abs(marked[cls == 1].mean() - 0.06) < 0.02
    path = mix_file(tmp_path, texts, filters=[{"kind": "keywords", "words": ["damn"]}], reweight={})
    out = tmp_path / "out"
    assert main(["data", "build", str(path), "--out", str(out)]) == 0
    assert main(["data", "report", str(out), "--keywords", "woman,man"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "keyword_shift.json").read_text())
    woman, man = report["keywords"]["woman"], report["keywords"]["man"]
    print(json.dumps({k: {f: round(v, 4) for f, v in e.items() if isinstance(v, float)}
                      for k, e in report["keywords"].items()}))
    assert woman["shift_filtered"] < -0.03 and man["shift_filtered"] > 0.02  # the filter shifted them
    assert woman["shift_reduction"] >= 0.7 and man["shift_reduction"] >= 0.7
    assert report["documents"] == {"unfiltered": 2000, "filtered": int((~marked).sum())}
    assert "| woman |" in (out / "keyword_shift.md").read_text() and "woman" in printed
    assert (out / "keyword_shift.png").stat().st_size > 5000

    # the same numbers from the recipe, and by hand: unweighted frequencies, no reweighting
    assert main(["data", "report", str(path), "--keywords", "woman,man", "--out", str(tmp_path / "r"),
                 "reweight.folds=2"]) == 0
    assert json.loads((tmp_path / "r" / "keyword_shift.json").read_text())["keywords"] == report["keywords"]
    words = np.array([len(t.split()) for t in texts])
    n_woman = np.array([t.split().count("woman") + t.split().count("Woman") for t in texts])
    by_hand = 1e6 * n_woman[~marked].sum() / words[~marked].sum()
    assert woman["filtered"] == pytest.approx(by_hand, rel=0.02)  # (also counts "woman," etc.)
    plain = keyword_shift(texts, ~marked, None, ["woman"])["keywords"]["woman"]
    assert plain["filtered"] == woman["filtered"] and plain["reweighted"] is None

    # a probe on all hashed dimensions without cross-fitting undoes visibly less
    flat = reweight(texts, ~marked, Reweight(components=0, folds=1, l2=1e-3)).weights
    rough = keyword_shift(texts, ~marked, flat, ["woman", "man"])["keywords"]
    assert rough["woman"]["shift_reduction"] < woman["shift_reduction"] - 0.2


def test_reweight_on_a_tiny_source_and_with_nothing_removed():
    texts = ["a b c damn", "d e f", "g h i j", "k l m"]
    r = reweight(texts, np.array([False, True, True, True]), Reweight())
    assert len(r.weights) == 3 and r.weights.mean() == pytest.approx(1.0) and np.isfinite(r.weights).all()
    assert reweight(texts, np.ones(4, dtype=bool), Reweight()).weights.tolist() == [1.0] * 4
