"""Shared fixtures: a tiny LLaMA checkpoint and text built offline, and a recipe writer.

Tiers: ``tests/unit/<package area>/`` mirrors ``llmft/``; ``tests/integration/`` holds the multi-process and long
runs (DeepSpeed ranks, kills and resumes, the data engine's workers, the wheel, the quickstart, the reproduction,
the benches), marked ``slow`` here. ``pytest -m "not slow"`` is the fast tier; CI runs both.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TEST_DATA = TESTS / "data"
TINY_TOKENIZER = REPO / "llmft/assets/tiny-llama"  # the shipped tiny BPE tokenizer (and model skeleton)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never use the network: hub ids resolve from the cache or llmft's shipped configs at once, with no retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def book_text() -> str:
    """About 60 KB of a real public-domain book (the bundled Frankenstein)."""
    from llmft.testing.tiny import BOOK, read_text

    return read_text(BOOK)[:60_000]


# SHA-256 of the files as published (Project Gutenberg e-texts #84, body only, and #2701 as released, with BOM,
# header and footer), which the ``shared_data`` fixture rebuilds byte for byte from llmft/assets.
BOOK_SHA256 = {"84.txt": "f572837d92b31a857df4f6d0612e54f4bd8003d134367ae6a35ef444b9a8336b",
               "2701.txt": "dd98b4fafc0baea1a6c2cf0f6563d977399da884efd7b2a6275797268ff146d2"}
NI_TASK = "task085_unnatural_addsub_arithmetic.json"


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """A small public-domain corpus in real layouts, built from the files shipped in ``llmft/assets``:

    - ``gutenberg/84.txt``: Frankenstein, body text only;
    - ``gutenberg/2701.txt``: Moby Dick as Project Gutenberg publishes it (UTF-8 BOM, license header and footer
      with the ``*** START OF`` / ``*** END OF`` markers, CRLF line ends), byte-identical to the released e-text;
    - ``natural_instructions/task085_unnatural_addsub_arithmetic.json``: a Natural Instructions task file (30
      instances).

    Tests need no folder outside the repository.
    """
    import gzip
    import hashlib
    import json
    import shutil

    from llmft.testing.tiny import ASSETS

    root = tmp_path_factory.mktemp("shared_data")
    books = root / "gutenberg"
    books.mkdir()
    (books / "84.txt").write_bytes(gzip.decompress((ASSETS / "frankenstein.txt.gz").read_bytes()))
    frame = json.loads(gzip.decompress((ASSETS / "pg2701_frame.json.gz").read_bytes()))
    body = gzip.decompress((ASSETS / "mobydick.txt.gz").read_bytes()).decode("utf-8")
    text = frame["header"] + body + frame["footer"]
    (books / "2701.txt").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))  # published with CRLF
    for name, digest in BOOK_SHA256.items():
        assert hashlib.sha256((books / name).read_bytes()).hexdigest() == digest, name
    (root / "natural_instructions").mkdir()
    shutil.copy(ASSETS / "natural_instructions" / NI_TASK, root / "natural_instructions" / NI_TASK)
    return root


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, book_text) -> Path:
    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text(book_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def fast_quickstart(tmp_path_factory):
    """``llmft quickstart --steps-scale 0.05`` run once from outside the repository (it must find its recipes):
    (its output directory, the finished process), checked by the quickstart test."""
    import subprocess

    cwd = tmp_path_factory.mktemp("quickstart")
    out = cwd / "qs"
    proc = subprocess.run([sys.executable, "-m", "llmft.cli", "quickstart", "--out", str(out), "--steps-scale", "0.05"],
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    return out, proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, book_text) -> Path:
    """A random tiny LLaMA (2 layers, hidden 64, vocab 512) trained for nothing, max_position_embeddings 32."""
    from llmft.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", text=book_text, vocab_size=512,
                           hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           max_position_embeddings=32)


@pytest.fixture(scope="session")
def sharp_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny LLaMA with its attention and LM-head weights scaled x8: attention is peaked and per-token losses
    spread (std ~1.3 nats instead of ~0.1), so a token that attends to the wrong example or an extra trained
    token moves a step's mean loss far beyond float noise. A near-uniform random model hides both."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")):
                w.mul_(8.0)
    out = tmp_path_factory.mktemp("sharp") / "model"
    model.save_pretrained(out)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def tiny_recipe(model_dir: Path, data_file: Path, run_dir: Path, **sections) -> dict:
    """A small CPU recipe (x4 linear PI to 128 tokens) as a dict; ``sections`` update it section by section."""
    recipe = {
        "model": {"name": str(model_dir), "dtype": "float32", "attention": "sdpa",
                  "rope": {"type": "linear", "factor": 4.0}, "max_seq_len": 128},
        "data": {"sources": [{"format": "jsonl" if ".jsonl" in data_file.name else "text", "path": str(data_file)}],
                 "validation_fraction": 0.1},
        "train": {"lr": 3e-3, "warmup_steps": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                  "max_steps": 8, "precision": "fp32", "seed": 0},
        "checkpoint": {"dir": str(run_dir)},
        "logging": {"every_steps": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def free_port() -> int:
    """A free TCP port on localhost (for a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on localhost, for launches that run at once (each socket is held until all
    are drawn, so none is drawn twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def run_at_once(commands: dict[str, list[str]], env: dict[str, str], timeout: float = 900) -> dict[str, str]:
    """Start every command (e.g. launches with ports from :func:`free_ports`) before waiting on any, so that their
    start-up and exit overlap; each must exit 0. Returns each command's output (stdout and stderr together)."""
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for name, cmd in commands.items()}
    outputs = {}
    for name, proc in procs.items():
        outputs[name], _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{name}: " + outputs[name][-3000:]
    return outputs


@pytest.fixture
def python() -> str:
    return sys.executable


def sharded_mix_file(path: Path, corpus: dict[str, Path], **mix) -> Path:
    """A two-source mix over :func:`llmft.testing.corpora.write_sharded_corpus`'s corpus, half each; ``mix``
    updates it."""
    mix = {"tokenizer": str(TINY_TOKENIZER), "seq_len": 256, "seed": 0, "total_tokens": 16_000, "packing": "concat",
           "sources": [{"name": "big", "weight": 0.5, "source": {"format": "jsonl", "path": str(corpus["big"])}},
                       {"name": "small", "weight": 0.5, "source": {"format": "jsonl", "path": str(corpus["small"])}}],
           **mix}
    path.write_text(yaml.safe_dump(mix, sort_keys=False))
    return path


def packed_batch(seed: int = 0, seq_len: int = 96) -> dict:
    """Two isolated rows of random examples, prompts masked, with the sdpa block-diagonal mask."""
    import numpy as np
    import torch

    from llmft.data.packing import Example, attention_kwargs, pack_isolated

    rng = np.random.default_rng(seed)
    examples = []
    for n in rng.integers(5, 40, 8):
        mask = np.ones(n, bool)
        mask[: rng.integers(1, 4)] = False  # a short prompt: context only
        examples.append(Example(rng.integers(3, 500, n).astype(np.int32), mask))
    rows = pack_isolated(examples, seq_len, pad_id=0)
    batch = {"input_ids": rows.input_ids[:2], "labels": rows.labels[:2], "position_ids": rows.position_ids[:2]}
    return attention_kwargs(batch, "sdpa", torch.float32)


def loss_and_grads(model, batch: dict, chunk: int) -> tuple:
    """(loss, {parameter name: gradient}) of one forward/backward with ``train.loss_chunk_tokens = chunk``."""
    from llmft.train.loss import causal_lm_loss

    model.zero_grad(set_to_none=True)
    num_items = int((batch["labels"][:, 1:] != -100).sum())
    loss = causal_lm_loss(model, batch, num_items, chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread, in this process and in the processes a test starts (``OMP_NUM_THREADS=1``): torch's
    multi-threaded CPU kernels can differ in the last bits between two processes of the same run (seen in 2 of 14
    two-thread runs, 0 of 12 one-thread runs), so tests that compare processes bitwise run single-threaded."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items):
    """Everything under tests/integration/ is in the slow tier."""
    for item in items:
        if "integration" in item.path.relative_to(TESTS).parts[:1]:
            item.add_marker(pytest.mark.slow)
