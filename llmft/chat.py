"""A multi-turn chat session: what ``llmft chat`` runs.

A conversation is rendered with the tokenizer's own chat template, or, for a base model that has none, with a
named one (llmft.data.chat). The history is kept within the model's context: before each
reply the oldest (user, assistant) turns are dropped until the rendered conversation leaves room for
``max_new_tokens``; the system prompt and the newest user turn always stay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from llmft.data.chat import chat_template, render
from llmft.generate import Completion, GenerationError, Sampling, context_length, generate

log = logging.getLogger(__name__)

class ChatSession:
    """A conversation with a model: :meth:`reply` adds a user turn and the model's answer."""

    def __init__(self, model, tokenizer, sampling: Sampling, template: str | None = None, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.template, ends = chat_template(tokenizer, template)
        self.sampling = dataclasses.replace(sampling, stop=tuple(sampling.stop) + ends)
        self.system = system
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        self.dropped = 0  # turns dropped so far to stay within the context

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def prompt(self) -> list[int]:
        """The rendered conversation, ending with the assistant's cue, its oldest turns dropped until it leaves
        ``max_new_tokens`` of the context.

        Raises:
            GenerationError: the system prompt and the newest user turn alone fill the context (nothing dropped).
        """
        ctx = context_length(self.model)
        system = [{"role": "system", "content": self.system}] if self.system else []
        turns = list(self.turns)
        ids = render(self.tokenizer, system + turns, self.template)
        while ctx is not None and len(ids) + self.sampling.max_new_tokens > ctx and len(turns) > 1:
            del turns[: 2 if len(turns) > 2 else 1]  # a (user, assistant) pair; never the newest user turn
            ids = render(self.tokenizer, system + turns, self.template)
        if ctx is not None and len(ids) >= ctx:
            raise GenerationError(f"this message makes the conversation {len(ids):,} tokens, the model's context is "
                                  f"{ctx:,}. Fix: send a shorter message (or /reset)")
        self.dropped += len(self.turns) - len(turns)
        self.turns = turns
        return ids

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        """Add the user's ``text``, generate the answer (streamed to ``on_text``), keep both in the history.

        Raises:
            GenerationError: the message does not fit the context (the history is left as it was).
        """
        self.turns.append({"role": "user", "content": text})
        before = self.dropped
        try:
            ids = torch.tensor([self.prompt()])
        except GenerationError:
            self.turns.pop()
            raise
        if self.dropped > before:
            log.info("history: dropped the %d oldest turn(s) to stay within the context", self.dropped - before)
        c = generate(self.model, self.tokenizer, ids, self.sampling, on_text)
        self.turns.append({"role": "assistant", "content": c.text})
        return c

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def save(self, path: Path) -> None:
        """The conversation as JSON (``{"messages": [...]}``, the layout ``format: chat`` data reads), written
        atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps({"messages": self.messages()}, ensure_ascii=False, indent=1) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
