"""Conversation data (``format: chat``): the trained tokens are exactly the assistant turns of real templates
(ChatML and LLaMA-2 chat), checked against spans found in conversations written out by hand; the last turn only;
whole turns under a length limit; the OpenAI and ShareGPT layouts and bad records; a build with isolated packing
and a training run on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_recipe, write_recipe
from transformers import AutoTokenizer

from llmft.config import load_recipe
from llmft.config.sources import SourceSpec
from llmft.data.chat import encode_conversation
from llmft.data.sources import SourceReport, read_source

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Who made the creature?"},
    {"role": "assistant", "content": "Victor Frankenstein, in Ingolstadt."},
    {"role": "user", "content": "And where did it go?"},
    {"role": "assistant", "content": "North, across the ice."},
]


def by_hand(template: str, messages: list[dict]) -> tuple[str, list[str]]:
    """(the rendered conversation, the assistant segments that must be trained), written out without Jinja."""
    if template == "chatml":
        text, segments = "", []
        for m in messages:
            if m["role"] == "assistant":
                segments.append(f"{m['content']}<|im_end|>\n")
                text += "<|im_start|>assistant\n" + segments[-1]
            else:
                text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return text, segments
    system = messages[0]["content"]
    text, segments, first = "", [], True
    for m in messages[1:]:
        if m["role"] == "user":
            sys_part = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first else ""
            text += f"<s>[INST] {sys_part}{m['content']} [/INST]"
            first = False
        else:
            segments.append(f" {m['content']} </s>")
            text += segments[-1]
    return text, segments


def expected_mask(tok, text: str, segments: list[str]) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and the tokens that start inside one of ``segments`` (found by string search)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for seg in segments:
        start = text.index(seg, pos)
        spans.append((start, start + len(seg)))
        pos = start + len(seg)
    mask = np.array([any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]])
    return enc["input_ids"], mask


def runs(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The contiguous trained stretches of ``ids``."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    return [ids[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_the_trained_tokens_are_exactly_the_assistant_turns(template, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text, segments = by_hand(template, CONVERSATION)
    ids, mask = expected_mask(tok, text, segments)
    ex = encode_conversation(tok, CONVERSATION, template, "all")
    assert ex.tokens.tolist() == ids  # the template renders what was written by hand
    assert np.array_equal(ex.loss_mask, mask)
    assert [tok.decode(r) for r in runs(ex.tokens, ex.loss_mask)] == segments
    assert 0 < ex.loss_mask.sum() < len(ex.tokens) / 2
    if template == "llama2":  # the end of each assistant turn, EOS, is trained; BOS never
        assert ex.tokens[ex.loss_mask].tolist().count(tok.eos_token_id) == 2
        assert tok.bos_token_id not in ex.tokens[ex.loss_mask].tolist()

    last = encode_conversation(tok, CONVERSATION, template, "last")
    _, last_mask = expected_mask(tok, text, segments[-1:])
    assert np.array_equal(last.loss_mask, last_mask) and last.loss_mask.sum() < ex.loss_mask.sum()


def test_a_conversation_longer_than_the_limit_keeps_whole_turns(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    whole = encode_conversation(tok, CONVERSATION, "chatml", "all")
    first_turn = encode_conversation(tok, CONVERSATION[:3], "chatml", "all")
    cut = encode_conversation(tok, CONVERSATION, "chatml", "all", max_tokens=len(whole) - 1)
    assert cut.tokens.tolist() == first_turn.tokens.tolist()  # cut right after the first assistant turn
    assert np.array_equal(cut.loss_mask, first_turn.loss_mask)
    assert len(encode_conversation(tok, CONVERSATION, "chatml", "all", max_tokens=len(whole))) \
        == len(whole)


def test_the_reader_takes_openai_and_sharegpt_and_reports_bad_records(tmp_path):
    path = tmp_path / "chats.jsonl"
    records = [
        {"messages": CONVERSATION},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}]},
        {"messages": [{"role": "user", "content": "No answer here"}]},
        {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "x"}]},
        {"text": "not a conversation"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = SourceReport()
    spec = SourceSpec(format="chat", path=str(path), chat_template="chatml", train_on="last")
    docs = list(read_source(spec, on_error="skip", report=report))
    assert [d.where for d in docs] == [f"{path}:1", f"{path}:2"]
    assert docs[0].messages == CONVERSATION and docs[0].chat == {"template": "chatml", "train_on": "last"}
    assert docs[1].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello."}]
    assert "Victor Frankenstein" in docs[0].text  # filters and decontamination read the contents
    assert report.bad_records == 3
    examples = "\n".join(report.examples)
    assert f"{path}:3: no assistant turn" in examples
    assert f"{path}:4: turn 0: expected" in examples and "narrator" in examples
    assert f"{path}:5: expected a \"messages\" list" in examples
    with pytest.raises(ValueError, match="chat_template/train_on apply only to format chat"):
        SourceSpec(format="jsonl", path=str(path), train_on="last")


def test_a_chat_source_builds_packs_isolated_and_trains(tmp_path, tiny_model):
    from llmft.data.build import load_built
    from llmft.train.loop import train

    tok = AutoTokenizer.from_pretrained(tiny_model)
    chats = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
              {"role": "assistant", "content": f"It is {2 * i}."}] for i in range(40)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    recipe = tiny_recipe(tiny_model, path, tmp_path / "run", train={"max_steps": 2})
    recipe["data"] = {"sources": [{"format": "chat", "path": str(path), "chat_template": "chatml"}],
                      "packing": "isolated", "validation_fraction": 0.0}
    result = train(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    rows = load_built(tmp_path / "run" / "data").rows
    batch = rows.batch(list(range(len(rows))))
    trained = [tok.decode(r) for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True)
               for r in runs(ids, labels >= 0)]
    assert trained and all(t.startswith("It is ") and t.endswith("<|im_end|>\n") for t in trained), trained[:3]
