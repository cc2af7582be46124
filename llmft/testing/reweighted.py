"""A small reweighted data mix (keyword filter + ``reweight:``) and its hand-computed weighted loss, shared by
tests/unit/train/test_loss_weights.py (plain engine) and tests/integration/test_deepspeed.py (DeepSpeed on 2 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from llmft.data.store import RowStore


def write_reweighted_mix(tmp_path: Path, book_text: str) -> Path:
    """90 documents of book text, every third with a marker word that a keyword filter removes, so the probe gives
    the kept documents varying weights. Returns the data recipe (mix.yaml); the documents are in a.jsonl."""
    words = book_text.split()
    docs = [" ".join(words[i : i + 60]) + (" damn" if k % 3 == 0 else "") for k, i in enumerate(range(0, 60 * 90, 60))]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    mix = {"packing": "isolated", "seed": 0, "validation_fraction": 0.05,
           "filters": [{"kind": "keywords", "words": ["damn"]}], "reweight": {"components": 4},
           "sources": [{"name": "a", "weight": 1, "source": {"format": "jsonl", "path": str(tmp_path / "a.jsonl")}}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix, sort_keys=False))
    return tmp_path / "mix.yaml"


def shard_columns(data_dir: Path) -> dict[str, torch.Tensor]:
    """input_ids, labels, position_ids, weight (n, s) of every row of a built mix."""
    store = RowStore(Path(data_dir) / "rows")
    return store.batch(np.arange(len(store)))


def reference(model, batch) -> torch.Tensor:
    """Σ w·nll / Σ w by hand: full fp32 logits, explicit log-softmax, the predicted token's weight."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "weight")}
    logp = torch.log_softmax(model(**inputs).logits.float(), dim=-1)[:, :-1]  # (b, s-1, v)
    targets = batch["labels"][:, 1:]  # (b, s-1)
    trained = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (b, s-1)
    w = batch["weight"][:, 1:] * trained
    return (w * nll).sum() / w.sum()
