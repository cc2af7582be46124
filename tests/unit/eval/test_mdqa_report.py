"""The report of `llmft repro mdqa`: accuracy over all gold positions, how the model answers, and the verdict,
from results made here with known answers."""

from __future__ import annotations

from llmft.cli import main
from llmft.repro_mdqa import behaviour, behaviour_table, comparison_table, overall, verdict


def _run(answers: dict[tuple[int, int], list[tuple[str, bool, bool]]]) -> dict:
    """Results shaped as run_mdqa's: {(k, gold): [(output, correct, in_context)]}."""
    cells, outputs = {}, []
    for (k, i), rows in answers.items():
        correct = sum(c for _, c, _ in rows)
        cells.setdefault(k, {})[i] = {"accuracy": correct / len(rows), "correct": correct, "n": len(rows),
                                      "too_long": 0}
        outputs += [{"k": k, "gold": i, "output": o, "correct": c, "in_context": x} for o, c, x in rows]
    return {"cells": cells, "examples": [], "outputs": outputs}


def test_overall_accuracy_counts_questions_not_cells_and_the_verdict_follows_the_numbers():
    before = _run({(4, 0): [("x", False, False)] * 4, (4, 3): [("x", False, False)] * 2})
    after = _run({(4, 0): [(" 1234", True, True)] * 3 + [(" 9", False, False)],
                  (4, 3): [(" 5", False, True), (" 5", False, True)]})
    assert overall(after) == {4: 3 / 6} and overall(before) == {4: 0.0}  # per question: 3 of 6, not (3/4 + 0) / 2
    b = behaviour(after)
    assert b == {"n": 6, "from_a_passage": 5 / 6, "distinct_answers": 3, "most_common_answer": "1234",
                 "most_common_share": 0.5}
    results = {"overall": {"before": overall(before), "after": overall(after), "chance": {4: 0.25}},
               "behaviour": {"before": behaviour(before), "after": b}}
    assert "| 4 | 0.0% | 50.0% | 25.0% |" in comparison_table(results)
    assert verdict(results).startswith("**Retrieval gained**") and "k = 4" in verdict(results)

    collapsed = _run({(4, 0): [(" 7", False, False)] * 3 + [(" 1234", True, True)]})
    results = {"overall": {"before": overall(before), "after": overall(collapsed), "chance": {4: 0.25}},
               "behaviour": {"before": behaviour(before), "after": behaviour(collapsed)}}
    text = verdict(results)
    assert text.startswith("**No retrieval gained**") and "above the start model at k = 4" in text
    assert "repeats one answer ('7', 75% of answers)" in text and "25.0% of its answers come from a passage" in text


def test_a_start_model_that_is_no_model_directory_is_one_clear_error_before_any_work(tmp_path, capsys):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert main(["repro", "mdqa", "--fast", "--model", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--model {empty}: no model there (config.json)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_most_common_answer_is_the_same_every_run_ties_going_to_the_first_given():
    # ten answers once each: the report names the first, not whichever a set (string hashing) iterates first
    tied = _run({(4, 0): [(f" {n}", False, True) for n in range(9, -1, -1)]})
    assert behaviour(tied)["most_common_answer"] == "9" and behaviour(tied)["most_common_share"] == 0.1
    led = _run({(4, 0): [(" 1", False, True), (" 2", False, True), (" 2", False, True)]})
    assert behaviour(led)["most_common_answer"] == "2"
    # the report's table names a most common answer only where some answer repeats
    table = behaviour_table({"behaviour": {"before": behaviour(tied), "after": behaviour(led)}}).splitlines()
    assert table[2] == "| before fine-tuning | 100.0% | 10 of 10 | none repeated |"
    assert table[3] == "| after fine-tuning | 100.0% | 2 of 3 | '2' (67%) |"
