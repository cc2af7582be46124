"""Perplexity by context length on a token stream (non-overlapping windows).

For every length L the same leading span of the stream is scored (``max_windows`` windows of the longest
length), split into windows of L tokens; each window predicts its own L - 1 next tokens. Lengths that divide
the longest one therefore score exactly the same text, so the numbers are comparable across lengths.
"""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def perplexity_by_length(model: torch.nn.Module, tokens: np.ndarray, lengths: list[int], max_windows: int,
                         device: torch.device | str = "cpu", batch_size: int = 1) -> dict[int, dict]:
    """Token perplexity of ``model`` at each context length.

    Args:
        model: a causal LM returning ``.logits``.
        tokens: the evaluation token stream, shape (n,).
        lengths: context lengths L to score.
        max_windows: number of windows of the longest length; the span scored is the same for every L.
        device: where to run.
        batch_size: windows per forward pass.

    Returns:
        ``{L: {"ppl", "nll", "scored_tokens", "windows"}}``; a length whose window does not fit in the stream
        reports ``windows == 0`` and ``ppl == nan``.
    """
    was_training = model.training
    model.eval()
    longest = max(lengths)
    span = min(len(tokens) // longest, max_windows) * longest
    if span == 0:  # stream shorter than the longest window: score what fits for each length
        span = len(tokens)
    stream = torch.as_tensor(np.asarray(tokens[:span], dtype=np.int64))
    results = {}
    for length in sorted(lengths):
        n = span // length
        if n == 0:
            results[length] = {"ppl": math.nan, "nll": math.nan, "scored_tokens": 0, "windows": 0}
            continue
        windows = stream[: n * length].view(n, length)  # (n, L)
        nll_sum, count = 0.0, 0
        for i in range(0, n, batch_size):
            x = windows[i : i + batch_size].to(device)  # (b, L)
            logits = model(input_ids=x).logits.float()  # (b, L, v)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
            )
            nll_sum += float(nll)
            count += x[:, 1:].numel()
        results[length] = {"ppl": math.exp(nll_sum / count), "nll": nll_sum / count, "scored_tokens": count,
                           "windows": n}
    model.train(was_training)
    return results


def format_table(columns: dict[str, dict[int, dict]]) -> str:
    """A markdown table: one row per length, one column per model (token perplexity)."""
    lengths = sorted({n for col in columns.values() for n in col})
    head = "| context | " + " | ".join(columns) + " |"
    rule = "|---:|" + "---:|" * len(columns)
    rows = [f"| {n} | " + " | ".join(f"{col[n]['ppl']:.2f}" if n in col else "-" for col in columns.values()) + " |"
            for n in lengths]
    return "\n".join([head, rule, *rows])
