"""Per-token loss weights (a reweighted data build's ``weight`` column) in the training loss (llmft/train/loss.py):
the loss is Σ w·nll / Σ w over a step's trained tokens, w being the weight of the predicted token.

Checked against a hand computation over full logits for the model's path, the chunked path and the fused path;
"a weight of 2 is the example twice" in loss and gradients; and a real build with ``reweight:`` trained by the
real loop, its logged first-step loss recomputed from the saved shards.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM

from llmft.config import load_recipe
from llmft.data.packing import Example, attention_kwargs, pack_isolated, segment_ids
from llmft.model.load import build_model
from llmft.testing.reweighted import reference, shard_columns, write_reweighted_mix
from llmft.train.loop import train
from llmft.train.loss import _fusable, causal_lm_loss, step_divisor


def grads_of(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def weighted_packed_batch(seed: int = 0, seq_len: int = 96) -> dict[str, torch.Tensor]:
    """Two isolated rows of random examples (short prompts masked), each example a random weight in [0.2, 3]."""
    rng = np.random.default_rng(seed)
    examples = []
    for n in rng.integers(5, 40, 8):
        mask = np.ones(n, bool)
        mask[: rng.integers(1, 4)] = False
        examples.append(Example(rng.integers(3, 500, n).astype(np.int32), mask))
    rows = pack_isolated(examples, seq_len, pad_id=0)
    batch = {"input_ids": rows.input_ids[:2], "labels": rows.labels[:2], "position_ids": rows.position_ids[:2]}
    seg = segment_ids(batch["position_ids"])  # (b, s)
    per_segment = torch.from_numpy(rng.uniform(0.2, 3.0, int(seg.max()) + 1).astype(np.float32))
    batch["weight"] = per_segment[seg]  # (b, s): constant per example, as the builder places them
    return attention_kwargs(batch, "sdpa", torch.float32)


@pytest.mark.parametrize("path", ["model", "fused", "checkpointed"])
def test_weighted_loss_and_gradients_equal_a_hand_computation(tiny_model, path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    if path == "checkpointed":  # a head the fused loss cannot read (bias): the activation-checkpointed chunks
        head = torch.nn.Linear(64, model.config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0, 0.1)
        model.lm_head = head
    chunk = {"model": 0, "fused": 7, "checkpointed": 13}[path]
    assert _fusable(model.get_output_embeddings()) == (path != "checkpointed")
    batch = weighted_packed_batch()
    ref_loss, ref_grads = grads_of(model, lambda: reference(model, batch))
    loss, grads = grads_of(model, lambda: causal_lm_loss(model, batch, step_divisor([batch]), chunk))
    # 1e-6 relative: a few fp32 ulps of the summation order (the chunks sum in another order than the full logits)
    assert abs(float(loss) - float(ref_loss)) < 1e-6 * float(ref_loss) and float(ref_loss) > 1
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)

    # the weights matter, and all-ones weights give the unweighted loss
    plain = {k: v for k, v in batch.items() if k != "weight"}
    with torch.no_grad():
        unweighted = causal_lm_loss(model, plain, step_divisor([plain]), chunk)
    assert abs(float(unweighted) - float(loss)) > 1e-3
    ones = {**plain, "weight": torch.ones_like(batch["weight"])}
    assert step_divisor([ones]) == step_divisor([plain])
    with torch.no_grad():
        assert abs(float(causal_lm_loss(model, ones, step_divisor([ones]), chunk)) - float(unweighted)) < 1e-6 * 7


def rows_batch(examples: list[np.ndarray], weights: list[float], seq_len: int = 48) -> dict[str, torch.Tensor]:
    """One example per row (isolated, padded), with per-token weights."""
    rows = pack_isolated([Example(e, np.ones(len(e), bool)) for e in examples], seq_len, pad_id=0)
    assert len(rows) == len(examples)  # each too long to share a row
    w = torch.tensor(weights, dtype=torch.float32)[:, None] * (rows.labels != -100)  # 0 on padding
    batch = {"input_ids": rows.input_ids, "labels": rows.labels, "position_ids": rows.position_ids, "weight": w}
    return attention_kwargs(batch, "sdpa", torch.float32)


@pytest.mark.parametrize("chunk", [0, 16])
def test_weight_two_equals_the_example_twice(tiny_model, chunk):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 500, 40).astype(np.int32), rng.integers(3, 500, 30).astype(np.int32)
    weighted = rows_batch([a, b], [2.0, 1.0])
    twice = rows_batch([a, a, b], [1.0, 1.0, 1.0])
    assert step_divisor([weighted]) == step_divisor([twice]) == 2 * 39 + 29
    loss_w, grads_w = grads_of(model, lambda: causal_lm_loss(model, weighted, step_divisor([weighted]), chunk))
    loss_2, grads_2 = grads_of(model, lambda: causal_lm_loss(model, twice, step_divisor([twice]), chunk))
    assert abs(float(loss_w) - float(loss_2)) < 1e-6
    for n in grads_2:
        torch.testing.assert_close(grads_w[n], grads_2[n], atol=1e-6, rtol=1e-5, msg=n)

    # across micro-batches too: [A (w 2)] + [B] against [A, A] + [B]
    mb_w = [rows_batch([a], [2.0]), rows_batch([b], [1.0])]
    mb_2 = [rows_batch([a, a], [1.0, 1.0]), rows_batch([b], [1.0])]
    with torch.no_grad():
        loss_mw = sum(float(causal_lm_loss(model, m, step_divisor(mb_w), chunk)) for m in mb_w)
        loss_m2 = sum(float(causal_lm_loss(model, m, step_divisor(mb_2), chunk)) for m in mb_2)
    assert abs(loss_mw - loss_m2) < 1e-6 and abs(loss_mw - float(loss_w)) < 1e-6
    # and A, B at weight 1 is another loss, 100x the tolerance away (a random model: every token's nll ~ log v)
    once = rows_batch([a, b], [1.0, 1.0])
    with torch.no_grad():
        assert abs(float(causal_lm_loss(model, once, step_divisor([once]), chunk)) - float(loss_w)) > 1e-4


def test_training_on_a_reweighted_build_logs_the_weighted_loss(tmp_path, tiny_model, book_text, capsys):
    # documents of book text; every third has a marker word that a keyword filter removes, so the probe weighs
    mix = write_reweighted_mix(tmp_path, book_text)
    recipe = tiny_recipe(tiny_model, tmp_path / "a.jsonl", tmp_path / "run", train={"max_steps": 2})
    recipe["data"] = {"recipe": str(mix)}
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    initial = build_model(cfg.model, seed=cfg.train.seed, dtype=torch.float32).model  # the loop's starting weights
    result = train(cfg)
    assert "loss weights       per token" in capsys.readouterr().out

    # the first step from the saved shard: the loader's order (randperm of the rows, seed 0), 2 micro x 2 accum
    col = shard_columns(tmp_path / "run" / "data")
    w = col["weight"]
    assert len(set(w[w > 0].tolist())) > 5  # the weights vary by document
    first = torch.randperm(len(w), generator=torch.Generator().manual_seed(0))[:4]
    batch = {k: (v[first].long() if k != "weight" else v[first].float()) for k, v in col.items()}
    with torch.no_grad():
        ref = reference(initial, attention_kwargs(batch, "sdpa", torch.float32))
        plain = attention_kwargs({k: v for k, v in batch.items() if k != "weight"}, "sdpa", torch.float32)
        unweighted = initial(**plain).loss
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in logged if r.get("step") == 1 and "loss" in r)
    assert abs(step1["loss"] - float(ref)) < 1e-5 and abs(result.losses[0] - float(ref)) < 1e-5
    assert abs(float(unweighted) - float(ref)) > 1e-4  # the weights changed the loss
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))

    # the fused chunked loss trains the same two steps
    recipe["checkpoint"]["dir"], recipe["train"]["loss_chunk_tokens"] = str(tmp_path / "run2"), 24
    chunked = train(load_recipe(write_recipe(tmp_path / "r2.yaml", recipe)))
    assert chunked.losses == pytest.approx(result.losses, abs=1e-5)
