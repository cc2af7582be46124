"""Publishing a directory atomically (llmft/atomic.py) and the repro base's bf16 copy (llmft/repro.py, --save-base): a
failed write leaves the old directory as it was, and the bf16 copy predicts as its fp32 source does, within bf16's
rounding, when loaded back in fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.atomic import publish_dir
from llmft.repro import _load, save_bf16


def test_publish_dir_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "out"
    with publish_dir(dest) as tmp:
        assert tmp != dest and not dest.exists()
        (tmp / "a.txt").write_text("first")
    assert (dest / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError, match="half-way"):
        with publish_dir(dest) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("failed half-way")
    assert (dest / "a.txt").read_text() == "first"  # the old directory, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind

    with publish_dir(dest) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_bf16_copy_predicts_as_its_source(tmp_path, tiny_model):
    dest = save_bf16(tiny_model, tmp_path / "shipped", "a test")
    assert "a test" in (dest / "SOURCE.md").read_text()
    src, copy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), _load(dest)
    stored = next(iter(AutoModelForCausalLM.from_pretrained(dest, dtype="auto").parameters())).dtype
    assert stored == torch.bfloat16 and next(iter(copy.parameters())).dtype == torch.float32
    assert sum(p.numel() for p in copy.parameters()) == sum(p.numel() for p in src.parameters())
    for (name, a), (_, b) in zip(src.named_parameters(), copy.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name  # exactly bf16's rounding of each weight
    x = torch.tensor([AutoTokenizer.from_pretrained(dest)("The sea was calm tonight.").input_ids])
    with torch.no_grad():
        p_src, p_copy = (torch.softmax(m(input_ids=x).logits, -1) for m in (src, copy))
    assert (p_src - p_copy).abs().max() < 2e-2
