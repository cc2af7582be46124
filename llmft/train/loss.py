"""The training loss: token-weighted causal-LM cross-entropy, over full logits or in chunks.

Both return ``sum of token NLLs / num_items`` where ``num_items`` counts the trained tokens of the whole
optimizer step (so accumulation weighs every token once), with labels shifted inside (position p predicts p + 1)
and -100 ignored, as transformers' ``ForCausalLMLoss`` does.

Chunked (``train.loss_chunk_tokens`` = C > 0): the decoder runs once (the model's forward with
``logits_to_keep=1``, so the head makes logits for one position); the LM head and the cross-entropy then run C
positions at a time (b x C rows), so only one chunk's logits (b C, v) exist at a time instead of the full
(b, s, v) fp32 logits::

    hidden (b, s, h) ──┬─ chunk 0: lm_head -> (b C, v) fp32 -> CE sum, d/dhidden, d/dW ─┐
                       ├─ chunk 1: ...                                                  ├─ Σ / num_items
                       └─ ...                                                           ┘

When the head is a plain ``nn.Linear`` (no bias, not partitioned by ZeRO-3), each chunk's gradients are computed
right there in the forward pass (a fused linear + cross-entropy, as Liger-Kernel's): the softmax is made in place
in the logits buffer, turned into d loss / d logits, and multiplied into d/d hidden (b, s, h) and d/d W (v, h),
which the backward pass only scales by the incoming gradient. One (b C, v) fp32 buffer per chunk and no LM-head
recompute: the head costs 6 v h FLOPs per token, as without chunking. Any other head (a PEFT wrapper, ZeRO-3)
runs each chunk under activation checkpointing instead (the logits are made again in the backward pass).

The result equals the full-logits loss up to float summation order; its gradients too (tests/unit/train/test_loss.py).

Per-token loss weights (a ``weight`` (b, s) entry of the batch, from a data recipe's ``reweight``): every path returns
``Σ w_t · nll_t / num_items``, where ``w_t`` is the weight of the *predicted* token t (labels and weights shift
together) and the caller passes ``num_items = Σ w_t`` over the trained tokens of the whole step. A weight of 2 then
counts exactly like two copies of the example (tests/unit/train/test_loss_weights.py). The fused path multiplies each
row of d loss / d logits by its weight in the forward pass. Without ``weight`` the loss is computed as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: int,
                   chunk_tokens: int = 0, run=None) -> torch.Tensor:
    """Loss of ``model`` (a transformers causal LM, possibly wrapped by PEFT) on ``batch``.

    Args:
        model: the causal LM.
        run: what the forward pass calls, when not ``model`` itself: a DeepSpeed engine around it (its forward
            prepares each micro-batch's backward; under ZeRO-3 a bare module call would make the gradients of
            accumulated micro-batches overwrite each other). The chunked loss calls it with
            ``output_hidden_states=True, logits_to_keep=1``: the decoder's normed output, and head logits for
            one position only.
        batch: ``input_ids``, ``labels`` and what the attention kernel needs (position ids, mask, cu_seq_lens);
            optionally ``weight`` (b, s) float, the per-token loss weights. Or, for a slice of a row
            (sequence parallelism), ``shift_labels`` (b, n): the token each position predicts, and optionally
            ``shift_weight`` (b, n), that token's weight.
        num_items: trained tokens in the whole optimizer step (the loss divisor); with ``weight``, the sum of the
            weights of the step's trained (predicted) tokens.
        chunk_tokens: 0 for the model's own loss; otherwise positions per chunk of the chunked loss.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "weight", "shift_labels", "shift_weight")}
    if "shift_labels" in batch:  # already aligned: position p predicts shift_labels[p] (a sequence-parallel slice)
        keep, targets, w = slice(None), batch["shift_labels"], batch.get("shift_weight")
    else:  # position p predicts token p + 1
        keep, targets, w = slice(None, -1), batch["labels"][:, 1:], batch.get("weight")
        w = w[:, 1:] if w is not None else None
    w = w.float() if w is not None else None  # (b, n): the predicted token's weight
    run = model if run is None else run
    if not chunk_tokens:
        if w is None and "labels" in batch:
            return run(**batch, num_items_in_batch=num_items).loss
        logits = run(**inputs).logits[:, keep].float()  # (b, n, v)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                              reduction="none")  # (b n,), 0 where ignored
        return (nll if w is None else nll * w.flatten()).sum() / num_items
    hidden = run(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, keep]  # (b, n, h)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if _fusable(head):
        b, n, h = hidden.shape
        total = _LinearCrossEntropy.apply(hidden.reshape(b * n, h), head.weight, targets.reshape(b * n),
                                          b * chunk_tokens, w.reshape(b * n) if w is not None else None)
        return total / num_items
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk_tokens):
        h = hidden[:, start : start + chunk_tokens]  # (b, c, h)
        t = targets[:, start : start + chunk_tokens]  # (b, c)
        cw = w[:, start : start + chunk_tokens] if w is not None else None  # (b, c)
        total = total + checkpoint(_chunk_nll, h, t, head, cw, use_reentrant=False)
    return total / num_items


def step_divisor(micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """The ``num_items`` of an optimizer step: its trained tokens (labels[:, 1:] != IGNORE), or with per-token
    ``weight`` the sum of those tokens' weights. The loss is then Σ w·nll / Σ w: duplicating an example and
    giving it weight 2 change numerator and denominator alike, so both give the same loss and gradients."""
    if "weight" not in micro_batches[0]:
        return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    return sum(float(b["weight"][:, 1:][b["labels"][:, 1:] != IGNORE].double().sum()) for b in micro_batches)


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    logits = head(hidden).float()  # (b, c, v): the only logits alive at a time
    if weight is None:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")  # (b c,)
    return (nll * weight.flatten()).sum()


def _fusable(head: torch.nn.Module) -> bool:
    """A head whose weight the fused loss may read directly: a plain Linear without bias, not partitioned by
    DeepSpeed ZeRO-3 (which gathers the weight only inside the module's own forward)."""
    return type(head) is torch.nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id")


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ over rows of CE(hidden @ weightᵀ, targets), ``rows`` rows at a time, gradients made in the forward pass.

    Shapes: hidden (n, h), weight (v, h), targets (n,) with IGNORE for untrained positions, token_weight (n,) fp32
    or None: then Σ token_weight · CE, each row's d loss / d logits scaled by its weight. Under autocast the
    matmuls run in the autocast dtype (as ``head(hidden)`` would) and the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        autocast = torch.is_autocast_enabled(hidden.device.type)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # (n, h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (v, h)
        valid = targets != IGNORE  # (n,)
        any_ignored = not bool(valid.all())  # one host sync per step, not one per chunk
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]  # (c, h)
            t, ok = targets[start : start + rows], valid[start : start + rows]  # (c,)
            logits = F.linear(h, weight).float()  # (c, v): the only logits alive
            safe = torch.where(ok, t, 0)[:, None]  # (c, 1)
            picked = logits.gather(1, safe).squeeze(1)  # (c,)
            # in place from here: logits -> exp(logits - max) -> softmax
            top = logits.amax(1, keepdim=True)  # (c, 1)
            probs = logits.sub_(top).exp_()
            norm = probs.sum(1, keepdim=True)  # (c, 1)
            nll = (top + norm.log()).squeeze(1) - picked  # (c,) logsumexp - target logit
            tw = token_weight[start : start + rows] if token_weight is not None else None  # (c,)
            total += torch.where(ok, nll if tw is None else nll * tw, 0).sum()
            if not (need_h or need_w):
                continue
            grad = probs.div_(norm)  # softmax = d CE / d logits + one-hot
            grad.scatter_add_(1, safe, -ok[:, None].to(grad.dtype))
            if any_ignored:
                grad.masked_fill_(~ok[:, None], 0.0)
            if tw is not None:
                grad.mul_(tw[:, None])  # d (w · CE) / d logits
            if not autocast:  # the weight's dtype (16-bit under DeepSpeed bf16); autocast picks its own
                grad = grad.to(weight.dtype)
            if need_h:
                grad_h[start : start + rows] = grad @ weight  # (c, h)
            if need_w:
                if grad.dtype == h.dtype == torch.float32 and not autocast:
                    grad_w.addmm_(grad.t(), h)  # (v, h), accumulated in place
                else:
                    grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)
