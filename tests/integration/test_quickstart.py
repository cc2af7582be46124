"""The README quickstart, shortened: both CPU recipes train through the real entry point, the table and plot
are written, and the extended model's config carries the x8 interpolation."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

pytestmark = pytest.mark.slow


def test_quickstart_short(fast_quickstart):
    out, proc = fast_quickstart
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (out / "ppl.md").read_text().splitlines()
    assert table[0].startswith("| context | base (128) | base + PI x8, no training | PI x8 fine-tuned (1024) |")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["128", "256", "512", "1024"]
    results = json.loads((out / "ppl.json").read_text())
    assert all(1 < r["ppl"] < 2048 for col in results.values() for r in col.values())  # vocab 2048: < uniform
    assert (out / "ppl_by_length.png").stat().st_size > 10_000
    config = AutoConfig.from_pretrained(out / "extended" / "final")
    assert config.rope_parameters == {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}
    assert config.max_position_embeddings == 1024
    assert "Token perplexity on held-out text" in proc.stdout
