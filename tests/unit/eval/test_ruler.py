"""RULER (llmft/eval/ruler.py): the prompts follow RULER's templates and fit the length; the answers are what the
context says, checked by reading the context independently (needles, variable chains, word counts, QA files);
RULER's metrics and the effective length on known numbers; a run on a tiny model writes reports whose numbers are
the recorded answers' scores; lengths beyond the context, missing QA files and bad options."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.cli import main
from llmft.eval import ruler as R


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(R.ASSETS / "tiny-llama")


@pytest.fixture(scope="module")
def gen(tok):
    return R.Generator(tok)


NEEDLE_RE = re.compile(r"One of the special magic (numbers|words|uuids) for (\S+) is: (\S+)\.")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.mark.parametrize("task", [t for t in R.TASKS if not t.startswith("qa")])
def test_prompts_use_rulers_template_and_fill_the_length(gen, tok, task):
    length = 4096
    kind = R.TASKS[task].kind
    template, prefix, budget = R.TEMPLATES[kind]
    samples = gen.samples(task, length, 3, seed=1)
    for s in samples:
        assert s.tokens == len(tok(s.prompt).input_ids) and s.task == task and s.length == length
        # prompt + RULER's generation budget fit the length, and the haystack fills it (within a few percent)
        assert 0.9 * (length - budget) <= s.tokens <= length - budget
        assert s.prompt.endswith(s.answer_prefix) and s.answer_prefix.startswith(prefix[:10])
        assert s.outputs and all(o in s.input for o in s.outputs)
    if kind == "niah":
        single = R.TASKS[task].args["num_needle_v"] * R.TASKS[task].args["num_needle_q"] == 1
        head = "A special magic" if single else "Some special magic"
        assert samples[0].input.startswith(head) and " is hidden within" in samples[0].input if single else True
        assert samples[0].answer_prefix.endswith(" is" if single else " are")
    elif kind == "variable_tracking":
        assert samples[0].input.count(template[:40]) == 2  # the in-context example, then the task
    elif kind == "common_words_extraction":
        assert samples[0].input.count(template[:40]) == 2
    else:
        assert samples[0].input.startswith(template[:40])


def test_needles_hold_the_answers_and_the_question_asks_for_them(gen):
    for task, n_needles, n_asked, per_key in [("niah_single_1", 1, 1, 1), ("niah_single_3", 1, 1, 1),
                                              ("niah_multikey_1", 4, 1, 1), ("niah_multivalue", 4, 1, 4),
                                              ("niah_multiquery", 4, 4, 1), ("niah_multikey_3", None, 1, 1)]:
        for s in gen.samples(task, 2048, 2, seed=3):
            needles = NEEDLE_RE.findall(s.input)
            by_key: dict[str, list[str]] = {}
            for _, key, value in needles:
                by_key.setdefault(key, []).append(value)
            if n_needles is not None:
                assert len(needles) == n_needles
            question = s.input.rsplit("\n", 1)[-1]
            asked = [k for k in by_key if k in question]
            assert len(asked) == n_asked
            # the references are exactly the values of the asked keys, as the context states them
            assert sorted(s.outputs) == sorted(v for k in asked for v in by_key[k])
            assert all(len(by_key[k]) == per_key for k in asked)
            a = R.TASKS[task].args
            for v in s.outputs:
                assert re.fullmatch(r"\d{7}", v) if a["type_needle_v"] == "numbers" else UUID_RE.match(v)
            if a["type_haystack"] == "needle":  # the haystack is distractor needles with other keys
                assert len(needles) > 10 and len(by_key) == len(needles)


def test_variable_chain_resolves_to_the_answer(gen):
    for s in gen.samples("vt", 4096, 3, seed=5):
        task = s.input[s.input.rindex("Memorize and track"):]  # after the in-context example
        value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
        assign = dict(re.findall(r"VAR (\w+) = (\d+|VAR \w+)", task))

        def resolve(x: str) -> str:
            while x.startswith("VAR "):
                x = assign[x[4:]]
            return x

        assert sorted(k for k in assign if resolve(assign[k]) == value) == sorted(s.outputs)
        assert len(s.outputs) == 5 and f"{len(s.outputs)} variables are assigned the value {value}" in s.answer_prefix
        # the example before it is answered, with other names and another value
        example = s.input[: s.input.rindex("Memorize and track")]
        assert "they are:  " in example and not set(s.outputs) & set(re.findall(r"[A-Z]{3,5}", example))


def test_common_and_frequent_words_are_the_most_counted(gen):
    for length in (2048, 4096):  # below 4096 RULER repeats the common words 6 times, from 4096 on 30 times
        for s in gen.samples("cwe", length, 2, seed=7):
            listing = s.input[s.input.rindex("Below is a numbered list"):]
            counts = Counter(re.findall(r"\d+\. (\S+)", listing.split("\nQuestion:")[0]))
            top = [w for w, _ in counts.most_common(10)]
            assert sorted(top) == sorted(s.outputs)
            assert counts[s.outputs[0]] == (6 if length < 4096 else 30)
            assert counts.most_common(11)[-1][1] == (1 if length < 4096 else 3)
    for s in gen.samples("fwe", 4096, 2, seed=7):
        coded = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        counts = Counter(w for w in coded if w != "...")
        assert [w for w, _ in counts.most_common(3)] == s.outputs  # ranks 2-4 of the Zipf draw, in order
        assert Counter(coded).most_common(1)[0][0] == "..."  # rank 1 is the noise token


def _qa_files(d):
    d.mkdir(parents=True, exist_ok=True)
    squad = {"data": [{"title": f"T{a}", "paragraphs": [
        {"context": f"Paragraph {a}.{p}: the river Alpha{a}{p} flows north past the old mill.",
         "qas": [{"question": f"Which river is in paragraph {a}.{p}?", "id": f"{a}{p}", "is_impossible": False,
                  "answers": [{"text": f"Alpha{a}{p}", "answer_start": 0}]},
                 {"question": "Unanswerable?", "id": f"u{a}{p}", "is_impossible": True, "answers": []}]}
        for p in range(3)]} for a in range(6)], "version": "v2.0"}
    (d / "dev-v2.0.json").write_text(json.dumps(squad))
    hotpot = [{"_id": str(i), "question": f"What links Beta{i} and Gamma{i}?", "answer": f"Delta{i}",
               "type": "bridge", "supporting_facts": [],
               "context": [[f"Beta{i}", [f"Beta{i} is a town. ", f"It is near Delta{i}."]],
                           [f"Gamma{i}", [f"Gamma{i} is a lake by Delta{i}."]]]} for i in range(8)]
    (d / "hotpotqa.json").write_text(json.dumps(hotpot))
    return d


def test_qa_reads_the_public_formats_and_holds_the_gold_documents(tok, tmp_path):
    g = R.Generator(tok, qa_dir=_qa_files(tmp_path / "qa"))
    squad = R.read_squad(tmp_path / "qa" / "dev-v2.0.json")
    assert len(squad.questions) == 18 and len(squad.docs) == 18  # the unanswerable ones are left out
    for s in g.samples("qa_1", 1024, 3, seed=0):
        q = squad.questions[s.index]
        assert s.outputs == q["outputs"] and q["query"] in s.input and squad.docs[q["context"][0]] in s.input
        assert "Document 1:\n" in s.input and s.answer_prefix == " Answer:"
    for s in g.samples("qa_2", 1024, 2, seed=0):
        assert s.outputs == [f"Delta{s.index}"]
        assert f"Beta{s.index}\nBeta{s.index} is a town. It is near Delta{s.index}." in s.input


def test_samples_are_seeded_per_cell(gen):
    a = gen.samples("niah_single_2", 2048, 2, seed=0)
    assert a == R.Generator(gen.tokenizer).samples("niah_single_2", 2048, 2, seed=0)  # no state across runs
    assert a[0].outputs != gen.samples("niah_single_2", 2048, 1, seed=1)[0].outputs
    gen.samples("niah_multikey_2", 2048, 1, seed=0)  # another cell in between changes nothing
    assert gen.samples("niah_single_2", 2048, 2, seed=0) == a


def test_rulers_metrics_and_the_effective_length():
    assert R.string_match_all(" 123 and 456", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert R.string_match_all("the word is APPLE-pie", ["apple-PIE"]) == 100.0  # case-insensitive
    assert R.string_match_part("Delta", ["delta", "epsilon"]) == 100.0
    assert R.string_match_part("none", ["delta", "epsilon"]) == 0.0
    assert R.postprocess("  abc\tdef\x01 ") == "abc\ndef"
    assert R.score("qa_1", "It is Delta.", ["Delta", "Nope"]) == 100.0 and R.score("vt", "A B", ["A", "C"]) == 50
    assert R.effective_length({4096: 90.0, 8192: 86.0, 16384: 80.0, 32768: 90.0}) == 8192  # the run ends at 16K
    assert R.effective_length({4096: 85.0, 8192: 99.0}) is None
    assert R.effective_length({4096: 90.0, 8192: 80.0}, threshold=75) == 8192
    assert R.effective_length({2048: None, 4096: 90.0, 8192: None}) == 4096  # lengths that did not run


def test_run_writes_reports_whose_numbers_are_the_recorded_scores(tmp_path, capsys):
    from llmft.testing.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    r = R.run_ruler(model, tok, ["niah_single_1", "niah_multikey_2", "qa_1"], [1024, 2048], samples=2,
                    max_new_tokens=8, model_name="tiny", progress=False)
    assert r["lengths"] == [1024, 2048] and r["max_position_embeddings"] == 1024
    reasons = {(s["task"], s["length"]): s["reason"] for s in r["skipped"]}
    assert "beyond the model's 1024 positions" in reasons[("niah_single_1", 2048)]
    assert "squad file" in reasons[("qa_1", 1024)] and r["scores"]["qa_1"]["1024"] is None
    for task in ("niah_single_1", "niah_multikey_2"):
        recs = [x for x in r["records"] if x["task"] == task]
        assert len(recs) == 2 and all(x["tokens"] <= 1024 - 8 for x in recs)
        assert r["scores"][task]["1024"] == pytest.approx(np.mean([R.score(task, x["pred"], x["outputs"])
                                                                   for x in recs]))
    assert r["average"]["1024"] == pytest.approx((r["scores"]["niah_single_1"]["1024"]
                                                  + r["scores"]["niah_multikey_2"]["1024"]) / 2)
    assert r["average"]["2048"] is None and r["effective_length"] is None  # a random model retrieves nothing
    # by the answer's first token: " d" where the tokenizer has it as one token, else the bare space
    merged = {d for d in "0123456789" if len(tok.tokenize(f" {d}")) == 1}
    for task in ("niah_single_1", "niah_multikey_2"):
        recs = [x for x in r["records"] if x["task"] == task]
        assert all(len(x["outputs"]) == 1 and x["outputs"][0].isdigit() for x in recs)
        groups: dict[str, int] = {}
        for x in recs:
            lead = x["outputs"][0][0]
            group = f" {lead}" if lead in merged else " "
            groups[group] = groups.get(group, 0) + 1
        assert {t: c["n"] for t, c in r["by_first_token"][task].items()} == groups
        assert sum(c["correct"] for c in r["by_first_token"][task].values()) == pytest.approx(
            sum(x["score"] for x in recs) / 100)
    assert "qa_1" not in r["by_first_token"]  # none of its samples ran
    with pytest.raises(ValueError, match="exceed the model's context"):
        R.run_ruler(model, tok, ["niah_single_1"], [2048], samples=1, strict=True, progress=False)
    # extrapolation on request: the length beyond the context runs
    beyond = R.run_ruler(model, tok, ["niah_single_1"], [2048], samples=1, allow_beyond=True, max_new_tokens=4,
                         progress=False)
    assert beyond["scores"]["niah_single_1"]["2048"] is not None and beyond["records"][0]["tokens"] > 1024

    paths = R.write_ruler_report(r, tmp_path / "a")
    assert json.loads(paths["json"].read_text())["records"] == r["records"]
    md = paths["markdown"].read_text()
    assert "| niah_single_1 |" in md and "| **average** |" in md and "Not run:" in md
    split = {t for t, cells in r["by_first_token"].items() if len(cells) > 1}
    assert ("By the answer's first token" in md) == bool(split)
    assert all(f"| {t} | `{tok!r}` | {100 * c['accuracy']:.1f} | {c['n']} |" in md
               for t in split for tok, c in r["by_first_token"][t].items())
    assert Image.open(paths["plot"]).size[0] > 500

    # the CLI on the same model; then both reports side by side
    assert main(["eval", "--ruler", "niah_single_1,niah_multikey_2", "--lengths", "1024", "--samples", "2",
                 "--max-new-tokens", "8", "--model", str(model_dir), "--out", str(tmp_path / "b")]) == 0
    cli = json.loads((tmp_path / "b" / "ruler.json").read_text())
    assert cli["tasks"] == ["niah_single_1", "niah_multikey_2"] and cli["samples"] == 2
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "b"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    assert "effective length" in capsys.readouterr().out and (tmp_path / "c" / "compare_ruler.png").is_file()
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    assert "same tasks" in capsys.readouterr().err


def test_bad_ruler_options_exit_2(tmp_path, capsys):
    model = str(R.ASSETS / "tiny-llama")
    assert main(["eval", "--ruler", "niah_single_1,nope", "--model", model]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--ruler", "--samples", "0", "--model", model]) == 2
    assert "--samples: got 0" in capsys.readouterr().err
    assert main(["eval", "--ruler", "--haystack", str(tmp_path / "none"), "--model", model]) == 2
    assert "--haystack" in capsys.readouterr().err


def test_a_recipe_with_an_unknown_ruler_task_is_refused(tmp_path, tiny_model, text_file):
    from conftest import tiny_recipe, write_recipe

    from llmft.config import RecipeError, load_recipe

    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "run",
                         eval={"every_steps": 2, "ruler": {"tasks": ["niah_single_1", "niah_single_9"]}})
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert "eval.ruler.tasks" in str(err.value) and "niah_single_9" in str(err.value)
