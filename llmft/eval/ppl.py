"""Perplexity: the one scorer of the project, used by ``llmft eval --ppl``, the evaluation during training, the
quickstart and ``llmft repro``.

A token sequence (a book, or a held-out token stream) is scored by the model at context length L in one of two
protocols:

``windows``  non-overlapping windows of exactly L tokens; each window predicts its own L - 1 next tokens (its
             first token is context only). The tail of a book after its last whole window is not scored.

             tokens   [t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9]         L = 4
             scored       x  x  x  |     x  x  x  |  (tail)

``sliding``  the protocol of the Position Interpolation and YaRN papers: windows of L tokens start every
             ``stride`` tokens; the first window scores all but its first token, every later window scores only
             the tokens no earlier window scored (the last ``stride``), each with at least L - stride tokens of
             context (stride < L). Every token but the book's first is scored exactly once.

             window 0 [t0 .. t7]        scores t1..t7              L = 8, stride = 2
             window 1    [t2 .. t9]     scores t8, t9 (context t2..t7)
             window 2       [t4 .. t11] scores t10, t11 ...

Metrics, summed over all books (a book shorter than L is listed under ``too_short`` for that L, not scored):

    ppl_per_byte = exp( sum of scored tokens' NLL / UTF-8 bytes of those tokens' text )   (Together's metric)
    token_ppl    = exp( sum of scored tokens' NLL / number of scored tokens )

The bytes of a token come with the sequence (:mod:`llmft.eval.pg19` computes them for books); a token stream
without them (:func:`perplexity_by_length`, the held-out tokens of a build) reports token perplexity only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

MODES = ("windows", "sliding")


@dataclass
class Book:
    """One tokenized book: token ids and the UTF-8 bytes each token covers, both shape (n,)."""

    name: str
    ids: np.ndarray
    nbytes: np.ndarray


def _scored_positions(n: int, length: int, mode: str, stride: int) -> list[tuple[int, int, int]]:
    """(window start, window end, first scored position) for one book of n tokens; positions are book indices
    and a window scores [first scored, end)."""
    if mode == "windows":
        return [(s, s + length, s + 1) for s in range(0, n - length + 1, length)]
    out, done = [], 0  # done: positions [0, done) scored or context-only (position 0)
    for start in range(0, n, stride):
        end = min(start + length, n)
        if end <= done:
            break
        out.append((start, end, max(done, start + 1)))
        done = end
        if end == n:
            break
    return out


def nll_sum_by_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of ``logits`` (k, v) against ``targets`` (k,), in fp32, a block of rows at a time.

    On CPU a block is 64 rows: its fp32 copy and log-softmax (64 x 32000 x 4 B = 8 MB) stay in cache, where one
    (k, v) log-softmax is written to memory and read back (at k = 2048, v = 32000 that took 7x as long on the bench
    machine, a tenth of the whole scoring; bench/eval_throughput.py). On an accelerator 4096 rows (few launches,
    bounded fp32 copies of 16-bit logits).
    """
    rows = 64 if logits.device.type == "cpu" else 4096
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], rows):
        total += torch.nn.functional.cross_entropy(logits[i : i + rows].float(), targets[i : i + rows],
                                                   reduction="sum")
    return total


@torch.no_grad()
def score_book(model: torch.nn.Module, book: Book, length: int, mode: str = "windows", stride: int = 256,
               device: torch.device | str = "cpu", window_nll: Callable | None = None) -> dict:
    """NLL sum, scored tokens and scored bytes of one book at context ``length``.

    ``window_nll(model, x, first)``: the NLL sum of the tokens ``x[0, first:]`` of a window x (1, w), in place of
    one forward over the whole window here (sequence parallelism: ``SequenceParallel.window_nll``).

    Returns:
        ``{"nll", "tokens", "bytes", "windows"}``; all 0 when the book is shorter than ``length``.

    Raises:
        ValueError: unknown mode, or a stride outside 1..length.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "sliding" and not 0 < stride < length:
        raise ValueError(f"stride must be in 1..{length - 1} (below the window length {length}, so every scored "
                         f"token has context in its window), got {stride}")
    nll_sum, tokens, nbytes = 0.0, 0, 0
    spans = _scored_positions(len(book.ids), length, mode, stride) if len(book.ids) >= length else []
    ids = torch.from_numpy(book.ids)
    for start, end, first in spans:
        x = ids[start:end].to(device)[None]  # (1, w)
        if window_nll is not None:
            nll_sum += window_nll(model, x, first - start)
        else:
            logits = model(input_ids=x, use_cache=False).logits[0]  # (w, v)
            # position p is predicted by the logits at p - 1
            pred = logits[first - start - 1 : end - start - 1]  # (k, v)
            target = x[0, first - start : end - start]  # (k,)
            nll_sum += float(nll_sum_by_rows(pred, target))
        tokens += end - first
        nbytes += int(book.nbytes[first:end].sum())
    return {"nll": nll_sum, "tokens": tokens, "bytes": nbytes, "windows": len(spans)}


def evaluate_ppl(model: torch.nn.Module, books: list[Book], lengths: list[int], mode: str = "windows",
                 stride: int = 256, device: torch.device | str = "cpu") -> dict[int, dict]:
    """Perplexity per byte and token perplexity at every length, over all books.

    Returns:
        ``{L: {"ppl_per_byte", "token_ppl", "bits_per_byte", "nll", "tokens", "bytes", "windows", "books",
        "too_short"}}``; a length no book reaches has NaN metrics and every book under ``too_short``.
    """
    was_training = model.training
    model.eval()
    results = {}
    total = sum(len(_scored_positions(len(b.ids), n, mode, stride)) for n in lengths for b in books if len(b.ids) >= n)
    bar = tqdm(total=total, desc=f"ppl ({mode})", unit="window", disable=None, leave=False)
    for length in sorted(lengths):
        agg = {"nll": 0.0, "tokens": 0, "bytes": 0, "windows": 0}
        too_short = [b.name for b in books if len(b.ids) < length]
        for book in books:
            if len(book.ids) < length:
                continue
            r = score_book(model, book, length, mode, stride, device)
            for k in agg:
                agg[k] += r[k]
            bar.update(r["windows"])
        scored = agg["tokens"] > 0
        results[length] = {
            **agg,
            "ppl_per_byte": math.exp(agg["nll"] / agg["bytes"]) if scored else math.nan,
            "token_ppl": math.exp(agg["nll"] / agg["tokens"]) if scored else math.nan,
            "bits_per_byte": agg["nll"] / agg["bytes"] / math.log(2) if scored else math.nan,
            "books": len(books) - len(too_short),
            "too_short": too_short,
        }
    bar.close()
    model.train(was_training)
    return results


def perplexity_by_length(model: torch.nn.Module, tokens: np.ndarray, lengths: list[int], max_windows: int,
                         device: torch.device | str = "cpu", window_nll: Callable | None = None) -> dict[int, dict]:
    """Token perplexity of ``model`` at each context length on a token stream, non-overlapping windows.

    For every length L the same leading span of the stream is scored (``max_windows`` windows of the longest
    length), split into windows of L tokens (:func:`score_book`, ``windows`` protocol); lengths that divide the
    longest one therefore score exactly the same text, so the numbers are comparable across lengths.

    Args:
        model: a causal LM returning ``.logits``.
        tokens: the evaluation token stream, shape (n,).
        lengths: context lengths L to score.
        max_windows: number of windows of the longest length; the span scored is the same for every L.
        device: where to run.
        window_nll: how a window is scored, if not by one forward here (see :func:`score_book`).

    Returns:
        ``{L: {"ppl", "nll", "scored_tokens", "windows"}}`` (``nll`` per scored token); a length whose window does
        not fit in the stream reports ``windows == 0`` and ``ppl == nan``.
    """
    was_training = model.training
    model.eval()
    longest = max(lengths)
    span = min(len(tokens) // longest, max_windows) * longest
    if span == 0:  # stream shorter than the longest window: score what fits for each length
        span = len(tokens)
    stream = Book("held-out", np.asarray(tokens[:span], dtype=np.int64), np.zeros(span, dtype=np.int64))
    results = {}
    for length in sorted(lengths):
        r = score_book(model, stream, length, "windows", device=device, window_nll=window_nll)
        nll = r["nll"] / r["tokens"] if r["tokens"] else math.nan
        results[length] = {"ppl": math.exp(nll), "nll": nll, "scored_tokens": r["tokens"], "windows": r["windows"]}
    model.train(was_training)
    return results
