"""Deduplication against an exact all-pairs search on a corpus with planted near-duplicates (real prose from the
bundled books): MinHash-LSH and five clusterings find >= 97% of the true pairs with >= 95% precision, one
clustering visibly fewer; exact copies and the keep rule; scopes; the recipe's dedup section, its report in
stats.json and the cache key; ``llmft data dedup``.

True pair: Jaccard similarity of the 3-word shingle sets >= 0.35 (see llmft/data/dedup.py). At these settings
every planted variant (5-15% word edits, reorderings, restyled copies) is a true pair and no two different
documents that only share boilerplate are (checked below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from transformers import AutoTokenizer

from llmft.cli import main
from llmft.config import RecipeError
from llmft.config.data import Dedup, load_mix
from llmft.data.build import build
from llmft.data.decontam import normalize_words
from llmft.data.dedup import Shingler, all_pairs, deduplicate, hashed_embedding, jaccard
from llmft.data.sources import DataError
from llmft.testing.dedup_corpus import planted_corpus

N = 1500
SETTINGS = {"threshold": 0.35, "shingle_size": 3}
TOKENIZER = "llmft/assets/tiny-llama"


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus(N, seed=0)


@pytest.fixture(scope="module")
def shingles(corpus):
    sh = Shingler(3)
    return [sh(normalize_words(t)) for t in corpus.texts]


@pytest.fixture(scope="module")
def truth(shingles) -> set[tuple[int, int]]:
    return {tuple(p) for p in all_pairs(shingles, SETTINGS["threshold"]).tolist()}


@pytest.fixture(scope="module")
def runs(corpus):
    """One deduplication per method, over one source, recall measured on every document."""
    sources = ["s"] * N
    return {
        "minhash": deduplicate(corpus.texts, sources, Dedup(methods=["minhash"], recall_sample=N, **SETTINGS)),
        "clusters x1": deduplicate(corpus.texts, sources, Dedup(methods=["clusters"], clusterings=1, recall_sample=N,
                                                                **SETTINGS)),
        "clusters x5": deduplicate(corpus.texts, sources, Dedup(methods=["clusters"], clusterings=5, recall_sample=N,
                                                                **SETTINGS)),
    }


def score(pairs: np.ndarray, truth: set) -> tuple[float, float]:
    found = {tuple(p) for p in pairs.tolist()}
    hit = len(found & truth)
    return hit / len(truth), hit / max(1, len(found))


def test_ground_truth_matches_brute_force_and_the_planted_structure(corpus, shingles, truth):
    sub = range(0, N, 6)  # 250 documents: every pair by hand
    brute = {(i, j) for i in sub for j in sub if i < j and jaccard(shingles[i], shingles[j]) >= SETTINGS["threshold"]}
    assert brute == {(i, j) for i, j in all_pairs([shingles[i] for i in sub], SETTINGS["threshold"]).tolist()
                     for i, j in [(sub[i], sub[j])]}
    assert brute == {p for p in truth if p[0] in sub and p[1] in sub}

    assert len(truth) > 400 and corpus.variant_pairs <= truth  # every planted variant is a true pair
    boilerplate = corpus.boilerplate_pairs
    assert len(boilerplate) > 5000 and not boilerplate & truth  # shared header + footer alone: never a pair
    assert all(corpus.family[i] == corpus.family[j] for i, j in truth)  # no pair by chance between families
    kinds = {corpus.kind[i] for i, j in truth} | {corpus.kind[j] for i, j in truth}
    assert kinds == {"base", "edit", "reorder", "exact"}


def test_minhash_finds_97_percent_of_true_pairs(runs, truth, corpus):
    r = runs["minhash"]
    recall, precision = score(r.pairs, truth)
    assert recall >= 0.97 and precision >= 0.95, (recall, precision)
    assert r.report["recall"]["recall"] == pytest.approx(recall)  # the report's own all-pairs measurement
    assert r.report["recall"]["precision"] == pytest.approx(precision)
    # groups are the connected components of the true pairs: one document kept from each
    edges = np.array(sorted(truth))
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(N, N))
    components = connected_components(graph, directed=False)[0]
    assert r.keep.sum() == components and r.report["removed"] == N - components
    assert r.report["groups"] == sum(1 for g in set(r.group.tolist()) if (r.group == g).sum() > 1)


def test_five_clusterings_find_97_percent_and_one_visibly_fewer(runs, truth):
    one, _ = score(runs["clusters x1"].pairs, truth)
    five, precision = score(runs["clusters x5"].pairs, truth)
    assert five >= 0.97 and precision >= 0.95, (five, precision)
    assert one <= five - 0.05, (one, five)  # a pair split by one clustering is usually together in another
    st = runs["clusters x5"].report["methods"]["clusters"]
    assert st["k"] == {"s": N // 10} and len(st["new_candidates_per_clustering"]) == 5
    assert all(n > 0 for n in st["new_candidates_per_clustering"])
    assert runs["clusters x5"].report["recall"]["recall"] == pytest.approx(five)


def test_same_result_when_run_again(runs, corpus):
    again = deduplicate(corpus.texts, ["s"] * N, Dedup(methods=["clusters"], clusterings=5, recall_sample=N,
                                                       **SETTINGS))
    before = runs["clusters x5"]
    assert np.array_equal(again.pairs, before.pairs) and np.array_equal(again.keep, before.keep)
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert drop(again.report) == drop(before.report)


def test_exact_copies_and_the_keep_rule(corpus):
    texts = corpus.texts[:400]
    r = deduplicate(texts, ["s"] * 400, Dedup(methods=["exact"], recall_sample=0))
    words = [normalize_words(t) for t in texts]
    for i in np.flatnonzero(~r.keep):
        assert words[i] == words[r.group[i]] and r.group[i] < i  # an exact copy of the first with its text
    copies = sum(1 for i in range(400) if any(words[j] == words[i] for j in range(i)))
    assert r.report["removed"] == r.report["exact_duplicates"] == copies > 0

    longest = deduplicate(texts, ["s"] * 400, Dedup(methods=["exact", "minhash"], keep="longest", recall_sample=0,
                                                    **SETTINGS))
    for g in set(longest.group.tolist()):
        members = np.flatnonzero(longest.group == g)
        lengths = [len(words[i]) for i in members]
        assert len(words[g]) == max(lengths) and g == members[lengths.index(max(lengths))]  # ties: the first
    assert (~longest.keep).sum() > (~r.keep).sum()


def test_scope_per_source_or_across(corpus, shingles, truth):
    n = 600
    texts, sources = corpus.texts[:n], ["a" if i % 2 else "b" for i in range(n)]
    sub_truth = {(i, j) for i, j in truth if j < n}
    per = deduplicate(texts, sources, Dedup(methods=["minhash"], recall_sample=0, **SETTINGS))
    across = deduplicate(texts, sources, Dedup(methods=["minhash"], scope="across_sources", recall_sample=0,
                                               **SETTINGS))
    same_source = {(i, j) for i, j in sub_truth if sources[i] == sources[j]}
    assert {tuple(p) for p in per.pairs.tolist()} <= same_source and score(per.pairs, same_source)[0] >= 0.97
    assert score(across.pairs, sub_truth)[0] >= 0.97 and len(sub_truth) > len(same_source)
    assert across.report["removed"] > per.report["removed"]
    by = across.report["by_source"]
    assert by["a"]["removed"] + by["b"]["removed"] == across.report["removed"]
    assert by["a"]["documents"] == by["b"]["documents"] == n // 2


def bow_embedding(texts: list[str]) -> np.ndarray:
    """A custom embedder for ``embedder: test_dedup:bow_embedding``: hashed bag of words."""
    sh = Shingler(1)
    return hashed_embedding([sh(normalize_words(t)) for t in texts], dim=128)


def test_custom_embedder_and_a_missing_one(corpus, truth):
    n = 600
    cfg = Dedup(methods=["clusters"], embedder="test_dedup:bow_embedding", candidate_cosine=0.6, recall_sample=0,
                **SETTINGS)
    r = deduplicate(corpus.texts[:n], ["s"] * n, cfg)
    assert score(r.pairs, {(i, j) for i, j in truth if j < n})[0] >= 0.9
    with pytest.raises(DataError, match="cannot import"):
        deduplicate(corpus.texts[:10], ["s"] * 10, cfg.model_copy(update={"embedder": "test_dedup:nothing"}))
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="sentence-transformers is not installed"):
            deduplicate(corpus.texts[:10], ["s"] * 10, cfg.model_copy(update={"embedder": "sentence-transformers:x"}))


# ------------------------------------------------------------------------------------ recipes, build, CLI


def mix_file(tmp_path: Path, docs: list[str], **mix) -> Path:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    mix = {"tokenizer": str(REPO / TOKENIZER), "seq_len": 256, "seed": 0,
           "sources": [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}],
           **mix}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    return path


def test_dedup_section_errors_name_the_yaml_path(tmp_path):
    path = mix_file(tmp_path, ["x"], dedup={"methods": ["minhash", "fuzzy"], "threshold": 1.5, "shingle": 3})
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    msgs = info.value.messages
    assert any("dedup.shingle: unknown key. Fix: remove it; did you mean 'shingle_size'?" in m for m in msgs), msgs
    assert any("dedup.threshold: got 1.5; expected a number less than or equal to 1" in m for m in msgs), msgs
    assert any("dedup.methods.1: got \"fuzzy\"" in m for m in msgs), msgs

    path = mix_file(tmp_path, ["x"], dedup={"methods": ["minhash", "minhash"], "num_clusters": 64,
                                            "embedder": "nonsense"})
    with pytest.raises(RecipeError) as info:
        load_mix(path)
    msgs = "\n".join(info.value.messages)
    assert "dedup.methods: ['minhash', 'minhash'] names a method twice" in msgs
    assert "dedup.num_clusters: num_clusters is a setting of the clusters method; add clusters to methods" in msgs
    assert "dedup.embedder: got 'nonsense'; expected 'hashed'" in msgs
    path = mix_file(tmp_path, ["x"], dedup={"methods": ["clusters"], "embedder": "sentence-transformers:m"})
    with pytest.raises(RecipeError, match="needs candidate_cosine"):
        load_mix(path)
    assert main(["data", "dedup", str(path), "--out", str(tmp_path / "o")]) == 2


def test_build_removes_duplicates_before_packing_and_records_them(tmp_path, corpus):
    tok = AutoTokenizer.from_pretrained(REPO / TOKENIZER)
    docs = [t for t, f in zip(corpus.texts, corpus.family) if f < 100]  # 100 bases and their variants
    dedup = {"methods": ["exact", "minhash"], **SETTINGS}
    path = mix_file(tmp_path, docs, dedup=dedup)
    built = build(load_mix(path), tmp_path / "out", tok, 256)
    expected = deduplicate(docs, ["a"] * len(docs), Dedup(**dedup))
    removed = [d for d, k in zip(docs, expected.keep) if not k]
    kept = [d for d, k in zip(docs, expected.keep) if k]
    st, src = built.stats["dedup"], built.stats["sources"]["a"]
    assert len(removed) > 5 and st["removed"] == src["deduplicated"] == len(removed)
    assert st["by_source"]["a"]["tokens_removed"] == sum(len(tok(d, add_special_tokens=False)["input_ids"])
                                                         for d in removed)
    # only the kept documents were tokenized: BOS + text + EOS each
    assert src["available_tokens"] == sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 2 for d in kept)
    assert st["examples"] and st["recall"]["recall"] >= 0.9
    assert json.loads((tmp_path / "out" / "dedup.json").read_text()) == st
    assert f"| a | {len(docs)} |" in (tmp_path / "out" / "dedup.md").read_text()

    assert build(load_mix(path), tmp_path / "out", tok, 256, load_rows=False).cached
    assert not build(load_mix(path, ["dedup.threshold=0.5"]), tmp_path / "out", tok, 256, load_rows=False).cached
    no_dedup = mix_file(tmp_path, docs)
    plain = build(load_mix(no_dedup), tmp_path / "out", tok, 256, load_rows=False)
    assert not plain.cached and plain.stats["dedup"] is None and not (tmp_path / "out" / "dedup.json").exists()


def test_cli_dedup_writes_the_report_without_building(tmp_path, corpus, capsys):
    docs = [t for t, f in zip(corpus.texts, corpus.family) if f < 100]
    path = mix_file(tmp_path, docs)
    out = tmp_path / "report"
    assert main(["data", "dedup", str(path), "--out", str(out), "dedup.threshold=0.35", "dedup.shingle_size=3"]) == 0
    report = json.loads((out / "dedup.json").read_text())
    assert report["settings"]["methods"] == ["exact", "minhash"] and report["removed"] > 0
    assert report["by_source"]["a"]["tokens_removed"] > 0
    assert "Recall against an exact all-pairs search" in (out / "dedup.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["dedup.json", "dedup.md"]  # no rows, no stats
    assert f"{report['removed']} of {len(docs)} removed" in capsys.readouterr().out
