"""Synthetic retrieval examples (llmft/data/synthetic.py): each prompt states its answer exactly once where the
question points (read back from the prompt text), lengths fall in the range asked, the kinds take turns, the
answers avoid the keys given, and the examples are seeded. Copy documents repeat one segment of single-token words
and numbers; long-range copies put a run of book words between the first two copies."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer

from llmft.config.sources import SourceSpec
from llmft.data.synthetic import KV_HEAD, copy_records, retrieval_records, vocabulary_words, write_retrieval
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


def test_whole_text_retrieval_files_hold_prompt_and_answer_as_one_document(tok, tmp_path):
    from llmft.data.sources import read_source

    records = retrieval_records(tok, 6, 64, 128, seed=3, kinds=("passkey", "kv"))
    whole = write_retrieval(tmp_path / "w.jsonl", records, whole=True)
    pairs = write_retrieval(tmp_path / "p.jsonl", records)
    docs = list(read_source(SourceSpec(format="jsonl", path=whole), on_error="stop"))
    assert [d.text for d in docs] == [r["prompt"] + r["completion"] for r in records]
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows == [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]


def test_vocabulary_words_are_one_token_each(tok):
    words = vocabulary_words(tok)
    assert len(words) >= 50 and words == sorted(set(words)) and min(len(w) for w in words) == 2
    assert set(vocabulary_words(tok, min_chars=3)) == {w for w in words if len(w) >= 3}
    assert all(len(tok(" " + w, add_special_tokens=False).input_ids) == 1 for w in words)


def test_copy_documents_repeat_one_segment_of_words_and_numbers(tok):
    words = vocabulary_words(tok)
    docs = copy_records(words, 300, seed=1, items=(4, 12), repeats=4)
    numbers = items = seven = 0
    for d in docs:
        lines = d["text"].split("\n")
        assert len(lines) == 4 and len(set(lines)) == 1
        seg = lines[0].split(" ")
        assert 4 <= len(seg) <= 12
        for x in seg:
            assert x in words or (x.isdigit() and 3 <= len(x) <= 7 and x[0] != "0"), x
        numbers += sum(x.isdigit() for x in seg)
        seven += sum(x.isdigit() and len(x) == 7 for x in seg)
        items += len(seg)
    assert 0.3 < numbers / items < 0.5  # number_share 0.4
    assert 0.85 < seven / numbers < 0.95  # uniform over 100..9,999,999: 90% have 7 digits
    short = copy_records(words, 50, seed=1, number_share=1.0, numbers=(10, 99))
    assert {len(x) for d in short for x in d["text"].split("\n")[0].split(" ")} == {2}
    assert len({d["text"] for d in docs}) == 300
    assert copy_records(words, 5, seed=1) == docs[:5] and copy_records(words, 5, seed=2) != docs[:5]


def test_long_range_copies_put_a_run_of_book_words_between_the_first_two_copies(tok):
    book = [f"w{i}" for i in range(2000)]  # word i is "w{i}": a run is consecutive numbers
    docs = copy_records(vocabulary_words(tok), 200, seed=0, repeats=3, gap=book, gap_words=(10, 600))
    lengths = []
    for d in docs:
        first, middle, *rest = d["text"].split("\n")
        assert rest == [first, first]
        run = [int(w[1:]) for w in middle.split(" ")]
        assert run == list(range(run[0], run[0] + len(run))) and 10 <= len(run) <= 600
        lengths.append(len(run))
    assert max(lengths) > 500 and min(lengths) < 100
    with pytest.raises(ValueError, match="fewer than gap_words"):
        copy_records(["a"], 1, gap=book[:100], gap_words=(0, 600))
    with pytest.raises(ValueError, match="repeats 1"):
        copy_records(["a"], 1, repeats=1)
    with pytest.raises(ValueError, match=r"numbers \(9, 1\)"):
        copy_records(["a"], 1, numbers=(9, 1))
