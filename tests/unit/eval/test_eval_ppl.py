"""``llmft eval --ppl pg19``: perplexity per byte equals an independent computation in both protocols, the
sliding window scores every token once, short books are reported, and the reports (JSON, markdown, PNG,
comparison) are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.cli import main
from llmft.eval.pg19 import load_books, tokenize_book
from llmft.eval.ppl import evaluate_ppl, score_book

GUTENBERG_HEADER = "*** START OF THE PROJECT GUTENBERG EBOOK {t} ***\n"
GUTENBERG_FOOTER = "\n*** END OF THE PROJECT GUTENBERG EBOOK {t} ***\n"


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory, book_text) -> Path:
    """Three PG-19-style books: two long (one with accents and em dashes: multi-byte UTF-8), one short."""
    d = tmp_path_factory.mktemp("pg19")
    long_a = book_text[:8_000]
    long_b = book_text[8_000:16_000].replace("e", "é").replace(", ", " — ")
    for name, body in (("100", long_a), ("200", long_b), ("300", book_text[:600])):
        (d / f"{name}.txt").write_text(f"Produced by volunteers\n{GUTENBERG_HEADER.format(t=name)}{body}"
                                       f"{GUTENBERG_FOOTER.format(t=name)}End matter\n")
    return d


def reference(model, tokenizer, text: str, length: int, mode: str, stride: int = 0):
    """Independent: token NLLs from plain forward passes; bytes from decoding exactly the scored token ids."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, scored = 0.0, []
    if mode == "windows":
        spans = [(s, s + length, s + 1) for s in range(0, len(ids) - length + 1, length)]
    else:
        spans, prev_end = [], 0
        for begin in range(0, len(ids), stride):
            end = min(begin + length, len(ids))
            spans.append((begin, end, max(prev_end, begin + 1)))
            prev_end = end
            if end == len(ids):
                break
    with torch.no_grad():
        for begin, end, first in spans:
            x = torch.tensor(ids[begin:end])[None]
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)  # (w, v)
            positions = list(range(first, end))
            rows = torch.tensor(positions) - begin - 1
            nll -= float(logp[rows, torch.tensor([ids[p] for p in positions])].sum())
            scored += positions
    # the raw bytes of exactly the scored tokens, through the tokenizer's own byte-level decoder table
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    pieces = tokenizer.convert_ids_to_tokens([ids[p] for p in scored])
    nbytes = len(b"".join(bytes(to_byte[c] for c in piece) for piece in pieces))
    return nll, len(scored), nbytes


@pytest.mark.parametrize(("mode", "length", "stride"), [("windows", 128, 0), ("windows", 512, 0),
                                                          ("sliding", 128, 32), ("sliding", 256, 255)])
def test_ppl_per_byte_equals_an_independent_computation(tiny_model, books_dir, mode, length, stride):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    books = load_books(books_dir, tok, max_docs=2)
    assert [b.name for b in books] == ["100", "200"]
    results = evaluate_ppl(model, books, [length], mode, stride or 256)[length]
    nll, tokens, nbytes = 0.0, 0, 0
    from llmft.data.sources import strip_gutenberg

    for name in ("100", "200"):
        text = strip_gutenberg((books_dir / f"{name}.txt").read_text())
        assert "Produced by" not in text and "End matter" not in text
        n, t, b = reference(model, tok, text, length, mode, stride)
        nll, tokens, nbytes = nll + n, tokens + t, nbytes + b
    assert results["tokens"] == tokens and results["bytes"] == nbytes
    assert results["ppl_per_byte"] == pytest.approx(math.exp(nll / nbytes), rel=1e-4)
    assert results["token_ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_sliding_window_scores_every_token_once(tiny_model, book_text):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    book = tokenize_book(tok, "b", book_text[:6_000])
    n = len(book.ids)
    for length, stride in ((128, 32), (128, 100), (256, 255), (64, 1)):
        if stride == 1:
            book = tokenize_book(tok, "b", book_text[:600])
            n = len(book.ids)
        r = score_book(model, book, length, "sliding", stride)
        assert r["tokens"] == n - 1, (length, stride)  # all but the book's first token, each once
        assert r["bytes"] == int(book.nbytes[1:].sum())
    w = score_book(model, tokenize_book(tok, "b", book_text[:6_000]), 128, "windows")
    n = len(tokenize_book(tok, "b", book_text[:6_000]).ids)
    assert w["windows"] == n // 128 and w["tokens"] == (n // 128) * 127
    with pytest.raises(ValueError, match="stride"):
        score_book(model, book, 64, "sliding", 64)  # no context left for a window's first scored token


def test_token_bytes_partition_the_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "Ünïcödé — naïve café, 東京 and emoji 🙂 end."
    book = tokenize_book(tok, "u", text)
    assert int(book.nbytes.sum()) == len(text.encode())
    # a character split over several byte tokens: its bytes are spread over them, not counted twice
    split = tokenize_book(tok, "c", "東").nbytes  # one 3-byte character, three byte tokens here
    assert split.tolist() == [1, 1, 1]
    assert (book.nbytes >= 0).all() and len(book.nbytes) == len(book.ids)


def test_cli_reports_short_books_writes_json_markdown_plot_and_compares(tiny_model, books_dir, tmp_path, capsys):
    out_a, out_b = tmp_path / "a" / "eval", tmp_path / "b" / "eval"
    args = ["eval", "--ppl", "pg19", "--model", str(tiny_model), "--data", str(books_dir), "--lengths", "64,256,1024"]
    assert main(args + ["--out", str(out_a)]) == 0
    report = json.loads((out_a / "ppl.json").read_text())
    res = report["models"][str(tiny_model)]
    assert report["protocol"]["mode"] == "windows" and sorted(int(n) for n in res) == [64, 256, 1024]
    assert (
        res["1024"]["too_short"] == ["300"] and res["1024"]["books"] == 2 and res["64"]["books"] == 3
    )  # reported, not dropped
    md = (out_a / "ppl.md").read_text()
    assert "| context |" in md and "300" in md and "shorter than 1,024 tokens" in md
    img = Image.open(out_a / "ppl.png")
    assert img.size[0] > 500 and (out_a / "ppl.png").stat().st_size > 10_000
    assert np.asarray(img.convert("L")).std() > 5  # not a blank image

    # a second "run" with a sharper (scaled) copy of the model, then the side-by-side comparison
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    sharper = tmp_path / "sharper"
    model.save_pretrained(sharper)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(sharper)
    assert main(["eval", "--ppl", "pg19", "--model", str(sharper), "--data", str(books_dir), "--lengths",
                 "64,256,1024", "--out", str(out_b)]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(out_a), str(out_b), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "a ppl/byte" in table and "b ppl/byte" in table and "b vs a" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    a = json.loads((out_a / "ppl.json").read_text())["models"][str(tiny_model)]["256"]["ppl_per_byte"]
    b = json.loads((out_b / "ppl.json").read_text())["models"][str(sharper)]["256"]["ppl_per_byte"]
    assert f"{100 * (b / a - 1):+.2f}%" in table


def test_one_eval_loads_each_model_once_for_every_evaluation(tiny_model, books_dir, tmp_path, monkeypatch, capsys):
    # the real loader, counted: perplexity and passkey for two models take two loads, not four
    from llmft.eval import run as ev

    loads, real = [], ev.load_eval_model
    monkeypatch.setattr(ev, "load_eval_model", lambda name, *a, **k: loads.append(name) or real(name, *a, **k))
    sharper = tmp_path / "sharper"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(sharper)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(sharper)
    out = tmp_path / "eval"
    assert main(["eval", "--ppl", "pg19", "--passkey", "--model", str(tiny_model), "--model", str(sharper),
                 "--data", str(books_dir), "--lengths", "64,128", "--depths", "0,1", "--trials", "2",
                 "--out", str(out)]) == 0
    assert loads == [str(tiny_model), str(sharper)]
    report = json.loads((out / "ppl.json").read_text())["models"]
    assert sorted(report) == sorted([str(tiny_model), str(sharper)])
    for i, name in enumerate((tiny_model, sharper)):
        pk = json.loads((out / f"passkey-{i}" / "passkey.json").read_text())
        assert pk["model"] == str(name) and pk["lengths"] == [64, 128]
    printed = capsys.readouterr().out
    assert printed.count("# passkey retrieval:") == 2 and "| context |" in printed


def test_cli_errors_exit_2(tiny_model, books_dir, tmp_path, capsys):
    assert main(["eval", "--ppl", "pg19", "--model", str(tmp_path / "nope"), "--data", str(books_dir)]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert main(["eval", "--ppl", "pg19", "--model", str(tiny_model), "--data", str(books_dir),
                 "--lengths", "2k"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "no ppl.json" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model)]) == 2
    assert main(["eval", "--ppl", "pg19", "--model", str(tiny_model), "--data", str(books_dir), "--lengths", "256",
                 "--mode", "sliding", "--stride", "256"]) == 2
    assert "--stride 256 must be below every length" in capsys.readouterr().err


def test_real_gutenberg_books(tiny_model, shared_data):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    books = load_books(shared_data / "gutenberg", tok, max_docs=1)
    from llmft.data.sources import strip_gutenberg

    assert len(books) == 1 and len(books[0].ids) > 50_000
    text = strip_gutenberg((shared_data / "gutenberg" / f"{books[0].name}.txt").read_text(encoding="utf-8"))
    assert int(books[0].nbytes.sum()) == len(text.encode("utf-8"))  # every byte of the book, once


def test_an_adapter_directory_loads_on_its_base_with_its_rope_config(tiny_model, tmp_path):
    """--model accepts an llmft adapter export: base from adapter_config.json, RoPE-scaled config.json applied."""
    from peft import PeftModel

    from llmft.config import LoraConfig
    from llmft.eval.run import load_eval_model
    from llmft.model.adapters import apply_lora, export_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    base.config.max_position_embeddings = 64
    model = apply_lora(base, LoraConfig(rank=4, alpha=8, target_modules="attention"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    export_adapter(tmp_path / "adapter", model, AutoTokenizer.from_pretrained(tiny_model), torch.float32)
    loaded, _ = load_eval_model(str(tmp_path / "adapter"))
    assert loaded.config.max_position_embeddings == 64 and loaded.config.rope_parameters["factor"] == 2.0
    x = torch.randint(0, 500, (1, 48))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        tiny_model, config=loaded.config), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-5, rtol=0)


def test_one_table_writer_for_lengths_and_for_methods():
    from llmft.eval.report import ppl_table

    models = {"base": {128: {"ppl_per_byte": 1.5, "token_ppl": 10.0}, 256: {"ppl_per_byte": 3.0, "token_ppl": 40.0}},
              "pi": {"128": {"ppl_per_byte": 1.2, "token_ppl": 8.0}, "256": {"ppl_per_byte": 1.1, "token_ppl": 7.0}}}
    rows = ppl_table(models).splitlines()
    assert rows[0] == "| context | base ppl/byte | pi ppl/byte | base token ppl | pi token ppl | pi vs base |"
    assert rows[2] == "| 128 | 1.500 | 1.200 | 10.00 | 8.00 | -20.00% |"
    assert rows[3] == "| 256 | 3.000 | 1.100 | 40.00 | 7.00 | -63.33% |"
    by_model = ppl_table(models, ("token_ppl",), by="model", context=128, digits=1, first_header="method")
    assert by_model.splitlines() == ["| method | 128 (C) | 256 (2C) |", "|---|---:|---:|", "| base | 10.0 | 40.0 |",
                                     "| pi | 8.0 | 7.0 |"]
    plain = ppl_table({"m": {1024: {"ppl": 3.14159}}}, ("ppl",), compare=False, length_format="{}")
    assert plain.splitlines() == ["| context | m |", "|---|---:|", "| 1024 | 3.14 |"]
