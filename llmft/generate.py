"""Text generation with a trained model: what ``llmft generate`` and ``llmft chat`` run.

transformers' ``generate`` does the decoding (greedy or sampling, stop strings, chunked prefill); llmft adds what a
long-context user needs around it:

- the model as training left it: a run directory, a checkpoint or an adapter directory, with its RoPE config
  (:func:`llmft.model.load.load_trained`);
- the context check: a prompt at or beyond the model's context is refused with a message, and ``max_new_tokens``
  is shortened to what the context leaves;
- prompts prefilled ``prefill_chunk`` tokens at a time, so that a 32K+ prompt never runs one forward over all of
  its tokens (memory: the KV cache plus one chunk's activations);
- streaming that never prints a stop string (the text that could still turn into one is held back);
- a JSONL batch mode: one record per line in, one per line out; bad lines reported with file:line and skipped or
  stopped at (``on_error``), the output written to a temporary file and renamed when done.

Greedy output equals ``model.generate`` token for token (tests/unit/test_generate.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

log = logging.getLogger(__name__)


class GenerationError(Exception):
    """A prompt, option or input file that generation cannot use (the command exits 2 with the message)."""


@dataclass
class Sampling:
    """How tokens are chosen. ``temperature`` 0 is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # generation ends at the first of these; it is not part of the output
    prefill_chunk: int = 4096  # prompt tokens per forward while prefilling; 0: the whole prompt at once

    def problems(self) -> list[str]:
        """What is out of range, as ``--option: got X; expected Y`` lines."""
        out = []
        if self.max_new_tokens < 1:
            out.append(f"--max-new-tokens: got {self.max_new_tokens}; expected at least 1")
        if self.temperature < 0:
            out.append(f"--temperature: got {self.temperature}; expected 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            out.append(f"--top-p: got {self.top_p}; expected a value in (0, 1]")
        if self.top_k < 0:
            out.append(f"--top-k: got {self.top_k}; expected 0 (off) or more")
        if self.repetition_penalty <= 0:
            out.append(f"--repetition-penalty: got {self.repetition_penalty}; expected more than 0 (1: off)")
        if self.prefill_chunk < 0:
            out.append(f"--prefill-chunk: got {self.prefill_chunk}; expected 0 (whole prompt) or more tokens")
        if any(not s for s in self.stop):
            out.append("--stop: got an empty string; expected the text at which generation ends")
        return out

    def config(self, model, max_new_tokens: int):
        """The model's generation config with these settings."""
        cfg = copy.deepcopy(model.generation_config)
        sample = self.temperature > 0
        cfg.update(max_new_tokens=max_new_tokens, do_sample=sample, repetition_penalty=self.repetition_penalty,
                   prefill_chunk_size=self.prefill_chunk or None,
                   temperature=self.temperature if sample else None, top_p=self.top_p if sample else None,
                   top_k=self.top_k if sample else None)
        return cfg


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens, or the end of the context)
    token_ids: list[int] = field(default_factory=list)


def context_length(model) -> int | None:
    """Positions the model was trained for (``max_position_embeddings``, RoPE scaling applied)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


class _StopOnText(StoppingCriteria):
    """Ends generation once the decoded new text holds a stop string. transformers' ``stop_strings`` matches token
    strings, which byte-level vocabularies split into pieces that are not text; this decodes the last tokens."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.window = 2 * max(len(s) for s in stop) + 8  # tokens: enough to spell the longest stop string

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        text = self.tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), any(s in text for s in self.stop), dtype=torch.bool,
                          device=input_ids.device)


class _StopStreamer(TextStreamer):
    """transformers' TextStreamer (skips the prompt, emits whole words) that hands text to ``emit`` and holds back
    the tail that could still become a stop string, so a stop string is never shown."""

    def __init__(self, tokenizer, emit: Callable[[str], None], stop: tuple[str, ...]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.emit, self.stop = emit, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending, self.stopped = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.emit(self.pending[:cut])
            self.pending, self.stopped = "", True
            return
        keep = 0 if stream_end else self.hold
        ready = len(self.pending) - keep
        if ready > 0:
            self.emit(self.pending[:ready])
            self.pending = self.pending[ready:]


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, n) token ids of a prompt, with the tokenizer's BOS as in training."""
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate(model, tokenizer, prompt: str | torch.Tensor, s: Sampling,
             on_text: Callable[[str], None] | None = None, *, limit_to_context: bool = True) -> Completion:
    """Continue ``prompt`` (text, or (1, n) token ids). ``on_text`` receives the new text as it is decoded.
    ``limit_to_context=False`` lets prompt and answer run past the model's positions (to measure extrapolation).

    Raises:
        GenerationError: the prompt is empty, or fills the model's context.
    """
    ids = prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else prompt
    n = ids.shape[1]
    if n == 0:
        raise GenerationError("the prompt is empty. Fix: give some text")
    ctx = context_length(model) if limit_to_context else None
    if ctx is not None and n >= ctx:
        raise GenerationError(f"the prompt is {n:,} tokens and the model's context is {ctx:,}: no room to generate. "
                              f"Fix: shorten the prompt to under {ctx:,} tokens (or use a model extended further)")
    new = s.max_new_tokens if ctx is None else min(s.max_new_tokens, ctx - n)
    if new < s.max_new_tokens:
        log.warning("max_new_tokens %d shortened to %d: the prompt (%d tokens) and the answer must fit the context "
                    "of %d", s.max_new_tokens, new, n, ctx)
    torch.manual_seed(s.seed)
    device = next(model.parameters()).device
    streamer = _StopStreamer(tokenizer, on_text, s.stop) if on_text is not None else None
    t0 = time.perf_counter()
    with torch.no_grad():
        stopping = StoppingCriteriaList([_StopOnText(tokenizer, s.stop, n)] if s.stop else [])
        out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                             generation_config=s.config(model, new), stopping_criteria=stopping, streamer=streamer)
    seconds = time.perf_counter() - t0
    tokens = out[0, n:].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    cuts = [i for i in (text.find(x) for x in s.stop) if i >= 0]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    elif tokens and tokens[-1] in eos:
        finish = "eos"
    else:
        finish = "length"
    return Completion(text, n, len(tokens), seconds, finish, tokens)


def _records(path: Path):
    """(line number, record or None, problem) for each non-empty line of a JSONL file of prompts."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, None, f"not JSON ({e.msg})"
                continue
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                yield number, None, 'expected an object with a "prompt" string, e.g. {"id": 1, "prompt": "..."}'
                continue
            yield number, record, ""


def generate_file(model, tokenizer, src: Path, dst: Path, s: Sampling, on_error: str = "skip") -> dict:
    """Batch mode: one completion per JSONL record of ``src`` (``prompt``, optional ``id`` and ``max_new_tokens``),
    written to ``dst`` as ``{"id", "completion", "finish", "prompt_tokens", "new_tokens", "seconds"}`` (``id``: the
    record's, else its line number).

    The output goes to ``dst`` + ``.partial`` and is renamed to ``dst`` at the end; with ``on_error`` "stop" the
    records done before the bad line are still published.

    Returns:
        ``{"done", "bad": [(line, problem)], "new_tokens", "seconds", "tokens_per_second"}``.

    Raises:
        GenerationError: ``src`` cannot be read, or a bad line with ``on_error`` "stop".
    """
    if not src.is_file():
        raise GenerationError(f"--input: {src} is not a file. Fix: give a JSONL file, one {{\"prompt\": ...}} a line")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    stats = {"done": 0, "bad": [], "new_tokens": 0, "seconds": 0.0}
    total = sum(1 for line in open(src, encoding="utf-8") if line.strip())
    bar = tqdm(total=total, desc="generate", unit="prompt", disable=None)
    stop_error = None
    with open(tmp, "w", encoding="utf-8") as out:
        for number, record, problem in _records(src):
            bar.update(1)
            if record is not None:
                limit = record.get("max_new_tokens", s.max_new_tokens)
                if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                    problem = f'"max_new_tokens": got {limit!r}; expected a positive integer'
                    record = None
            if record is not None:
                try:
                    c = generate(model, tokenizer, record["prompt"], dataclasses.replace(s, max_new_tokens=limit))
                except GenerationError as e:
                    problem = str(e)
                else:
                    out.write(json.dumps({"id": record.get("id", number), "completion": c.text, "finish": c.finish,
                                          "prompt_tokens": c.prompt_tokens, "new_tokens": c.new_tokens,
                                          "seconds": round(c.seconds, 3)}, ensure_ascii=False) + "\n")
                    out.flush()
                    stats["done"] += 1
                    stats["new_tokens"] += c.new_tokens
                    stats["seconds"] += c.seconds
                    bar.set_postfix(tok_s=f"{stats['new_tokens'] / max(stats['seconds'], 1e-9):,.1f}")
            if problem:
                where = f"{src}:{number}: {problem}"
                stats["bad"].append((number, problem))
                if on_error == "stop":
                    stop_error = where
                    break
                log.warning("%s (skipped)", where)
    bar.close()
    os.replace(tmp, dst)
    stats["tokens_per_second"] = stats["new_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    if stop_error is not None:
        raise GenerationError(f"{stop_error}. Stopped (--on-error stop); the {stats['done']} completions before it are "
                              f"in {dst}. Fix the line, or pass --on-error skip")
    return stats
