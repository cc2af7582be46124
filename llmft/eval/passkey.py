"""Passkey retrieval: can the model fetch a 5-digit key hidden at a given depth of a long filler context?

The prompt is the one of Landmark Attention (Mohtashami & Jaggi, 2023), as used by Position Interpolation and
LongLoRA: the task description (:data:`TASK`), filler sentences, the key line at a chosen depth, more filler, the
question. Parts are joined with newlines; an empty filler part is left out. Key 68224, 10 filler sentences, depth
0.6 (the key line after ``round(0.6 * 10) = 6`` sentences; the first line is :data:`TASK` in full)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass is green.
    The pass key is 68224. Remember it. 68224 is the pass key.
    The sky is blue. The sun is yellow. Here we go. There and back again.
    What is the pass key? The pass key is

Construction, for a target length ``L`` (tokens as the model's tokenizer counts them, special tokens such as
LLaMA's BOS included) and a depth ``d`` in [0, 1]:

1. the filler is the five sentences of :data:`FILLER` repeated in order, whole sentences only; the part after the
   key line continues the cycle (LongLoRA cuts the filler by characters and restarts it after the key);
2. ``n`` = the largest number of filler sentences for which the whole prompt, with the key line after
   ``k = round(d * n)`` of them, is still <= ``L`` tokens; found by tokenizing candidate prompts (a rate estimate,
   then bracketing and bisection: about 7 tokenizer calls at any length);
3. so the prompt is at most ``L`` tokens, short of it by less than one filler sentence (and a token), and the key
   sits at depth ``k / n`` of the filler, within half a sentence of ``d``: ``d = 0`` puts the key line right after
   the task description, ``d = 1`` right before the question.

Scoring (:func:`run_passkey`): greedy decoding, with the KV cache, of a few tokens after "The pass key is" (as many
as " 99999" takes, plus 2); the first 5-digit number of the continuation (its first run of digits, cut to 5
digits) is the answer, correct iff it equals the key. Keys are uniform in 10000..99999 from
``numpy.random.default_rng(seed)``, drawn for the whole grid up front, so a cell's keys do not depend on which
other cells run. A length above ``config.max_position_embeddings`` is reported with ``accuracy=None`` and the
reason unless the caller allows it (``allow_beyond_max_positions``: to measure extrapolation, or for dynamic NTK,
where transformers keeps the original length in the config); so is a length too short for the prompt.

Shapes: ``b`` batch, ``s`` sequence, ``v`` vocab.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llmft.eval.first_token import accuracy_by_first_token

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_LOW, KEY_HIGH = 10000, 99999  # 5-digit keys, both ends included


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt, built by :func:`passkey_prompt`."""

    text: str
    input_ids: list[int]
    key: int
    length: int
    """The target length asked for (the prompt has ``len(input_ids) <= length`` tokens)."""
    depth: float
    """The depth asked for, in [0, 1]."""
    filler_sentences: int
    """``n``: filler sentences in the prompt."""
    prefix_sentences: int
    """``k = round(depth * n)``: filler sentences before the key line."""
    key_token_index: int | None
    """Index in ``input_ids`` of the first token of the key line (None for a slow tokenizer)."""

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def _filler(start: int, count: int) -> str:
    return " ".join(FILLER[i % len(FILLER)] for i in range(start, start + count))


def prompt_text(key: int, n: int, depth: float) -> tuple[str, int]:
    """The passkey prompt with ``n`` filler lines, the key line after ``round(depth * n)`` of them; returns
    (text, filler lines before the key)."""
    k = round(depth * n)
    parts = [TASK, _filler(0, k), KEY_LINE.format(key=key), _filler(k, n - k), QUESTION]
    return "\n".join(p for p in parts if p), k


def passkey_prompt(tokenizer, length: int, depth: float, key: int | None = None,
                   rng: np.random.Generator | None = None) -> PasskeyPrompt:
    """The longest passkey prompt of at most ``length`` tokens with the key at ``depth`` of the filler.

    Args:
        tokenizer: the model's tokenizer (its special tokens, e.g. BOS, are counted).
        length: target length in tokens.
        depth: where the key line goes, as a fraction of the filler sentences (0 = first, 1 = last).
        key: the passkey; default a random 5-digit key from ``rng``.
        rng: generator for the key when ``key`` is None (default ``numpy.random.default_rng()``).

    Returns:
        A :class:`PasskeyPrompt`.

    Raises:
        ValueError: ``depth`` outside [0, 1], or ``length`` too short for the prompt without any filler.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth: got {depth}, expected a fraction in [0, 1] (0.5 = middle of the filler)")
    if key is None:
        key = int((rng if rng is not None else np.random.default_rng()).integers(KEY_LOW, KEY_HIGH + 1))

    def count(n: int) -> int:
        return len(tokenizer(prompt_text(key, n, depth)[0]).input_ids)

    base = count(0)
    if base > length:
        raise ValueError(f"passkey length {length}: the prompt without filler already has {base} tokens; "
                         f"use lengths >= {base}")
    # largest n with count(n) <= length: filler costs a near-constant number of tokens per sentence, so estimate n
    # from the rate (secant steps), bracket it by doubling steps, bisect; about 7 tokenizer calls at any length
    n, c = 20, count(20)
    for _ in range(3):
        guess = max(int((length - base) * n / max(c - base, 1)), 0)
        if guess == n:
            break
        n, c = guess, (count(guess) if guess else base)
    step = 1
    if c <= length:
        lo, hi = n, None
        while hi is None:
            if count(lo + step) <= length:
                lo, step = lo + step, step * 2
            else:
                hi = lo + step
    else:
        lo, hi = None, n
        while lo is None:
            cand = max(hi - step, 0)
            if cand == 0 or count(cand) <= length:  # n = 0 fits, checked above
                lo = cand
            else:
                hi, step = cand, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= length:
            lo = mid
        else:
            hi = mid
    text, k = prompt_text(key, lo, depth)
    enc = tokenizer(text)
    key_index = None
    if getattr(enc, "is_fast", False):
        key_index = enc.char_to_token(text.index(KEY_LINE.format(key=key)))
    return PasskeyPrompt(text=text, input_ids=list(enc.input_ids), key=key, length=length, depth=depth,
                         filler_sentences=lo, prefix_sentences=k, key_token_index=key_index)


@torch.no_grad()
def _greedy(model: torch.nn.Module, batch: list[list[int]], max_new_tokens: int, device) -> list[list[int]]:
    """Greedy continuations of equal-length prompts with the KV cache.

    Only the last position's logits are asked for (``logits_to_keep=1``): at 32k tokens the full logits of a 32k
    vocabulary would take GBs. Models whose forward does not take it get a plain call.
    """
    x = torch.tensor(batch, dtype=torch.long, device=device)  # (b, s)
    keep = {"logits_to_keep": 1}
    try:
        out = model(input_ids=x, use_cache=True, **keep)
    except TypeError:
        keep = {}
        out = model(input_ids=x, use_cache=True)
    new = []
    for i in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (b, v) -> (b, 1)
        new.append(nxt)
        if i + 1 < max_new_tokens:
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, **keep)
    return torch.cat(new, dim=1).tolist()  # (b, max_new_tokens)


def extract_answer(continuation: str, digits: int = 5) -> str | None:
    """The first ``digits``-digit number in the model's continuation: the first run of digits cut to ``digits``.

    Cutting matters when the decoding budget outlasts the key: " 1234567" answers "12345" (LongLoRA's test
    instead compares exactly as many tokens as the key has). A shorter run ("1234") is returned as is (wrong).
    """
    match = re.search(r"\d+", continuation)
    return match.group()[:digits] if match else None


def run_passkey(model: torch.nn.Module, tokenizer, lengths: list[int], depths: list[float], trials: int,
                seed: int = 0, device: torch.device | str | None = None, *, model_name: str | None = None,
                allow_beyond_max_positions: bool = False, max_new_tokens: int | None = None,
                batch_size: int = 1, progress: bool = True) -> dict:
    """Passkey accuracy on a grid of context lengths x key depths, ``trials`` random keys per cell.

    Args:
        model: a causal LM returning ``.logits`` (and a KV cache), already on ``device``.
        tokenizer: its tokenizer.
        lengths: target prompt lengths in tokens.
        depths: key depths in [0, 1].
        trials: keys per (length, depth) cell.
        seed: seeds the keys.
        device: where the inputs go; default the device of the model's first parameter.
        model_name: for the report; default ``model.name_or_path``.
        allow_beyond_max_positions: evaluate lengths above ``config.max_position_embeddings`` too.
        max_new_tokens: tokens generated per trial; default the tokens of " 99999" plus 2.
        batch_size: trials decoded together; only prompts of equal token count share a batch (no padding).
        progress: show a tqdm bar over trials.

    Returns:
        A JSON-ready dict: ``model``, ``max_position_embeddings``, ``lengths``, ``depths``, ``trials``, ``seed``,
        ``accuracy`` (over all evaluated trials, None if none ran), ``cells`` (one per length x depth, lengths
        outer: ``length``, ``depth``, ``accuracy`` or None, ``correct``, ``trials``, ``mean_tokens``, ``reason``
        why it was not run or None) and ``records`` (one per trial: ``length``, ``depth``, ``trial``, ``key``,
        ``answer``, ``correct``, ``tokens``, ``continuation``) and ``by_first_token`` (the trials by the first token
        of the key written after a word: llmft/eval/first_token.py).

    Raises:
        ValueError: ``trials`` or ``batch_size`` < 1, or a depth outside [0, 1].
    """
    if trials < 1 or batch_size < 1:
        raise ValueError(f"passkey trials / batch_size: got {trials} / {batch_size}, expected >= 1 each")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"passkey depth: got {d}, expected a fraction in [0, 1] (0.5 = middle of the filler)")
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    device = device if device is not None else next(model.parameters()).device
    max_pos = getattr(model.config, "max_position_embeddings", None)
    name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    if max_new_tokens is None:
        max_new_tokens = len(tokenizer(f" {KEY_HIGH}", add_special_tokens=False).input_ids) + 2
    keys = np.random.default_rng(seed).integers(KEY_LOW, KEY_HIGH + 1, size=(len(lengths), len(depths), trials))

    skip: dict[int, str] = {}
    for length in lengths:
        if max_pos is not None and length > max_pos and not allow_beyond_max_positions:
            skip[length] = (f"length {length} > max_position_embeddings {max_pos}; pass "
                            "allow_beyond_max_positions=True to evaluate it anyway")
    runnable = sum(1 for n in lengths if n not in skip) * len(depths) * trials
    was_training = model.training
    model.eval()
    cells, records = [], []
    bar = tqdm(total=runnable, desc="passkey", unit="trial", disable=not progress)
    try:
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                cell = {"length": length, "depth": depth, "accuracy": None, "correct": 0, "trials": 0,
                        "mean_tokens": None, "reason": skip.get(length)}
                cells.append(cell)
                if cell["reason"]:
                    continue
                try:
                    prompts = [passkey_prompt(tokenizer, length, depth, key=int(k)) for k in keys[i, j]]
                except ValueError as err:  # too short for the prompt: report, keep going
                    cell["reason"] = str(err)
                    bar.update(trials)
                    continue
                # batch only prompts of equal token count: no padding, the model sees exactly the prompt
                by_size: dict[int, list[int]] = {}
                for t, p in enumerate(prompts):
                    by_size.setdefault(p.n_tokens, []).append(t)
                cell_records = []
                for group in by_size.values():
                    for start in range(0, len(group), batch_size):
                        chunk = group[start : start + batch_size]
                        outs = _greedy(model, [prompts[t].input_ids for t in chunk], max_new_tokens, device)
                        for t, new in zip(chunk, outs):
                            key, continuation = prompts[t].key, tokenizer.decode(new, skip_special_tokens=True)
                            answer = extract_answer(continuation)
                            correct = answer == str(key)
                            cell["correct"] += int(correct)
                            cell["trials"] += 1
                            cell_records.append({"length": length, "depth": depth, "trial": t, "key": key,
                                                 "answer": answer, "correct": correct,
                                                 "tokens": prompts[t].n_tokens, "continuation": continuation})
                        bar.update(len(chunk))
                        bar.set_postfix(length=length, depth=depth, acc=f"{cell['correct'] / cell['trials']:.2f}")
                records += sorted(cell_records, key=lambda r: r["trial"])
                cell["accuracy"] = cell["correct"] / cell["trials"]
                cell["mean_tokens"] = float(np.mean([p.n_tokens for p in prompts]))
    finally:
        bar.close()
        model.train(was_training)
    scored = [c for c in cells if c["accuracy"] is not None]
    total = sum(c["trials"] for c in scored)
    return {
        "model": str(name), "max_position_embeddings": max_pos, "lengths": lengths, "depths": depths,
        "trials": trials, "seed": seed,
        "accuracy": sum(c["correct"] for c in scored) / total if total else None,
        "cells": cells, "records": records,
        "by_first_token": accuracy_by_first_token(tokenizer, [(str(r["key"]), float(r["correct"])) for r in records]),
    }


def accuracy_grid(results: dict) -> np.ndarray:
    """Accuracy as an array of shape (lengths, depths), NaN where a cell was not run."""
    grid = np.full((len(results["lengths"]), len(results["depths"])), np.nan)
    rows = {n: i for i, n in enumerate(results["lengths"])}
    cols = {d: j for j, d in enumerate(results["depths"])}
    for c in results["cells"]:
        if c["accuracy"] is not None:
            grid[rows[c["length"]], cols[c["depth"]]] = c["accuracy"]
    return grid


def _pct(depth: float) -> str:
    return f"{depth * 100:g}%"


def format_passkey_table(results: dict) -> str:
    """A markdown table of accuracy: one row per length, one column per depth, and the row mean."""
    grid = accuracy_grid(results)
    head = "| length \\ depth | " + " | ".join(_pct(d) for d in results["depths"]) + " | mean |"
    rule = "|---:|" + "---:|" * (len(results["depths"]) + 1)

    def fmt(a: float) -> str:
        return "n/a" if math.isnan(a) else f"{a:.0%}"

    rows = []
    for i, length in enumerate(results["lengths"]):
        row = grid[i]
        mean = float(np.nanmean(row)) if not np.isnan(row).all() else math.nan
        rows.append(f"| {length} | " + " | ".join(fmt(a) for a in row) + f" | {fmt(mean)} |")
    return "\n".join([head, rule, *rows])


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def plot_passkey_heatmap(results: dict, path: str | Path, figsize: tuple[float, float] = (8.0, 6.0),
                         dpi: int = 100) -> Path:
    """Write an accuracy heatmap PNG: x = key depth (%), y = context length (tokens), annotated cells.

    The image is ``figsize * dpi`` pixels (800 x 600 by default); cells that were not run are grey, "n/a".
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    grid = accuracy_grid(results)
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.subplots()
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    ax.set_xticks(range(len(results["depths"])), [f"{d * 100:g}" for d in results["depths"]])
    ax.set_yticks(range(len(results["lengths"])), [str(n) for n in results["lengths"]])
    ax.set_xlabel("passkey depth (%)")
    ax.set_ylabel("context length (tokens)")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            a = grid[i, j]
            dark = not np.isnan(a) and (a < 0.2 or a > 0.8)  # the ends of RdYlGn are dark: white text there
            ax.text(j, i, "n/a" if np.isnan(a) else f"{a:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="accuracy")
    overall = results.get("accuracy")
    ax.set_title(f"Passkey retrieval: {_short(results['model'])}\n{results['trials']} trials per cell, overall "
                 + ("n/a" if overall is None else f"{overall:.1%}"), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_passkey_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``passkey.json`` (the results), ``passkey.md`` (the table) and ``passkey.png`` (the heatmap).

    Returns:
        ``{"json": path, "md": path, "png": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "passkey.json", "md": out / "passkey.md", "png": out / "passkey.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    overall = results["accuracy"]
    lines = [f"# Passkey retrieval: {results['model']}", "",
             f"{results['trials']} trials per cell, seed {results['seed']}, max_position_embeddings "
             f"{results['max_position_embeddings']}; overall accuracy "
             + ("n/a" if overall is None else f"{overall:.1%}") + ".", "",
             format_passkey_table(results)]
    by_first = results.get("by_first_token") or {}
    if len(by_first) > 1:  # a tokenizer that starts keys with more than one token: where the misses are
        lines += ["", "By the key's first token, as written after a word (a model that misses only the keys that start "
                  "with a rare token reads the number but not which token begins it):", "",
                  "| first token | correct | trials | accuracy |", "|---|---:|---:|---:|",
                  *(f"| `{t!r}` | {c['correct']:g} | {c['n']} | {c['accuracy']:.0%} |" for t, c in by_first.items())]
    notes = sorted({f"- length {c['length']}: {c['reason']}" for c in results["cells"] if c["reason"]})
    if notes:
        lines += ["", "Not run:", *notes]
    paths["md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_passkey_heatmap(results, paths["png"])
    return paths
