"""The training loss: token-weighted causal-LM cross-entropy, over full logits or in chunks.

Both return ``sum of token NLLs / num_items`` where ``num_items`` counts the trained tokens of the whole
optimizer step (so accumulation weighs every token once), with labels shifted inside (position p predicts p + 1)
and -100 ignored, as transformers' ``ForCausalLMLoss`` does.

Chunked (``train.loss_chunk_tokens`` = C > 0): the decoder runs once; the LM head and the cross-entropy then
run C positions at a time under activation checkpointing, so only one chunk's logits (b, C, v) exist at a time,
in the forward and again in the backward pass, instead of the full (b, s, v) fp32 logits::

    hidden (b, s, h) ──┬─ chunk 0: lm_head -> (b, C, v) fp32 -> CE sum ─┐
                       ├─ chunk 1: ...                                   ├─ Σ / num_items
                       └─ ...                                            ┘

The result equals the full-logits loss up to float summation order; its gradients too (tests/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: int,
                   chunk_tokens: int = 0) -> torch.Tensor:
    """Loss of ``model`` (a transformers causal LM, possibly wrapped by PEFT) on ``batch``.

    Args:
        model: the causal LM.
        batch: ``input_ids``, ``labels`` and what the attention kernel needs (position ids, mask, cu_seq_lens).
        num_items: trained tokens in the whole optimizer step (the loss divisor).
        chunk_tokens: 0 for the model's own loss; otherwise positions per chunk of the chunked loss.
    """
    if not chunk_tokens:
        return model(**batch, num_items_in_batch=num_items).loss
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs).last_hidden_state  # (b, s, h)
    hidden, targets = hidden[:, :-1], labels[:, 1:]  # position p predicts token p + 1
    head = base.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk_tokens):
        h = hidden[:, start : start + chunk_tokens]  # (b, c, h)
        t = targets[:, start : start + chunk_tokens]  # (b, c)
        total = total + checkpoint(_chunk_nll, h, t, head, use_reentrant=False)
    return total / num_items


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (b, c, v): the only logits alive at a time
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
