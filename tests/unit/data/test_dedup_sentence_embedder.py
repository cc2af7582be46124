"""``dedup.embedder: sentence-transformers:<model>`` for real: a tiny sentence-transformers model built offline (a
random 2-layer BERT, hidden 32, on the repo's tiny BPE tokenizer, mean pooling), saved to a directory and used by
the clusters method, through ``deduplicate`` and through ``llmft data dedup`` with a recipe.

Corpus: 40 base documents of real prose (the planted-corpus generator, no variants) plus 4 exact copies and 4
copies with one word substituted (whitespace kept): every true pair (Jaccard of 5-word shingle sets >= 0.8, the
default threshold) is a planted one. ``candidate_cosine`` 0.95: the model embeds a one-word edit at cosine >= 0.99
to its base and different documents at <= 0.9 (checked below), so the clusters method has to find exactly the
planted copies from the embeddings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

pytest.importorskip("sentence_transformers")

from llmft.cli import main  # noqa: E402
from llmft.config.data import Dedup  # noqa: E402
from llmft.data.decontam import normalize_words  # noqa: E402
from llmft.data.dedup import Shingler, all_pairs, deduplicate  # noqa: E402
from llmft.data.dedup import index as dedup_module  # noqa: E402  (where DedupIndex calls it)
from llmft.data.sources import DataError  # noqa: E402
from llmft.testing.dedup_corpus import planted_corpus  # noqa: E402

TOKENIZER = REPO / "llmft" / "assets" / "tiny-llama"
CANDIDATE_COSINE = 0.95
N_BASE, N_COPIES = 40, 4


@pytest.fixture(scope="module")
def st_model(tmp_path_factory) -> Path:
    """A saved SentenceTransformer: random BertModel + the tiny BPE tokenizer, mean pooling, max 512 tokens."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("st")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id))
    # Random position / token-type embeddings are the same for every document truncated to 512 tokens and dominate
    # a random model's mean pooling (every pair at cosine > 0.99); without them the vector is a contextual bag of
    # tokens, so different documents differ (cosine <= 0.9) and a one-word edit does not (>= 0.99).
    with torch.no_grad():
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    word = models.Transformer(str(root / "bert"), max_seq_length=512)
    pooling = models.Pooling(32, pooling_mode="mean")  # the hidden size
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(root / "model"))
    return root / "model"


def _one_word_changed(text: str) -> str:
    """``text`` with its word at a third of the way replaced (whitespace and newlines kept)."""
    words = list(re.finditer(r"\S+", text))
    w = words[len(words) // 3]
    return text[: w.start()] + ("whale" if w.group().lower() != "whale" else "ship") + text[w.end():]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], set[tuple[int, int]]]:
    """(texts, planted pairs i < j): 40 bases, then 4 exact copies and 4 one-word edits of bases 0..7."""
    texts = planted_corpus(N_BASE, seed=0, variant_fraction=0).texts
    planted = set()
    for k in range(N_COPIES):
        planted.add((k, len(texts)))
        texts.append(texts[k])
    for k in range(N_COPIES, 2 * N_COPIES):
        planted.add((k, len(texts)))
        texts.append(_one_word_changed(texts[k]))
    return texts, planted


def test_sentence_transformers_embedder_finds_the_planted_copies(st_model, corpus, monkeypatch):
    from sentence_transformers import SentenceTransformer

    texts, planted = corpus
    cfg = Dedup(methods=["clusters"], embedder=f"sentence-transformers:{st_model}", candidate_cosine=CANDIDATE_COSINE,
                recall_sample=len(texts))
    sh = Shingler(cfg.shingle_size)
    truth = {tuple(p) for p in all_pairs([sh(normalize_words(t)) for t in texts], cfg.threshold).tolist()}
    assert truth == planted  # the planted copies are the only true pairs

    used = []
    real = dedup_module.cluster_candidates
    monkeypatch.setattr(dedup_module, "cluster_candidates", lambda emb, *a: used.append(emb) or real(emb, *a))
    r = deduplicate(texts, ["s"] * len(texts), cfg)

    # the vectors clustered are the model's own embeddings (normalized), for every document in order
    (emb,) = used
    assert emb.shape == (len(texts), 32) and emb.dtype == np.float32
    model = SentenceTransformer(str(st_model), device="cpu")
    few = [0, 5, N_BASE, N_BASE + N_COPIES + 1, len(texts) - 1]
    ref = model.encode([texts[i] for i in few])
    np.testing.assert_allclose(emb[few], ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)

    # the model separates copies from different documents, so the candidate cut means something
    cos = emb @ emb.T
    for i, j in planted:
        assert cos[i, j] >= 0.99, (i, j, cos[i, j])
    others = [cos[i, j] for i in range(len(texts)) for j in range(i + 1, len(texts)) if (i, j) not in planted]
    assert max(others) <= 0.9 < CANDIDATE_COSINE, max(others)

    # exactly the planted copies found (exact copies too: methods has no 'exact'), the base kept from each pair
    assert {tuple(p) for p in r.pairs.tolist()} == planted
    assert r.keep.tolist() == [True] * N_BASE + [False] * (2 * N_COPIES)
    assert [int(r.group[j]) for _, j in sorted(planted)] == [i for i, _ in sorted(planted)]
    rep = r.report
    assert rep["removed"] == 2 * N_COPIES and rep["groups"] == 2 * N_COPIES
    st = rep["methods"]["clusters"]
    assert st["candidate_cosine"] == CANDIDATE_COSINE and st["pairs"] == st["candidates"] == len(planted)
    assert st["k"] == {"s": len(texts) // 10}
    assert rep["recall"]["true_pairs"] == len(planted) and rep["recall"]["recall"] == rep["recall"]["precision"] == 1


def test_recipe_and_cli_with_a_sentence_transformers_embedder(st_model, corpus, tmp_path, capsys):
    texts, planted = corpus
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    dedup = {"methods": ["exact", "clusters"], "embedder": f"sentence-transformers:{st_model}",
             "candidate_cosine": CANDIDATE_COSINE, "recall_sample": len(texts)}
    mix = {"tokenizer": str(TOKENIZER), "seq_len": 256, "seed": 0, "dedup": dedup,
           "sources": [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}]}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix, sort_keys=False))

    assert main(["data", "dedup", str(path), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "dedup.json").read_text())
    assert report["settings"]["embedder"] == f"sentence-transformers:{st_model}"
    assert report["removed"] == 2 * N_COPIES and report["exact_duplicates"] == N_COPIES
    st = report["methods"]["clusters"]  # exact copies are removed first; clusters finds the one-word edits
    assert st["pairs"] == N_COPIES and st["candidate_cosine"] == CANDIDATE_COSINE
    assert report["recall"]["recall"] == 1 and report["recall"]["true_pairs"] == len(planted)
    assert f"{2 * N_COPIES} of {len(texts)} removed" in capsys.readouterr().out

    # a model directory that does not exist: a DataError naming it, and exit 2 from the CLI
    missing = tmp_path / "no-such-model"
    with pytest.raises(DataError, match=r"dedup.embedder .*cannot load the model .*no-such-model"):
        deduplicate(texts[:12], ["s"] * 12, Dedup(methods=["clusters"], embedder=f"sentence-transformers:{missing}",
                                                  candidate_cosine=CANDIDATE_COSINE, recall_sample=0))
    path.write_text(yaml.safe_dump({**mix, "dedup": {**dedup, "embedder": f"sentence-transformers:{missing}"}}))
    assert main(["data", "dedup", str(path), "--out", str(tmp_path / "report2")]) == 2
    assert "no-such-model" in capsys.readouterr().err
