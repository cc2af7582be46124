"""Retrieval accuracy by the answer's first token (llmft/eval/first_token.py): answers are grouped by the first token
of " answer" as the tiny tokenizer splits it (it merges " 1" and " 2" with the space, not " 3".." 9"), scores add up
per group, the most frequent group comes first, and the keys the PI repro's larger sample draws are ones its
training avoids."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from llmft.eval.first_token import accuracy_by_first_token, first_token
from llmft.eval.ruler_tasks import ASSETS


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")


def test_answers_are_grouped_by_their_first_token_with_the_space(tok):
    # what the tokenizer does with each leading digit, read from its vocabulary: " 1" and " 2" are tokens, " 9" is not
    assert {d for d in "123456789" if len(tok.tokenize(f" {d}")) == 1} == {"1", "2"}
    assert [first_token(tok, a) for a in ("13136", "23136", "93136", " 40000")] == [" 1", " 2", " ", " "]
    got = accuracy_by_first_token(tok, [("13136", 1.0), ("23136", 0.0), ("93136", 1.0), ("43136", 1.0),
                                        ("2999999", 1.0), ("3999999", 0.0), ("5000000", 0.5)])
    assert list(got) == [" ", " 2", " 1"]  # the most frequent first, then by the token
    assert got[" "] == {"correct": 2.5, "n": 4, "accuracy": 2.5 / 4}
    assert got[" 2"] == {"correct": 1.0, "n": 2, "accuracy": 0.5}
    assert got[" 1"] == {"correct": 1.0, "n": 1, "accuracy": 1.0}
    assert accuracy_by_first_token(tok, []) == {}
    with pytest.raises(ValueError, match="expected a fraction in"):
        accuracy_by_first_token(tok, [("12345", 100.0)])  # a RULER score (0..100) passed unscaled


def test_the_larger_samples_keys_are_avoided_in_training():
    from llmft.eval.passkey import KEY_HIGH, KEY_LOW
    from llmft.repro import FULL, PASSKEY_DEPTHS, TARGET_SEED, eval_keys

    trials = FULL.target_samples // len(PASSKEY_DEPTHS)
    keys = np.random.default_rng(TARGET_SEED).integers(KEY_LOW, KEY_HIGH + 1, size=(1, len(PASSKEY_DEPTHS), trials))
    assert {str(k) for k in keys.flat} <= eval_keys()
