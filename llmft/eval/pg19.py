"""Perplexity per byte of whole books at several context lengths (PG-19), in two protocols.

Each book is tokenized on its own (no BOS) and scored by the model at context length L:

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

The bytes of a token are the raw bytes it stands for (byte-level BPE: one per character of the token string;
SentencePiece: ``▁`` is a space, ``<0xNN>`` one byte), so the bytes of all tokens add up to the bytes of the
book and a scored span's bytes are exactly the bytes of its text, even where a character is split across
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: byte value -> the printable character byte-level BPE writes for it."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """(vocab,) raw UTF-8 bytes each token stands for, or None when the tokenizer's scheme is not recognized.

    Byte-level BPE (GPT-2, LLaMA-3, llmft's tiny tokenizer): one character of the token string per byte.
    SentencePiece-style (LLaMA-2): ``▁`` is a space, ``<0xNN>`` byte-fallback tokens are one byte. Special
    tokens are 0 bytes. A character split across tokens is then counted where its bytes are, exactly.
    """
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder"))
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    if '"ByteLevel"' in decoder:
        byte_chars = set(_bytes_to_unicode().values())
        for token, i in vocab.items():
            if token in special:
                continue
            if not all(c in byte_chars for c in token):
                return None
            lengths[i] = len(token)
    elif '"ByteFallback"' in decoder or '"Metaspace"' in decoder or "\u2581" in decoder:
        for token, i in vocab.items():
            if token in special:
                continue
            is_byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            lengths[i] = 1 if is_byte else len(token.replace("\u2581", " ").encode("utf-8"))
    else:
        return None
    return lengths


def tokenize_book(tokenizer, name: str, text: str, byte_lengths: np.ndarray | None = None) -> Book:
    """Token ids of ``text`` (no special tokens) and the bytes each token stands for.

    Bytes come from the token's own byte string (:func:`token_byte_lengths`); for an unrecognized tokenizer, or
    when those do not add up to the text (a normalizer changed it), from the fast tokenizer's character offsets:
    each character's bytes go to the first token whose span reaches it.

    Args:
        byte_lengths: ``token_byte_lengths(tokenizer)`` when tokenizing many books with one tokenizer (computed
            here otherwise).

    Raises:
        ValueError: the tokenizer is neither recognized nor a fast tokenizer (no offsets).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=getattr(tokenizer, "is_fast", False))
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    table = token_byte_lengths(tokenizer) if byte_lengths is None else byte_lengths
    if table is not None:
        nbytes = table[ids]
        # SentencePiece may add one leading space (its dummy prefix) that the text does not have
        if 0 <= int(nbytes.sum()) - len(text.encode("utf-8")) <= 1:
            return Book(name, ids, nbytes)
    if "offset_mapping" not in enc:
        raise ValueError(f"{type(tokenizer).__name__}: cannot tell the bytes of each token (not a fast tokenizer)")
    nbytes = np.zeros(len(ids), dtype=np.int64)
    covered = 0  # characters [0, covered) belong to earlier tokens
    for i, (_, end) in enumerate(enc["offset_mapping"]):
        if end > covered:
            nbytes[i] = len(text[covered:end].encode("utf-8"))
            covered = end
    return Book(name, ids, nbytes)


def load_books(data: str | Path, tokenizer, max_docs: int | None = None) -> list[Book]:
    """PG-19 books from a directory of ``<id>.txt`` (Gutenberg header/footer stripped), the Hugging Face layout
    (jsonl/parquet rows with ``short_book_title`` and ``text``) or a ``datasets`` hub id (e.g. ``deepmind/pg19``,
    test split), in the order the PG-19 reader yields them; at most ``max_docs``.

    Raises:
        llmft.data.sources.SourceError: unreadable data.
    """
    from llmft.config.sources import SourceSpec
    from llmft.data.sources import read_source

    local = Path(data).expanduser()
    spec = SourceSpec(format="pg19", path=local) if local.exists() else \
        SourceSpec(format="pg19", hub=str(data), split="test")
    books, table = [], token_byte_lengths(tokenizer)  # the vocabulary's byte lengths, once for all books
    for doc in read_source(spec, on_error="stop"):
        name = doc.meta.get("book_id") or doc.meta.get("short_book_title") or doc.where
        books.append(tokenize_book(tokenizer, str(name), doc.text, table))
        if max_docs is not None and len(books) >= max_docs:
            break
    return books


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
               device: torch.device | str = "cpu") -> dict:
    """NLL sum, scored tokens and scored bytes of one book at context ``length``.

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
