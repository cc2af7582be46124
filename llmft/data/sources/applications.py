"""The two long-context applications Together built on LLaMA-2-7B-32K, as training data and evaluation prompts:
book summarization (BookSum) and multi-document question answering (the "Lost in the Middle" protocol).

Together's OpenChatKit examples train on ``togethercomputer/Long-Data-Collections`` (``fine-tune/booksum.jsonl.zst``,
``fine-tune/natural_questions_10_200_docs.jsonl.zst``): one ``text`` field a record, documents, question and
answer in one string, joined and cut into 32K windows, so the loss covers the documents too and documents run into
each other. Here each record becomes one prompt/completion example: the documents and the question are context
(conditioned on, no loss) and only the answer or summary is trained; with ``packing: isolated`` an example never
sees another. Formats (each a JSON-lines record, from files or a hub):

- ``long_data_collections``: ``{"text"}`` split at its last answer cue (``answer_marker``; default: the last
  "\\nA:" or "\\nAnswer:"): the text before it and the cue are the prompt, the rest the completion.
- ``booksum``: BookSum's chapter-level rows, ``{"chapter", "summary_text"}`` (or ``"text"`` / ``"summary"``):
  the chapter and :data:`SUMMARY_CUE` are the prompt, the summary the completion.
- ``lost_in_the_middle``: ``{"question", "answers", "ctxs": [{"title", "text", "isgold"}]}`` (the paper's
  ``nq-open-*`` files): the question with its retrieved passages as in the paper's ``qa.prompt``
  (:func:`mdqa_prompt`), the first gold answer the completion.
"""

from __future__ import annotations

import re
import string

SUMMARY_CUE = "\n\nQ: Can you write an appropriate summary of the above paragraphs?\nA:"
ANSWER_CUES = ("\nA:", "\nAnswer:")
MDQA_INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
                    "(some of which might be irrelevant).")


def summary_prompt(chapter: str) -> str:
    """The summarization prompt: the text, then the request (as in Long-Data-Collections' BookSum examples)."""
    return chapter.rstrip() + SUMMARY_CUE


def mdqa_prompt(question: str, ctxs: list[dict]) -> str:
    """The multi-document QA prompt of "Lost in the Middle" (its ``qa.prompt``): the instruction, the passages as
    ``Document [i](Title: ...) text``, the question, and ``Answer:``."""
    docs = "\n".join(f"Document [{i}](Title: {c.get('title', '')}) {c['text']}" for i, c in enumerate(ctxs, 1))
    return f"{MDQA_INSTRUCTION}\n\n{docs}\n\nQuestion: {question}\nAnswer:"


def split_at_answer(text: str, marker: str | None = None) -> tuple[str, str] | None:
    """(prompt up to and including the last answer cue, the answer after it); None when there is no cue or no
    answer after it."""
    cues = (marker,) if marker else ANSWER_CUES
    cut = max(((text.rfind(c), c) for c in cues), key=lambda x: x[0])
    if cut[0] < 0:
        return None
    end = cut[0] + len(cut[1])
    answer = text[end:]
    return (text[:end], answer) if answer.strip() else None


# ------------------------------------------------------------------------------- the answer metric of the paper


def normalize_answer(s: str) -> str:
    """SQuAD's normalization, as "Lost in the Middle" scores: lower case, no punctuation, no articles, single
    spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_in(prediction: str, answers: list[str]) -> bool:
    """The paper's accuracy: some gold answer, normalized, appears in the normalized prediction."""
    pred = normalize_answer(prediction)
    return any(normalize_answer(a) in pred for a in answers if normalize_answer(a))
