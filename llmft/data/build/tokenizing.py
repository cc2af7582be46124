"""Tokenizing documents into examples (prompt masked, EOS appended), in this process or in ``num_proc`` worker processes
that give the same output in the same order."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from transformers import PreTrainedTokenizerBase  # (AutoTokenizer imports torch: where it is used)

from llmft.config.data import Dedup
from llmft.data.build.common import CHECKPOINT
from llmft.data.build.reading import _text
from llmft.data.dedup import Features, Shingler
from llmft.data.dedup import features as dedup_features
from llmft.data.packing import Example, special_ids
from llmft.data.sources import DataError, Document
from llmft.data.transforms import ni_fewshot


def encode_documents(docs: list[Document], tokenizer: PreTrainedTokenizerBase, add_eos: bool = True,
                     max_tokens: int | None = None) -> list[Example]:
    """Each document as an :class:`Example` ``[BOS] prompt text [EOS]``, trained on ``text [EOS]`` (plain text has
    no prompt, so every token is trained): how every build turns documents into tokens. A conversation (format
    chat) is rendered with its chat template and trained on its assistant turns
    (:func:`llmft.data.chat.encode_conversation`; cut at a turn boundary to ``max_tokens``)."""
    if any(d.messages is not None for d in docs):
        plain = [d for d in docs if d.messages is None]
        encoded = iter(encode_documents(plain, tokenizer, add_eos) if plain else [])
        return [next(encoded) if d.messages is None else _encode_chat(d, tokenizer, max_tokens) for d in docs]
    bos, eos = special_ids(tokenizer, add_eos)
    prompts = _encode(tokenizer, [d.prompt for d in docs]) if any(d.prompt for d in docs) \
        else [[] for _ in docs]  # plain text: no prompts to encode
    texts = _encode(tokenizer, [d.text for d in docs])
    return [Example.from_parts(bos, p, t, eos) for p, t in zip(prompts, texts)]


def _encode_chat(doc: Document, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None) -> Example:
    """A conversation document as an example trained on its assistant turns.

    Raises:
        DataError: its chat template is unknown, or the tokenizer has none and the source names none.
    """
    from llmft.data.chat import ChatTemplateError, encode_conversation

    try:
        return encode_conversation(tokenizer, doc.messages, doc.chat["template"], doc.chat["train_on"], max_tokens)
    except ChatTemplateError as e:
        raise DataError(f"{doc.where}: {e} (set chat_template: chatml or llama2 on the chat source)") from None


class _Tokenize:
    """The build's per-batch work: (transform, documents) -> examples (:func:`encode_documents`, or NI few-shot
    sequences), or ("dedup", texts) -> their :class:`llmft.data.dedup.Features`. Picklable, so the same object runs
    in the worker processes of ``num_proc``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, seq_len: int, add_eos: bool,
                 dedup: Dedup | None = None):
        self.tokenizer, self.seq_len, self.add_eos, self.dedup = tokenizer, seq_len, add_eos, dedup
        self._shingler: Shingler | None = None  # made in the process that uses it (its word cache is not sent)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shingler": None}

    def __call__(self, job: tuple[str, list]) -> list[Example] | Features:
        transform, docs = job
        if transform == "dedup":  # texts
            self._shingler = self._shingler or Shingler(self.dedup.shingle_size)
            return dedup_features(docs, self.dedup, self._shingler)
        # documents: their features and each one's tokens as encode_documents makes them
        if transform == "dedup+tokens":
            self._shingler = self._shingler or Shingler(self.dedup.shingle_size)
            lengths = np.array([len(e) for e in encode_documents(docs, self.tokenizer, self.add_eos, self.seq_len)],
                               np.int64)
            return dedup_features([_text(d) for d in docs], self.dedup, self._shingler), lengths
        if transform == "ni_fewshot":  # many instances of a task per sequence, after one header
            return ni_fewshot(docs, self.tokenizer, self.seq_len, self.add_eos)
        return encode_documents(docs, self.tokenizer, self.add_eos, self.seq_len)


_WORKER: _Tokenize | None = None


def _worker_init(tokenize: _Tokenize) -> None:
    global _WORKER
    _WORKER = tokenize


def _worker_run(job: tuple[str, list[Document]]) -> list[Example]:
    return _WORKER(job)


@contextmanager
def _tokenizer_pool(tokenize: _Tokenize, num_proc: int) -> Iterator[Callable[[Iterable], Iterator[list[Example]]]]:
    """A function mapping batches to examples in order: in this process (``num_proc`` 1) or in ``num_proc``
    spawned workers, with at most ``4 * num_proc`` batches in flight so memory stays bounded while this
    process keeps reading. A :data:`CHECKPOINT` among the batches comes out after every batch before it, before
    any batch after it is read."""
    if num_proc == 1:
        yield lambda jobs: (job if job is CHECKPOINT else tokenize(job) for job in jobs)
        return
    # spawn, not fork: the Rust tokenizer's thread pool does not survive a fork. One Rust thread per worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with mp.get_context("spawn").Pool(num_proc, initializer=_worker_init, initargs=(tokenize,)) as pool:

        def ordered(jobs: Iterable) -> Iterator[list[Example]]:
            pending: deque = deque()
            for job in jobs:
                if job is CHECKPOINT:
                    while pending:
                        yield pending.popleft().get()
                    yield job
                    continue
                pending.append(pool.apply_async(_worker_run, (job,)))
                if len(pending) >= 4 * num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield ordered


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of a batch of texts, no special tokens: the fast tokenizer's own batch encoder (parallel in
    Rust) when there is one, skipping the per-encoding Python conversion of the transformers wrapper.
    ``encode_batch_fast`` (tokenizers >= 0.20) also skips the character offsets, which nothing here uses:
    the same ids (tested), about 25% less time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
