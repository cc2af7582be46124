"""Synthetic retrieval examples (llmft/data/synthetic.py): each prompt states its answer exactly once where the
question points (read back from the prompt text), lengths fall in the range asked, the kinds take turns, the
answers avoid the keys given, and the examples are seeded."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from llmft.data.synthetic import KV_HEAD, retrieval_records
from llmft.eval.passkey import QUESTION, TASK
from llmft.eval.ruler_tasks import ASSETS


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")


def _answer_from_prompt(r: dict) -> str:
    """What the prompt says the answer is, read independently of the generator."""
    p = r["prompt"]
    if r["kind"] == "passkey":
        assert p.startswith(TASK) and p.endswith(QUESTION)
        (key,) = set(re.findall(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", p))
        return key
    if r["kind"] == "niah":
        key = re.search(r"What is the special magic number for (\S+) mentioned", p).group(1)
        (value,) = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", p)
        return value
    assert p.startswith(KV_HEAD)
    name = re.search(r"What is the number of (\S+)\? The number of \1 is$", p).group(1)
    (value,) = re.findall(rf"^{re.escape(name)}: (\d+)$", p, flags=re.M)
    return value


def test_every_prompt_holds_its_answer_and_the_lengths_are_in_range(tok):
    recs = retrieval_records(tok, 60, 200, 400, seed=3)
    assert [r["kind"] for r in recs[:6]] == ["passkey", "niah", "kv"] * 2
    for r in recs:
        answer = r["completion"].strip(" .")
        assert r["completion"] == f" {answer}." and _answer_from_prompt(r) == answer
        assert r["tokens"] == len(tok(r["prompt"]).input_ids) and r["tokens"] <= 400
    for kind in ("passkey", "niah", "kv"):
        lengths = [r["tokens"] for r in recs if r["kind"] == kind]
        assert min(lengths) >= 150 and max(lengths) - min(lengths) > 60  # spread over the range, not one size
    # short ranges give the smallest prompt of each kind instead of failing; a range below it is an error
    assert all(r["tokens"] <= 200 for r in retrieval_records(tok, 9, 10, 200, seed=0))
    with pytest.raises(ValueError, match="cannot hold the smallest prompt"):
        retrieval_records(tok, 3, 10, 60, seed=0)


def test_answers_avoid_the_given_keys_and_examples_are_seeded(tok):
    first = retrieval_records(tok, 30, 150, 300, seed=1)
    avoid = frozenset(r["completion"].strip(" .") for r in first)
    again = retrieval_records(tok, 30, 150, 300, seed=1, avoid=avoid)
    assert not avoid & {r["completion"].strip(" .") for r in again}
    assert retrieval_records(tok, 30, 150, 300, seed=1) == first
    assert retrieval_records(tok, 3, 150, 300, seed=2, kinds=("kv",))[0]["kind"] == "kv"
    with pytest.raises(ValueError, match="retrieval kinds"):
        retrieval_records(tok, 3, 150, 300, kinds=("copy",))
