"""Sequence parallelism without processes: the slicing of rows, the document-isolating attention, the loss on
pre-shifted labels, the recipe checks and the derived numbers. The 2-rank runs are in
tests/integration/test_sequence_parallel.py."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import packed_batch, tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM

from llmft.config import RecipeError, heads_problems, load_recipe
from llmft.data.packing import attention_kwargs
from llmft.train.loss import IGNORE, causal_lm_loss
from llmft.train.sequence_parallel import PACKED_SDPA, register_packed_sdpa, shard


def _rows(seed: int = 0) -> dict[str, torch.Tensor]:
    batch = packed_batch(seed, seq_len=96)
    batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    batch["weight"] = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    return batch


@pytest.mark.parametrize("flatten", [False, True])
def test_slices_put_back_together_are_the_whole_rows_with_labels_shifted_on_the_whole_row(flatten):
    batch = _rows()
    b, s = batch["input_ids"].shape
    slices = [shard(batch, r, 4, flatten) for r in range(4)]
    joined = {k: torch.cat([sl[k] for sl in slices], 1) for k in slices[0]}
    whole = (lambda t: t.reshape(1, -1)) if flatten else (lambda t: t)
    assert slices[0]["input_ids"].shape == ((1, b * s // 4) if flatten else (b, s // 4))
    assert torch.equal(joined["input_ids"], whole(batch["input_ids"]))
    assert torch.equal(joined["position_ids"], whole(batch["position_ids"]))  # never restarted per slice
    shifted = torch.full_like(batch["labels"], IGNORE)
    shifted[:, :-1] = batch["labels"][:, 1:]  # the last token of each row predicts nothing
    assert torch.equal(joined["shift_labels"], whole(shifted))
    # the last position of slice 0 predicts the first token of slice 1
    assert int(slices[0]["shift_labels"][0, -1]) == int(whole(batch["labels"])[0, slices[0]["input_ids"].shape[1]])
    weights = torch.zeros_like(batch["weight"])
    weights[:, :-1] = batch["weight"][:, 1:]
    assert torch.equal(joined["shift_weight"], whole(weights))


def test_the_loss_of_the_slices_sums_to_the_loss_of_the_rows(tiny_model):
    """Σ over slices of the pre-shifted loss equals the loss on whole rows (plain, weighted, chunked) when each
    slice sees the whole row's attention: here every slice runs the whole row and keeps its own positions."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = _rows()
    full = attention_kwargs({k: v for k, v in batch.items() if k != "weight"}, "sdpa", torch.float32)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    wsum = float(batch["weight"][:, 1:][batch["labels"][:, 1:] != IGNORE].sum())
    with torch.no_grad():
        plain = causal_lm_loss(model, full, n)
        weighted = causal_lm_loss(model, {**full, "weight": batch["weight"]}, wsum)
        shifted = shard(batch, 0, 1)  # one "slice": the whole rows, labels pre-shifted
        mask = {"attention_mask": full["attention_mask"]}
        for chunk in (0, 40):
            got = causal_lm_loss(model, {k: v for k, v in shifted.items() if k != "shift_weight"} | mask, n, chunk)
            torch.testing.assert_close(got, plain, atol=1e-6, rtol=0)
            got = causal_lm_loss(model, shifted | mask, wsum, chunk)
            torch.testing.assert_close(got, weighted, atol=1e-6, rtol=0)


def test_packed_sdpa_isolates_documents_by_position_ids(tiny_model):
    """The core attention under SP builds the block mask from position ids alone: the same logits as sdpa with
    the explicit block-causal mask, and different from plain causal sdpa (which lets documents see each other)."""
    register_packed_sdpa()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    batch = _rows()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        masked = model(**attention_kwargs(inputs, "sdpa", torch.float32)).logits
        causal = model(input_ids=inputs["input_ids"]).logits
        model.set_attn_implementation(PACKED_SDPA)
        packed = model(**inputs).logits
        one_document = model(input_ids=inputs["input_ids"]).logits  # positions 0..s-1: plain causal
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=0)
    assert float((packed - causal).abs().max()) > 1e-2
    torch.testing.assert_close(one_document, causal, atol=1e-5, rtol=0)


def test_packed_sdpa_layers_share_one_saved_mask(tiny_model):
    """Under SP every layer's sdpa needs the (b, 1, s, s) block mask: the layers of one training forward read and
    save the same tensor (not one each: L x s^2 elements), with the same loss and gradients as a mask per layer."""
    from llmft.data.packing import block_causal_mask

    register_packed_sdpa()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=PACKED_SDPA)
    layers = model.config.num_hidden_layers
    assert layers >= 2
    batch = _rows()
    s = batch["input_ids"].shape[1]
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": batch["labels"]}
    masks: dict[int, int] = {}

    def pack(t):
        if t.dim() == 4 and t.shape[-2:] == (s, s):
            masks[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        shared = model(**inputs).loss
    shared.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert len(masks) == 1, masks
    assert sum(masks.values()) == batch["input_ids"].shape[0] * s * s * 4  # one fp32 (b, 1, s, s)
    # reference: a bool mask for every layer (sdpa converts it in each)
    model.set_attn_implementation("sdpa")
    own = model(**inputs, attention_mask=block_causal_mask(batch["position_ids"])).loss
    own.backward()
    assert torch.equal(own, shared)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def _errors(path, *overrides) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return "\n".join(info.value.messages)


def test_recipe_checks_for_sequence_parallelism(tiny_model, text_file, tmp_path):
    """max_seq_len not divisible, eager attention, heads not divisible: each named with its YAML path and fix."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, text_file, tmp_path / "run",
                                                         parallel={"sequence": 2}))
    assert load_recipe(path).parallel.sequence == 2
    msg = _errors(path, "parallel.sequence=3")
    assert "model.max_seq_len: is 128, not divisible by parallel.sequence 3" in msg and "Fix: make" in msg
    assert "parallel.sequence: is 3, but the model's 4 attention heads do not divide by it" in msg
    msg = _errors(path, "model.attention=eager")
    assert "model.attention: eager attention cannot run under sequence parallelism" in msg
    assert "Fix: set model.attention: sdpa" in msg
    msg = _errors(path, "parallel.sequence=8")  # 128 divides by 8; 4 heads do not
    assert "4 attention heads do not divide by it" in msg and "model.max_seq_len" not in msg
    assert "parallel.sequence: got 0" in _errors(path, "parallel.sequence=0")
    # evaluation windows are split like training rows
    odd = write_recipe(tmp_path / "odd.yaml", tiny_recipe(tiny_model, text_file, tmp_path / "run",
                                                          parallel={"sequence": 2},
                                                          eval={"every_steps": 2, "lengths": [64, 127]}))
    msg = _errors(odd)
    assert "eval.lengths: has [127], not divisible by parallel.sequence 2" in msg and "Fix: use multiples of 2" in msg


def test_heads_rule_is_deepspeeds():
    """Query heads divisible by SP; KV heads divisible by SP or dividing it (replicated)."""
    assert heads_problems({"num_attention_heads": 32, "num_key_value_heads": 8}, 8) == []
    assert heads_problems({"num_attention_heads": 32, "num_key_value_heads": 4}, 8) == []  # KV replicated 2x
    (msg,) = heads_problems({"num_attention_heads": 12, "num_key_value_heads": 3}, 2)
    assert "3 KV heads neither divide by it nor divide it" in msg
    (msg,) = heads_problems({"text_config": {"num_attention_heads": 6}}, 4)
    assert "6 attention heads do not divide by it" in msg


def test_derived_numbers_count_data_parallel_groups(tiny_model, text_file, tmp_path, capsys):
    """Under SP the batch is micro x accum x (world / sequence): 4 ranks with SP=2 are 2 data-parallel groups."""
    from llmft.cli import main

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, text_file, tmp_path / "run",
                                                         parallel={"sequence": 2}))
    recipe = load_recipe(path)
    assert recipe.data_parallel_size(4) == 2 and recipe.sequences_per_step(4) == 2 * 2 * 2
    assert recipe.tokens_per_step(4) == 8 * 128
    assert main(["validate", str(path), "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "data-parallel ranks     2 (x 2 sequence-parallel, 4 processes in all)" in out
    assert "tokens per step         1,024" in out
    raw = yaml.safe_load(path.read_text())
    assert raw["parallel"] == {"sequence": 2}
