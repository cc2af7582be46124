"""``llmft generate`` and ``llmft chat`` on a tiny LLaMA (random weights, 512-position context): greedy output equal
to transformers' ``generate`` token for token (chunked prefill, a run directory with a PI config), sampling
seeds, stop strings, the JSONL batch mode with bad lines, the context check, and chat turns piped through stdin
against conversations rendered independently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.chat import ChatSession
from llmft.cli import main
from llmft.generate import GenerationError, Sampling, generate, generate_file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, book_text) -> Path:
    from llmft.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gen") / "model", text=book_text, vocab_size=512, hidden_size=64,
                           num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=512)


@pytest.fixture(scope="module")
def pi_run(tmp_path_factory, model_dir) -> Path:
    """A run directory whose final/ model has a linear x4 RoPE config (2048 positions), as training exports it."""
    run = tmp_path_factory.mktemp("run")
    shutil.copytree(model_dir, run / "final")
    config = json.loads((run / "final" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    config["max_position_embeddings"] = 2048
    (run / "final" / "config.json").write_text(json.dumps(config))
    return run


def reference_ids(path: Path, prompt: str, new: int) -> list[int]:
    """transformers alone: load, tokenize, greedy generate."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def loaded(path: Path):
    from llmft.model.load import load_trained

    return load_trained(str(path))


def test_greedy_equals_transformers_generate_token_for_token_with_chunked_prefill(model_dir, pi_run, book_text,
                                                                                  capsys):
    prompt = book_text[:800]  # ~400 tokens: prefilled 64 at a time below
    for path, model_arg in ((model_dir, model_dir), (pi_run / "final", pi_run)):
        want = reference_ids(path, prompt, 24)
        model, tok = loaded(model_arg)
        assert tok(prompt, return_tensors="pt").input_ids.shape[1] > 200
        for chunk in (0, 64):
            got = generate(model, tok, prompt, Sampling(max_new_tokens=24, prefill_chunk=chunk))
            assert got.token_ids == want, (model_arg, chunk)
        assert main(["generate", "--model", str(model_arg), prompt, "--max-new-tokens", "24", "--prefill-chunk",
                     "64"]) == 0
        out = capsys.readouterr()
        assert out.out == tok.decode(want, skip_special_tokens=True) + "\n"
        assert "24 new tokens after a" in out.err and "finish: length" in out.err
    # the run directory's PI config was applied
    model, _ = loaded(pi_run)
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.max_position_embeddings == 2048


def test_sampling_follows_the_seed_and_top_k_1_is_greedy(model_dir):
    model, tok = loaded(model_dir)
    greedy = generate(model, tok, "The monster", Sampling(max_new_tokens=20)).token_ids
    hot = Sampling(max_new_tokens=20, temperature=1.5)
    a = generate(model, tok, "The monster", hot).token_ids
    assert generate(model, tok, "The monster", hot).token_ids == a
    assert generate(model, tok, "The monster", Sampling(max_new_tokens=20, temperature=1.5, seed=1)).token_ids != a
    assert a != greedy
    assert generate(model, tok, "The monster", Sampling(max_new_tokens=20, temperature=1.5, top_k=1)).token_ids \
        == greedy


def test_a_stop_string_ends_the_output_and_is_never_streamed(model_dir):
    model, tok = loaded(model_dir)
    full = generate(model, tok, "I beheld the wretch", Sampling(max_new_tokens=40))
    # a stop string across a word boundary: the streamer emits text word by word, so its start arrives first
    i = next(i for i in range(5, len(full.text) - 1) if full.text[i] == " " and full.text[i - 1] != " "
             and full.text[i + 1] != " " and full.text.find(full.text[i - 1 : i + 2]) == i - 1)
    stop = full.text[i - 1 : i + 2]
    streamed: list[str] = []
    cut = generate(model, tok, "I beheld the wretch", Sampling(max_new_tokens=40, stop=(stop,)), streamed.append)
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish == "stop"
    assert "".join(streamed) == cut.text
    assert cut.new_tokens < full.new_tokens  # generation itself stopped early


def test_batch_mode_reports_bad_lines_and_skips_or_stops(model_dir, tmp_path, caplog):
    model, tok = loaded(model_dir)
    src = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"id": "a", "prompt": "It was on a dreary night"}),
             "{not json",
             json.dumps({"prompt": "Beware; for I am fearless", "max_new_tokens": 5}),
             json.dumps({"text": "no prompt field"}),
             json.dumps({"id": "long", "prompt": "word " * 2000}),
             "",
             json.dumps({"id": "c", "prompt": "Learn from me"})]
    src.write_text("\n".join(lines) + "\n")
    s = Sampling(max_new_tokens=8)
    stats = generate_file(model, tok, src, tmp_path / "out.jsonl", s)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["a", 3, "c"]
    assert out[0]["completion"] == generate(model, tok, "It was on a dreary night", s).text
    assert out[1]["new_tokens"] == 5 and out[0]["new_tokens"] == 8
    assert [n for n, _ in stats["bad"]] == [2, 4, 5] and stats["done"] == 3 and stats["tokens_per_second"] > 0
    assert f"{src}:2: not JSON" in caplog.text and f"{src}:4: expected an object" in caplog.text
    assert f"{src}:5: the prompt is" in caplog.text and "context is 512" in caplog.text
    assert not (tmp_path / "out.jsonl.partial").exists()

    with pytest.raises(GenerationError, match=rf"{src}:2: not JSON.*the 1 completions before it are in"):
        generate_file(model, tok, src, tmp_path / "stopped.jsonl", s, on_error="stop")
    assert [json.loads(x)["id"] for x in (tmp_path / "stopped.jsonl").read_text().splitlines()] == ["a"]


def test_bad_input_exits_2_with_one_message(model_dir, tmp_path, capsys, book_text):
    assert main(["generate", "--model", str(model_dir), book_text[:20_000], "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "the prompt is" in err and "the model's context is 512" in err and "Fix: shorten" in err
    assert main(["generate", "--model", str(model_dir), "x", "--top-p", "0"]) == 2
    assert "--top-p: got 0.0; expected a value in (0, 1]" in capsys.readouterr().err
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bare / f.name)
    assert main(["generate", "--model", str(bare), "x"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer could be loaded" in err and "Fix: copy the base model's tokenizer files" in err
    assert main(["chat", "--model", str(model_dir)]) == 2  # a base tokenizer without a chat template
    assert "has no chat template" in capsys.readouterr().err


def chatml(turns: list[tuple[str, str]], user: str) -> str:
    """ChatML written out by hand: the independent rendering the chat session must produce."""
    text = "".join(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for u, a in turns)
    return text + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def greedy_reply(model_dir: Path, rendered: str, new: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(rendered, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split("<|im_end|>")[0]


def test_chat_turns_through_stdin_match_an_independent_rendering(model_dir, tmp_path):
    script = "Who are you?\nWhere is Geneva?\n/save first.json\n/reset\nHello again\n/save second.json\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "llmft.cli", "chat", "--model", str(model_dir), "--template",
                           "chatml", "--max-new-tokens", "12"], input=script, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads((tmp_path / "first.json").read_text())["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    a1 = greedy_reply(model_dir, chatml([], "Who are you?"), 12)
    a2 = greedy_reply(model_dir, chatml([("Who are you?", a1)], "Where is Geneva?"), 12)
    assert [m["content"] for m in first] == ["Who are you?", a1, "Where is Geneva?", a2]
    second = json.loads((tmp_path / "second.json").read_text())["messages"]
    assert second == [{"role": "user", "content": "Hello again"},
                      {"role": "assistant", "content": greedy_reply(model_dir, chatml([], "Hello again"), 12)}]
    assert "history cleared" in proc.stderr and proc.stdout.count("\n") == 3  # one line per reply


def test_chat_history_keeps_the_newest_turns_within_the_context(model_dir, book_text):
    model, tok = loaded(model_dir)
    chat = ChatSession(model, tok, Sampling(max_new_tokens=16), template="chatml", system="Answer briefly.")
    for k in range(6):  # each message ~130 tokens: the 512-token context holds about three
        chat.reply(book_text[k * 400 : k * 400 + 400])
        assert len(chat.turns) >= 2 and chat.turns[-1]["role"] == "assistant"
    assert chat.dropped > 0 and chat.turns[-2]["content"] == book_text[2000:2400]
    chat.turns.append({"role": "user", "content": "Go on."})
    assert len(chat.prompt()) + 16 <= 512  # what the next reply would be given
    assert chat.messages()[0] == {"role": "system", "content": "Answer briefly."}
    chat.turns.pop()
    turns = list(chat.turns)
    with pytest.raises(GenerationError, match="the model's context is 512"):
        chat.reply(book_text[:3000])  # one message longer than the context
    assert chat.turns == turns  # the refused message is not kept


def test_a_run_directory_is_loaded_with_its_recipes_attention(pi_run):
    import argparse

    from llmft.cli.generate import _load

    (pi_run / "recipe.yaml").write_text("model: {attention: eager}\ntrain: {precision: bf16}\n")
    try:
        args = argparse.Namespace(model=str(pi_run), device="cpu", dtype=None, attention=None)
        model, _ = _load(args)
        assert model.config._attn_implementation == "eager" and model.dtype == torch.float32  # 16-bit: CUDA only
        args.attention = "sdpa"  # an explicit choice wins
        assert _load(args)[0].config._attn_implementation == "sdpa"
    finally:
        (pi_run / "recipe.yaml").unlink()
