"""Shared fixtures: a tiny LLaMA checkpoint and text built offline, and a recipe writer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests never use the network: hub ids resolve from the cache or llmft's shipped configs at once, with no retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def book_text() -> str:
    """About 60 KB of a real public-domain book (the bundled Frankenstein)."""
    from llmft.model.tiny import BOOK, read_text

    return read_text(BOOK)[:60_000]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, book_text) -> Path:
    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text(book_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, book_text) -> Path:
    """A random tiny LLaMA (2 layers, hidden 64, vocab 512) trained for nothing, max_position_embeddings 32."""
    from llmft.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", text=book_text, vocab_size=512,
                           hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           max_position_embeddings=32)


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


@pytest.fixture
def python() -> str:
    return sys.executable
