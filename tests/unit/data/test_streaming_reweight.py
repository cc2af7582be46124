"""Reweighting without the texts in memory (llmft/data/reweight.py ``ReweightStream``): what it holds grows by
per-document numbers only, its fitting is bounded by ``sample_size``, the sparse path equals the dense one, and a
build reweights a sampled source (read to its token need) from what it read, the same with any ``num_proc``."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import yaml
from conftest import REPO
from transformers import AutoTokenizer

from llmft.config.data import Reweight, load_mix
from llmft.data import reweight as reweight_module
from llmft.data.build import build, encode_documents
from llmft.data.build.common import FILTER_BATCH
from llmft.data.build.reading import _reading_order
from llmft.data.decontam import normalize_words
from llmft.data.dedup import Shingler, hashed_embedding
from llmft.data.reweight import ReweightStream, fit_probe, principal_components, reweight
from llmft.data.sources import Document
from llmft.testing.corpora import shift_corpus

TOKENIZER = REPO / "llmft/assets/tiny-llama"


def dense_hashed(texts: list[str]) -> np.ndarray:
    """A user embedder (reweight.embedder: test_streaming_reweight:dense_hashed): the hashed embedding, dense."""
    sh = Shingler(1)
    return hashed_embedding([sh(normalize_words(t)) for t in texts], Reweight().dim)


def _feed(texts: list[str], keep: np.ndarray, cfg: Reweight, workdir: Path) -> tuple[int, int, list[float]]:
    """(bytes held after adding every document, peak bytes while finishing, weights) traced by tracemalloc."""
    with ReweightStream(cfg, workdir) as rw:
        tracemalloc.start()
        for i in range(0, len(texts), 256):
            rw.add(texts[i : i + 256], keep[i : i + 256])
        rw._shingler._values.clear()  # the word-hash cache: capped at MAX_CACHED_WORDS words, not per document
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        weights = rw.finish().weights
        peak = tracemalloc.get_traced_memory()[1] - held
        tracemalloc.stop()
    return held, peak, weights


def test_held_memory_is_per_document_numbers_and_fitting_is_bounded_by_the_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(reweight_module, "PROJECT_CHUNK", 1 << 14)  # scoring reads 16K entries (~128 KB) at a time
    texts, _, marked = shift_corpus(8000, seed=4)
    cfg = Reweight(sample_size=300)
    # 20x longer documents (20 different ones joined): the same bytes held per document
    long = [" ".join(texts[(i + j) % 8000] for j in range(20)) for i in range(1000)]
    held_2k, peak_2k, _ = _feed(texts[:2000], ~marked[:2000], cfg, tmp_path)
    held_long, _, _ = _feed(long, ~marked[:1000], cfg, tmp_path)
    assert held_2k < 2000 * 40 and held_long < 1000 * 40  # 17 bytes per document + the array's growth
    assert sum(len(t) for t in long) > 20 * 1000 * 40  # the texts would be > 20x that
    # 4x the documents: fitting grows by per-document numbers only (the samples stay 300 + 300)
    held_8k, peak_8k, w = _feed(texts, ~marked, cfg, tmp_path)
    assert (held_8k - held_2k) / 6000 < 40
    assert (peak_8k - peak_2k) / 6000 < 120, (peak_2k, peak_8k)
    assert len(w) == (~marked).sum() and w.mean() == pytest.approx(1.0)


def _in_memory(texts: list[str], keep: np.ndarray, cfg: Reweight) -> np.ndarray:
    """The weights computed with every embedding dense in memory: the samples, folds and probes drawn as
    ReweightStream.finish draws them, every kept document scored at once."""
    rng = np.random.default_rng([cfg.seed, 0])
    n, kept = len(texts), np.flatnonzero(keep)
    fold = rng.permutation(n) % cfg.folds
    unf = np.sort(rng.choice(n, min(n, cfg.sample_size), replace=False))
    fil = np.sort(rng.choice(kept, min(len(kept), cfg.sample_size), replace=False))
    emb = dense_hashed(texts).astype(np.float64)  # (n, dim)
    sample = np.union1d(unf, fil)
    proj = principal_components(lambda: [sp.csr_matrix(emb[sample])], emb.shape[1], cfg.components, rng)
    x = (emb @ proj.axes.T - proj.mean @ proj.axes.T) * proj.scale  # (n, k)
    logit = np.zeros(n)
    for k in range(cfg.folds):
        w, b = fit_probe(x[unf[fold[unf] != k]], x[fil[fold[fil] != k]], cfg.l2)
        logit[fold == k] = x[fold == k] @ w + b
    weights = np.clip(np.exp(logit[kept]), cfg.min_weight, cfg.max_weight)
    return weights / weights.mean()


def test_streamed_scoring_equals_scoring_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(reweight_module, "PROJECT_CHUNK", 3000)  # many chunks, each spanning filtered documents
    texts, _, marked = shift_corpus(1500, seed=7)
    for cfg in (Reweight(components=8, sample_size=400), Reweight(components=6, sample_size=5000, folds=3)):
        np.testing.assert_allclose(reweight(texts, ~marked, cfg).weights, _in_memory(texts, ~marked, cfg), rtol=1e-6)


def test_a_dense_user_embedder_gives_the_hashed_embedders_weights():
    texts, _, marked = shift_corpus(600, seed=5)
    hashed = reweight(texts, ~marked, Reweight(components=8))
    dense = reweight(texts, ~marked, Reweight(components=8, embedder="test_streaming_reweight:dense_hashed"))
    assert dense.report == pytest.approx(hashed.report, rel=1e-6)
    np.testing.assert_allclose(dense.weights, hashed.weights, rtol=1e-5)
    assert hashed.weights.std() > 0.05


def test_principal_components_of_sparse_rows_match_the_exact_svd():
    rng = np.random.default_rng(0)
    low = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 50)) * (rng.random((1, 50)) < 0.5)  # rank 4
    x = low + rng.standard_normal(50)  # plus a mean
    x[:, (x != 0).sum(0) == 0] = 0
    blocks = [sp.csr_matrix(x[:100]), sp.csr_matrix(x[100:110]), sp.csr_matrix(x[110:])]  # read in 3 blocks
    proj = principal_components(lambda: blocks, 50, 3, np.random.default_rng(1))
    scores = proj(sp.csr_matrix(x))  # (300, 3)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    exact = u[:, :3] * np.sqrt(len(x))
    np.testing.assert_allclose(np.abs(scores), np.abs(exact), atol=1e-6)
    np.testing.assert_allclose(scores.std(0), 1.0, rtol=1e-6)
    # a new row is projected the same way
    np.testing.assert_allclose(proj(sp.csr_matrix(x[:7] * 2 - x[7:14])), 2 * scores[:7] - scores[7:14], atol=1e-6)


def _write(tmp_path: Path, shards: int = 30) -> tuple[Path, list[list[str]]]:
    """``big``: ``shards`` jsonl files of 100 shift-corpus documents; ``small``: one of 300."""
    texts, _, _ = shift_corpus(100 * shards + 300, seed=6)
    (tmp_path / "big").mkdir()
    files = []
    for s in range(shards):
        files.append(texts[100 * s : 100 * (s + 1)])
        (tmp_path / "big" / f"{s:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in files[-1]))
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-300:]))
    return tmp_path, files


def _mix(tmp_path: Path, num_proc: int, **extra) -> Path:
    mix = {"tokenizer": str(TOKENIZER), "seq_len": 512, "seed": 0, "total_tokens": 150_000, "packing": "isolated",
           "num_proc": num_proc, "filters": [{"kind": "keywords", "words": ["damn"]}], "reweight": {"components": 8},
           "sources": [{"name": "big", "weight": 0.5, "source": {"format": "jsonl", "path": str(tmp_path / "big")}},
                       {"name": "small", "weight": 0.5, "max_epochs": 3,
                        "source": {"format": "jsonl", "path": str(tmp_path / "small.jsonl")}}], **extra}
    path = tmp_path / f"mix-{num_proc}.yaml"
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    return path


def _segments(built) -> list[tuple[tuple[int, ...], float]]:
    """(tokens, weight) of every document segment of an isolated build's rows."""
    cols = built.rows.batch(np.arange(len(built.rows)))
    out = []
    for r in range(len(cols["input_ids"])):
        pos = cols["position_ids"][r]
        starts = np.flatnonzero(pos.numpy() == 0).tolist() + [len(pos)]
        for s, e in zip(starts[:-1], starts[1:]):
            if (cols["labels"][r, s:e] != -100).any():
                out.append((tuple(cols["input_ids"][r, s:e].tolist()), float(cols["weight"][r, s])))
    return out


def test_a_sampled_source_is_reweighted_from_what_was_read(tmp_path):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    root, files = _write(tmp_path)
    path = _mix(root, 1)
    built = build(load_mix(path), root / "out", tok, 512)
    st, rw = built.stats["sources"]["big"], built.stats["reweight"]["by_source"]["big"]
    assert not st["read_whole"] and st["read_fraction"] < 0.3  # a share needing ~1/5 of big
    assert abs(st["realized_share"] - 0.5) < 0.01
    assert rw["documents"] == st["documents"] >= 2 * FILTER_BATCH  # filtered and embedded over several batches
    assert rw["kept"] == st["documents"] - st["filtered"] > 0

    # the reference: the same stream (source 0) over the documents the build read, in its reading order
    order = {str(f): i for i, f in enumerate(sorted((root / "big").iterdir()))}
    read = [t for f in _reading_order(load_mix(path), 0) for t in files[order[str(f)]]][: rw["documents"]]
    keep = np.array(["damn" not in t.lower().split() for t in read])
    ref = reweight(read, keep, load_mix(path).reweight, stream=0)
    assert ref.report == rw and ref.weights.std() > 0.05
    examples = encode_documents([Document(text=t, where="") for t, k in zip(read, keep) if k], tok)
    by_tokens = {tuple(e.tokens.tolist()): w for e, w in zip(examples, ref.weights)}
    segs = _segments(built)
    from_big = [(t, w) for t, w in segs if t in by_tokens]
    assert len(from_big) > 50
    assert all(abs(w - by_tokens[t]) < 1e-6 for t, w in from_big)  # each document carries its own weight

    # the same rows and weights with 2 tokenizing workers
    built2 = build(load_mix(_mix(root, 2)), root / "out2", tok, 512)
    assert _segments(built2) == segs


def test_a_sampled_deduplicated_source_is_reweighted_the_same_with_any_num_proc(tmp_path):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    root, files = _write(tmp_path)
    for s in range(30):  # half of each shard's documents: copies of the other half
        (root / "big" / f"{s:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in files[s][:50] * 2))
    built = build(load_mix(_mix(root, 1, dedup={})), root / "out", tok, 512)
    st = built.stats["sources"]["big"]
    assert not st["read_whole"] and st["deduplicated"] > 0 and abs(st["realized_share"] - 0.5) < 0.01
    assert built.stats["reweight"]["by_source"]["big"]["kept"] == st["documents"] - st["deduplicated"] - st["filtered"]
    built2 = build(load_mix(_mix(root, 2, dedup={})), root / "out2", tok, 512)
    assert _segments(built2) == _segments(built)
