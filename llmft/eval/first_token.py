"""Retrieval accuracy by the answer's first token: where a model's misses are, when they are not spread evenly.

A number the model must copy from its context starts, after the prompt's last word, with a token that holds the
space: in LLaMA-2's tokenizer always the bare space (its digits are split), but a BPE tokenizer trained on little
text may merge the space with some digits (" 1", " 2") and not with others. The model then has to pick one of
several first tokens from what it read, and a model that learned the common one as a prior misses exactly the
answers that start with a rare one. ``llmft repro pi`` reports its 8C retrieval this way (docs/results/pi_tiny.md).
"""

from __future__ import annotations

from collections.abc import Iterable


def first_token(tokenizer, answer: str) -> str:
    """The first token of `` answer`` (the answer as generated after a word, with its space), decoded."""
    ids = tokenizer(f" {answer.strip()}", add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:1])


def accuracy_by_first_token(tokenizer, scored: Iterable[tuple[str, float]]) -> dict[str, dict]:
    """``{first token: {"correct", "n", "accuracy"}}`` over ``(answer, score in [0, 1])`` pairs, the most frequent
    first token first (ties by the token).

    Raises:
        ValueError: a score outside [0, 1].
    """
    out: dict[str, dict] = {}
    for answer, s in scored:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"score of answer {answer!r}: got {s}, expected a fraction in [0, 1]")
        cell = out.setdefault(first_token(tokenizer, answer), {"correct": 0.0, "n": 0})
        cell["correct"] += s
        cell["n"] += 1
    for cell in out.values():
        cell["accuracy"] = cell["correct"] / cell["n"]
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["n"], kv[0])))
