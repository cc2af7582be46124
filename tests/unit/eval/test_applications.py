"""The two applications: their data formats (Long-Data-Collections, BookSum, Lost in the Middle) as
prompt/completion examples trained on the answer only, and ``llmft eval --task mdqa | summarization`` end to end
on the synthetic stand-ins, with the accuracy checked against answers made to match (and not match) what the model
says."""

from __future__ import annotations

import gzip
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.cli import main
from llmft.config.sources import SourceSpec
from llmft.data.build.tokenizing import encode_documents
from llmft.data.sources import SourceReport, read_source
from llmft.data.sources.applications import answer_in, mdqa_prompt, normalize_answer, summary_prompt
from llmft.data.synthetic import write_mdqa, write_summaries
from llmft.eval.applications import mdqa_files, run_mdqa, run_summarization


def test_the_answer_metric_is_squad_normalized_containment():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert answer_in("It stands in Paris, France.", ["paris"]) and answer_in("an APPLE", ["the apple"])
    assert not answer_in("Lyon", ["Paris"]) and not answer_in("anything", ["", "  "])


def test_application_formats_train_on_the_answer_only(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ldc = tmp_path / "ldc.jsonl"
    ldc.write_text("\n".join(json.dumps(r) for r in [
        {"text": summary_prompt("Chapter one text.") + " A summary."},
        {"text": "Document [1](Title: X) Y\n\nQuestion: who?\nAnswer: Victor"},
        {"text": "no cue in this one"}]) + "\n")
    report = SourceReport()
    docs = list(read_source(SourceSpec(format="long_data_collections", path=str(ldc)), "skip", report))
    assert [(d.prompt[-3:], d.text) for d in docs] == [("\nA:", " A summary."), ("er:", " Victor")]
    assert report.bad_records == 1 and f"{ldc}:3: no answer after" in report.examples[0]

    booksum = tmp_path / "booksum.jsonl"
    booksum.write_text(json.dumps({"chapter": "It was a dark night.", "summary_text": "Night fell."}) + "\n")
    (doc,) = read_source(SourceSpec(format="booksum", path=str(booksum)), "skip", SourceReport())
    assert doc.prompt == summary_prompt("It was a dark night.") and doc.text == " Night fell."

    write_mdqa(tmp_path / "mdqa", ks=(3,), examples=2)
    litm = tmp_path / "litm.jsonl"
    with gzip.open(tmp_path / "mdqa" / "nq-open-3_total_documents_gold_at_1.jsonl.gz", "rt") as f:
        record = json.loads(f.readline())
    litm.write_text(json.dumps(record) + "\n" + json.dumps({"question": "q", "answers": []}) + "\n")
    report = SourceReport()
    (doc,) = read_source(SourceSpec(format="lost_in_the_middle", path=str(litm)), "skip", report)
    assert doc.prompt == mdqa_prompt(record["question"], record["ctxs"]) and doc.text == " " + record["answers"][0]
    assert doc.meta["gold"] == 1 and report.bad_records == 1
    assert "Document [2](Title: " in doc.prompt and doc.prompt.endswith("\nAnswer:")

    (ex,) = encode_documents([doc], tok)
    trained = tok.decode(ex.tokens[ex.loss_mask])
    assert trained.strip().startswith(record["answers"][0]) and len(trained) < 20  # the answer (+ EOS) only


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def test_mdqa_accuracy_counts_what_the_model_answers(tmp_path, model_and_tok, tiny_model):
    """Files whose gold answers are the model's own answers score 100%; with answers it never says, 0%."""
    from llmft.generate import Sampling, generate

    model, tok = model_and_tok
    model.config.max_position_embeddings = 4096  # the tiny model's 32 positions hold no prompt; RoPE needs no cap
    write_mdqa(tmp_path / "raw", ks=(2, 3), examples=3)
    for key, path in mdqa_files(tmp_path / "raw").items():
        records = [json.loads(x) for x in gzip.open(path, "rt")]
        for r in records:
            said = generate(model, tok, mdqa_prompt(r["question"], r["ctxs"]), Sampling(max_new_tokens=6,
                                                                                          stop=("\n",))).text
            r["answers"] = [said] if key[1] == 0 else ["zz never said zz"]
        out = tmp_path / "mdqa" / path.name
        out.parent.mkdir(exist_ok=True)
        with gzip.open(out, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    r = run_mdqa(model, tok, tmp_path / "mdqa", max_new_tokens=6)
    assert sorted(r["cells"]) == [2, 3] and sorted(r["cells"][3]) == [0, 1, 2]
    for k, row in r["cells"].items():
        assert row[0]["accuracy"] == 1.0 and row[0]["n"] == 3
        assert all(row[i]["accuracy"] == 0.0 for i in row if i)


def test_eval_task_cli_writes_the_mdqa_report_and_rouge(tmp_path, tiny_model, capsys):
    write_mdqa(tmp_path / "mdqa", ks=(2,), examples=2)
    write_summaries(tmp_path / "summ.jsonl", examples=2, sentences=1)
    code = main(["eval", "--model", str(tiny_model), "--task", "mdqa", "--mdqa-data", str(tmp_path / "mdqa"),
                 "--mdqa-docs", "2", "--task", "summarization", "--summ-data", str(tmp_path / "summ.jsonl"),
                 "--max-new-tokens", "4", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "| documents | gold at 0 | gold at 1 |" in out.out and "# summarization:" in out.out
    report = json.loads((tmp_path / "out" / "mdqa.json").read_text())
    cells = report[str(tiny_model)]["cells"]["2"]
    assert set(cells) == {"0", "1"} and all(c["n"] + c["too_long"] == 2 for c in cells.values())
    assert (tmp_path / "out" / "mdqa.png").stat().st_size > 5000
    rouge = json.loads((tmp_path / "out" / "summarization.json").read_text())[str(tiny_model)]
    assert rouge["n"] + rouge["too_long"] == 2
    assert main(["eval", "--model", str(tiny_model), "--task", "mdqa"]) == 2
    assert "--task mdqa: give --mdqa-data DIR" in capsys.readouterr().err


def test_rouge_is_100_for_the_reference_and_low_for_other_text(tmp_path, model_and_tok, monkeypatch):
    from llmft.eval import applications as apps
    from llmft.generate import Completion

    model, tok = model_and_tok
    path = write_summaries(tmp_path / "summ.jsonl", examples=3)
    refs = {summary_prompt(json.loads(x)["chapter"]): json.loads(x)["summary_text"] for x in path.open()}
    monkeypatch.setattr(apps, "generate", lambda m, t, prompt, s: Completion(refs[prompt], 0, 0, 0.0, "eos"))
    assert run_summarization(model, tok, path)["rouge1"] == pytest.approx(100.0)
    monkeypatch.setattr(apps, "generate", lambda m, t, prompt, s: Completion("ships waited", 0, 0, 0.0, "eos"))
    assert run_summarization(model, tok, path)["rouge2"] == pytest.approx(0.0)


def test_the_synthetic_mdqa_data_is_the_same_in_every_process(tmp_path):
    # string hashing differs between processes (PYTHONHASHSEED): the seeded data must not depend on it
    import os
    import subprocess
    import sys

    code = ("import json, sys; from llmft.data.synthetic import mdqa_training_records; "
            "sys.stdout.write(json.dumps(mdqa_training_records(20, ks=(4, 8), seed=3)))")
    runs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": h},
                           capture_output=True, text=True, check=True).stdout for h in ("1", "2", "3")}
    assert len(runs) == 1
    (records,) = map(json.loads, runs)
    for r in records:  # the gold passage is the asked name's, wherever it was drawn
        (gold,) = [c for c in r["ctxs"] if c["isgold"]]
        assert r["question"] == f"What is the code of {gold['title']}?" and r["answers"][0] in gold["text"]
