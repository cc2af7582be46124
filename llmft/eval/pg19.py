"""PG-19 books for perplexity: read (a directory of Gutenberg ``<id>.txt``, the Hugging Face rows, or a
``datasets`` id), each tokenized on its own (no BOS) with the UTF-8 bytes every token stands for, so that
:mod:`llmft.eval.ppl` can score perplexity per byte.

The bytes of a token are the raw bytes it stands for (byte-level BPE: one per character of the token string;
SentencePiece: ``▁`` is a space, ``<0xNN>`` one byte), so the bytes of all tokens add up to the bytes of the
book and a scored span's bytes are exactly the bytes of its text, even where a character is split across
tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmft.eval.ppl import Book


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


