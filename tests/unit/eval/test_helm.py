"""HELM core scenarios: metric functions equal HELM's reference implementation on a battery of pairs, the suite
validates, prompts are HELM's format, in-context examples are dropped to fit a short context, an end-to-end
run on a tiny random LLaMA scores local fixture files and writes JSON + markdown, three train trials draw HELM's
examples and average, and scenario data read from a hub-layout dataset directory equals the local files'."""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import string
import subprocess
import sys
from collections import defaultdict
from itertools import cycle
from pathlib import Path

import pytest
import torch
from conftest import TEST_DATA
from nltk.metrics.scores import f_measure
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.config import RecipeError
from llmft.eval.helm import (
    DEFAULT_SUITE,
    HelmDataError,
    Instance,
    Reference,
    build_prompt,
    example_block,
    format_helm_table,
    generate,
    load_helm_suite,
    load_subsets,
    run_helm,
    sample_examples,
    select_scenarios,
    write_helm_report,
)
from llmft.eval.helm import metrics as hm

DATA = TEST_DATA / "helm"


# ------------------------------------------------------------------ HELM's reference functions, transcribed
# stanford-crfm/helm src/helm/benchmark/metrics/evaluate_reference_metrics.py (normalize_text, exact_match,
# quasi_exact_match, f1_score, get_rouge_function) and compute_reference_metrics' max over references.


def helm_normalize_text(text: str, should_remove_articles: bool = True) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text: str) -> str:
        return text.lower()

    normalized_text = remove_punc(lower(text))
    if should_remove_articles:
        normalized_text = remove_articles(normalized_text)
    return white_space_fix(normalized_text)


def helm_exact_match(gold: str, pred: str) -> float:
    if not pred:
        return 0
    return 1 if gold.strip() == pred.strip() else 0


def helm_quasi_exact_match(gold: str, pred: str) -> float:
    if not pred:
        return 0
    return 1 if helm_normalize_text(gold) == helm_normalize_text(pred) else 0


def helm_f1_score(gold: str, pred: str) -> float:
    ret = f_measure(set(helm_normalize_text(gold).split()), set(helm_normalize_text(pred).split()))
    if ret is None:  # answer is the empty string after normalizing
        return 0.0
    return ret


def helm_rouge_2(gold: str, pred: str) -> float:
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    return scorer.score(gold, pred)["rouge2"].fmeasure


HELM = {"exact_match": helm_exact_match, "quasi_exact_match": helm_quasi_exact_match, "f1_score": helm_f1_score}


def helm_score(metric: str, golds: list[str], pred: str) -> float:
    return max(HELM[metric](gold, pred) for gold in golds)


# (golds, prediction, metric, expected): expected values worked out by hand from HELM's definitions.
BATTERY = [
    (["Yes"], "Yes", "exact_match", 1),
    (["Yes"], "yes", "exact_match", 0),
    (["Yes"], "yes", "quasi_exact_match", 1),
    (["Yes"], " Yes \n", "exact_match", 1),  # strip()
    (["Yes"], "Yes.", "exact_match", 0),
    (["Yes"], "Yes.", "quasi_exact_match", 1),  # punctuation removed
    (["Yes"], "", "exact_match", 0),  # empty prediction
    (["Yes"], "", "quasi_exact_match", 0),
    (["Yes"], "", "f1_score", 0),
    ([""], "", "quasi_exact_match", 0),  # empty prediction scores 0 even against an empty gold
    ([""], "x", "exact_match", 0),
    ([""], "x", "f1_score", 0),  # empty gold: nltk f_measure is None -> 0
    (["the Eiffel Tower"], "Eiffel Tower", "quasi_exact_match", 1),  # articles
    (["An apple"], "apple", "quasi_exact_match", 1),
    (["a"], "the", "quasi_exact_match", 1),  # both normalize to "" and the prediction is not empty
    (["the"], "the", "f1_score", 0),  # ... but F1 of two empty word sets is 0
    (["an"], "An", "exact_match", 0),
    (["theater"], "ater", "quasi_exact_match", 0),  # \b: "the" inside a word is kept
    (["the the cat"], "cat", "quasi_exact_match", 1),
    (["a-team"], "team", "quasi_exact_match", 0),  # punctuation goes first: "ateam"
    (["A. Lincoln"], "Lincoln", "quasi_exact_match", 1),  # "a. lincoln" -> "a lincoln" -> "lincoln"
    (["U.S.A."], "usa", "quasi_exact_match", 1),
    (["1,000"], "1000", "f1_score", 1),
    (["New  York\tCity"], "new york city", "quasi_exact_match", 1),  # whitespace collapsed
    (["Tokyo"], "Tokyo\u00a0", "exact_match", 1),  # NBSP is whitespace for strip()
    (["Café"], "café!", "quasi_exact_match", 1),  # unicode lower-casing, ASCII "!" removed
    (["Café"], "café!", "exact_match", 0),
    (["résumé"], "RÉSUMÉ", "quasi_exact_match", 1),
    (["Théâtre"], "theatre", "quasi_exact_match", 0),  # accents are not stripped
    (["naïve"], "naive", "f1_score", 0),
    (["¿Qué?"], "qué", "quasi_exact_match", 0),  # "¿" is not ASCII punctuation and stays
    (["don't"], "dont", "quasi_exact_match", 1),
    (["don’t"], "dont", "quasi_exact_match", 0),  # curly apostrophe stays
    (["Straße"], "STRASSE", "quasi_exact_match", 0),
    (["ﬁnal"], "final", "quasi_exact_match", 0),  # ligature is not decomposed
    (["Barack Obama"], "Obama", "f1_score", 2 / 3),  # p = 1, r = 1/2
    (["the cat sat on the mat"], "cat cat sat", "f1_score", 2 / 3),  # sets: {cat, sat} vs {cat, sat, on, mat}
    (["red blue"], "green", "f1_score", 0),
    (["Paris, France"], "paris", "f1_score", 2 / 3),
    (["hello world"], "world hello", "f1_score", 1),
    (["hello world"], "world hello", "quasi_exact_match", 0),
    (["Yes", "No"], "no", "quasi_exact_match", 1),  # max over references
    (["x", "Yes"], "Yes", "exact_match", 1),
    (["a dog", "the cat"], "The Cat!", "quasi_exact_match", 1),
    (["a dog", "the cat"], "The Cat!", "exact_match", 0),
    (["Barack Obama", "Obama"], "obama", "f1_score", 1),
    (["New York City", "NYC"], "New York", "f1_score", 0.8),  # p = 1, r = 2/3 -> 1 / (0.5 + 0.75)
    (["Not enough information", "Cannot answer", "CANNOTANSWER"], "cannot answer", "f1_score", 1),
]


@pytest.mark.parametrize("golds,pred,metric,expected", BATTERY)
def test_metric_battery_matches_helm_reference(golds, pred, metric, expected):
    assert len(BATTERY) >= 30
    assert helm_score(metric, golds, pred) == pytest.approx(expected)  # the expectation is HELM's behaviour
    assert hm.score_references(metric, golds, pred) == pytest.approx(expected)
    for gold in golds:
        assert hm.METRICS[metric](gold, pred) == pytest.approx(HELM[metric](gold, pred))
        assert hm.normalize_text(gold) == helm_normalize_text(gold)
        assert hm.normalize_text(gold, False) == helm_normalize_text(gold, False)


ROUGE_PAIRS = [
    ("the cat sat on the mat", "the cat sat on a mat", 0.6),  # 3 of 5 bigrams each way
    ("running dogs", "run dog", 1.0),  # Porter stemming of words longer than 3 characters
    ("The quick brown fox.", "quick brown fox", 0.8),  # no article removal: p = 2/2, r = 2/3
    ("Police arrested two men on Sunday.", "", 0.0),
    ("Three adults and three children were taken to hospital.", "Two children taken to hospital.", None),
    ("Café au lait, s'il vous plaît", "cafe au lait", None),  # non-ASCII letters split tokens
    ("UK inflation rose to 2.5% in May", "Inflation in the UK rose to 2.5%", None),
]


@pytest.mark.parametrize("gold,pred,expected", ROUGE_PAIRS)
def test_rouge_2_equals_rouge_score(gold, pred, expected):
    assert hm.rouge_2(gold, pred) == pytest.approx(helm_rouge_2(gold, pred))
    if expected is not None:
        assert hm.rouge_2(gold, pred) == pytest.approx(expected)


def test_summarization_rouge_strips_braces_and_takes_max_over_references():
    # SummarizationMetric: _remove_braces on references and prediction, prediction stripped, max over references
    assert hm.summarization_rouge_2(["{a b c}"], " {a b c} ") == pytest.approx(1.0)
    golds = ["the cat sat on the mat", "a dog ran in the park"]
    assert hm.summarization_rouge_2(golds, "the cat sat on a mat") == pytest.approx(0.6)
    assert hm.score_references("rouge_2", golds, "a dog ran in a park") == pytest.approx(
        max(helm_rouge_2(g, "a dog ran in a park") for g in golds))


def test_ranking_metrics_follow_helm_and_trec_eval():
    # Yes first (most likely first), then No (least likely first), then anything else
    outputs = [("No", -0.1), (" Yes", -0.5), ("yes\n", -0.2), ("maybe", -0.01), ("No", -2.0)]
    ranked = hm.rank_binary(outputs)
    assert ranked == [2, 1, 4, 0, 3]
    assert hm.reciprocal_rank_at_k(ranked, {0: 1}, 10) == pytest.approx(1 / 4)
    assert hm.reciprocal_rank_at_k(ranked, {0: 1}, 3) == 0.0  # outside the top 3
    # TREC: graded judgments; RR binarizes (1 -> 0), so passage 4 (rel 2, rank 3) is the first relevant one
    trec = {0: 3, 1: 1, 4: 2}
    assert hm.reciprocal_rank_at_k(ranked, trec, 10, multiple_relevance_values=True) == pytest.approx(1 / 3)
    dcg = 1 / math.log2(3) + 2 / math.log2(4) + 3 / math.log2(5)  # ranks 2, 3, 4 hold relevance 1, 2, 3
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert hm.ndcg_at_k(ranked, trec, 10) == pytest.approx(dcg / idcg)
    assert hm.ndcg_at_k(ranked, trec, 2) == pytest.approx((1 / math.log2(3)) / (3 + 2 / math.log2(3)))
    assert hm.ndcg_at_k(ranked, {}, 10) == 0.0


def test_multiple_choice_separate_exact_match_shares_ties():
    # BasicReferenceMetric: exact match = correct share of the argmax set; predicted index = first of it
    assert hm.multiple_choice_separate_exact_match([1.0, 1.0, 0.5], [False, True, False]) == (0.5, 0)
    assert hm.multiple_choice_separate_exact_match([-3.0, -1.0, -2.0], [False, True, False]) == (1.0, 1)


# ------------------------------------------------------------------ the suite


def test_suite_yaml_validates_with_16_scenarios():
    suite = load_helm_suite(DEFAULT_SUITE)
    names = [s.name for s in suite.scenarios]
    assert len(names) == 16 and len(set(names)) == 16
    assert set(names) == {"mmlu", "boolq", "narrative_qa", "natural_qa_closedbook", "natural_qa_openbook_longans",
                          "quac", "hellaswag", "openbookqa", "truthful_qa", "msmarco_regular", "msmarco_trec",
                          "summarization_cnndm", "summarization_xsum", "imdb", "raft", "civil_comments"}
    metric = {s.name: s.metric for s in suite.scenarios}
    assert metric["mmlu"] == metric["hellaswag"] == metric["truthful_qa"] == "exact_match"
    assert {metric[n] for n in ("boolq", "imdb", "civil_comments", "raft")} == {"quasi_exact_match"}
    assert {metric[n] for n in ("narrative_qa", "natural_qa_closedbook", "quac")} == {"f1_score"}
    assert (metric["msmarco_regular"], metric["msmarco_trec"]) == ("RR@10", "NDCG@10")
    assert metric["summarization_cnndm"] == metric["summarization_xsum"] == "rouge_2"
    generation = [s for s in suite.scenarios if s.method in ("generation", "multiple_choice_joint")]
    assert all(s.max_train_instances == 5 for s in generation)


def test_suite_errors_name_file_line_and_fix(tmp_path):
    text = DEFAULT_SUITE.read_text().replace("    max_tokens: 100\n", "    max_tokens: -1\n    shots: 5\n", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_helm_suite(bad)
    messages = e.value.messages
    assert any(re.match(rf"{re.escape(str(bad))}:\d+: scenarios\.2\.max_tokens: got -1", m) for m in messages)
    assert any("scenarios.2.shots: unknown key" in m for m in messages)


def test_unknown_scenario_lists_known_names():
    suite = load_helm_suite()
    with pytest.raises(ValueError, match=r"unknown HELM scenario\(s\): boolk; known: mmlu, boolq, "):
        select_scenarios(suite, ["boolq", "boolk"])
    assert [s.name for s in select_scenarios(suite, ["all"])] == [s.name for s in suite.scenarios]


def test_missing_data_file_names_path_and_format(tmp_path):
    spec = select_scenarios(load_helm_suite(), ["boolq"])[0]
    with pytest.raises(HelmDataError, match=rf"boolq: data file {re.escape(str(tmp_path / 'boolq' / 'train.jsonl'))} "
                                            r"not found \(and the hub dataset google/boolq split train could not be "
                                            r"loaded: .*\)\. Expected BoolQ jsonl") as e:
        load_subsets(spec, tmp_path)
    message = str(e.value)  # one line: what is missing, what was tried, what to put where
    assert "\n" not in message and message.endswith(
        "Fix: put the files under " f"{tmp_path / 'boolq'} (data directory/boolq), a copy of the hub dataset "
        "google/boolq (its repository's data files) under data directory/google/boolq, or choose other scenarios")
    mmlu = select_scenarios(load_helm_suite(), ["mmlu"])[0]
    subsets, skipped = load_subsets(mmlu, DATA)  # one subject of five present: the others are reported
    assert [s.name for s in subsets] == ["abstract_algebra"] and len(skipped) == 4
    assert "college_chemistry_dev.csv not found" in skipped[0]


def test_an_unreachable_hub_fails_at_once(tmp_path):
    """Not offline by setting, but no route to the hub: one message at once, not after datasets' retries."""
    from llmft.model.load import hub_resolves

    if hub_resolves():
        pytest.skip("the hub's host name resolves here")
    code = ("import sys, time; from llmft.eval.helm import load_helm_suite, select_scenarios, load_subsets, "
            "HelmDataError\nt = time.time()\ntry:\n    load_subsets(select_scenarios(load_helm_suite(), ['boolq'])[0], "
            f"{str(tmp_path)!r})\nexcept HelmDataError as e:\n    print(round(time.time() - t, 1), e)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    seconds, message = out.split(" ", 1)
    assert float(seconds) < 5 and "the hub, for google/boolq, is unreachable from here" in message, out


# ------------------------------------------------------------------ prompts


def helm_sample_examples(all_train_instances, max_train_instances, seed):
    """Transcription of InContextLearningAdapter.sample_examples (global random, as in HELM)."""
    random.seed(seed)
    num_instances_to_sample = min(len(all_train_instances), max_train_instances)
    examples = []
    unlabeled_instances = []
    label_to_instances = defaultdict(list)
    for instance in all_train_instances:
        if instance.golds:
            label_to_instances[instance.golds[0]].append(instance)
        else:
            unlabeled_instances.append(instance)
    counts_to_labels = defaultdict(list)
    for label, instances in sorted(label_to_instances.items()):
        counts_to_labels[len(instances)].append(label)
    sorted_labels = []
    for count in sorted(counts_to_labels, reverse=True):
        labels = counts_to_labels[count]
        random.shuffle(labels)
        sorted_labels.extend(labels)
    labels_iterable = cycle(sorted_labels)
    while num_instances_to_sample > 0:
        next_label = next(labels_iterable, None)
        if not next_label:
            break
        instances = label_to_instances[next_label]
        if len(instances) == 0:
            continue
        examples.append(instances.pop(random.randrange(len(instances))))
        num_instances_to_sample -= 1
    examples += random.sample(unlabeled_instances, num_instances_to_sample)
    return examples


@pytest.mark.parametrize("k,seed", [(5, 0), (5, 1), (8, 0), (3, 7)])
def test_sample_examples_matches_helm(k, seed):
    labels = ["A", "A", "A", "B", "B", "C", "C", "D"]
    train = [Instance(f"q{i}", [Reference(label, True)], "train") for i, label in enumerate(labels)]
    ours = [e.input for e in sample_examples(train, k, seed)]
    helm = [e.input for e in helm_sample_examples(train, k, seed)]
    assert ours == helm and len(ours) == k
    if k == 5:
        assert {train[int(q[1:])].golds[0] for q in ours} == {"A", "B", "C", "D"}  # every label gets its turn


def test_boolq_prompt_matches_helm_format(tiny_tokenizer):
    spec = select_scenarios(load_helm_suite(), ["boolq"])[0]
    (subset,), _ = load_subsets(spec, DATA)
    train = [i for i in subset.instances if i.split == "train"][:5]  # file order
    evals = [i for i in subset.instances if i.split == "valid"]
    assert len(evals) == 3
    blocks = [example_block(spec, e, include_output=True) for e in train]
    prompt = build_prompt(spec, tiny_tokenizer, subset.instructions, blocks, example_block(spec, evals[0], False),
                          max_length=100_000, completion_tokens=spec.max_tokens)
    expected = (
        "Passage: Elmendorf Air Force Base is a United States military facility in Anchorage, the largest city in "
        "Alaska.\nQuestion: Is there an air force base in anchorage alaska?\nAnswer: Yes\n"
        "\n"
        "Passage: Epsom railway station serves the town of Epsom in Surrey. It is not in the London Oyster card "
        "zone.\nQuestion: Can you use oyster card at epsom station?\nAnswer: No\n"
        "\n"
        "Passage: The Sun is the star at the center of the Solar System.\nQuestion: Is the sun a star?\nAnswer: Yes\n"
        "\n"
        "Passage: At sea level, pure water boils at 100 degrees Celsius.\n"
        "Question: Does water boil at 50 degrees celsius at sea level?\nAnswer: No\n"
        "\n"
        "Passage: Paris is the capital and most populous city of France.\nQuestion: Is paris the capital of france?\n"
        "Answer: Yes\n"
        "\n"
        "Passage: The Moon is Earth's only natural satellite, about a quarter of Earth's diameter.\n"
        "Question: Is the moon bigger than the earth?\nAnswer:"
    )
    assert prompt.text == expected
    assert (prompt.num_train_instances, prompt.num_dropped, prompt.truncated) == (5, 0, False)
    assert prompt.input_ids == tiny_tokenizer(expected).input_ids


def test_multiple_choice_prompts_match_helm_format():
    suite = load_helm_suite()
    mmlu = select_scenarios(suite, ["mmlu"])[0]
    (subset,), _ = load_subsets(mmlu, DATA)
    assert subset.instructions == "The following are multiple choice questions (with answers) about abstract algebra.\n"
    test = [i for i in subset.instances if i.split == "test"]
    assert example_block(mmlu, test[0], include_output=True) == (
        "Question: Find the degree for the given field extension Q(sqrt(2)) over Q.\nA. 0\nB. 2\nC. 1\nD. 3\n"
        "Answer: B\n")
    assert example_block(mmlu, test[0], include_output=False).endswith("D. 3\nAnswer:")
    hellaswag = select_scenarios(suite, ["hellaswag"])[0]
    (subset,), _ = load_subsets(hellaswag, DATA)
    first = subset.instances[0]
    assert example_block(hellaswag, first, include_output=True, reference_index=3) == (
        "Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing on a roof.")
    truthful = select_scenarios(suite, ["truthful_qa"])[0]
    (subset,), _ = load_subsets(truthful, DATA)
    first = subset.instances[0]  # best answer appended to the 3 incorrect ones, rotated by ord("T") % 4 == 0
    assert [(r.text, r.correct) for r in first.references] == [
        ("You grow watermelons in your stomach.", False), ("You get sick.", False), ("You die.", False),
        ("The watermelon seeds pass through your digestive system.", True)]
    assert [i.split for i in subset.instances] == ["train", "valid", "valid", "valid", "valid"]


def test_truthfulqa_columns_are_read_by_name(tmp_path):
    """The 2025 TruthfulQA.csv inserts a "Best Incorrect Answer" column: the same instances come out."""
    import csv

    truthful = select_scenarios(load_helm_suite(), ["truthful_qa"])[0]
    (old,), _ = load_subsets(truthful, DATA)
    with open(DATA / "truthful_qa" / "TruthfulQA.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    (tmp_path / "truthful_qa").mkdir()
    with open(tmp_path / "truthful_qa" / "TruthfulQA.csv", "w", encoding="utf-8", newline="") as f:
        fields = ["Type", "Category", "Question", "Best Answer", "Best Incorrect Answer", "Correct Answers",
                  "Incorrect Answers", "Source"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "Best Incorrect Answer": r["Incorrect Answers"].split(";")[0]} for r in rows)
    (new,), _ = load_subsets(truthful, tmp_path)
    assert new.instances == old.instances and len(new.instances) == 5


def short_boolq(n: int, passage: str = "Sky is blue.") -> list[Instance]:
    return [Instance(f"{passage}\nQuestion: Is it {i}?", [Reference("Yes" if i % 2 else "No", True)], "train")
            for i in range(n)]


def test_examples_dropped_to_fit_short_context(tiny_tokenizer):
    spec = select_scenarios(load_helm_suite(), ["boolq"])[0]
    train, (query,) = short_boolq(5), short_boolq(1, "Grass is green.")
    blocks = [example_block(spec, e, include_output=True) for e in train]
    eval_block = example_block(spec, query, include_output=False)
    prompt = build_prompt(spec, tiny_tokenizer, "", blocks, eval_block, max_length=128, completion_tokens=5)
    assert 0 < prompt.num_dropped < 5 and prompt.num_train_instances == 5 - prompt.num_dropped
    assert not prompt.truncated and len(prompt.input_ids) + 5 <= 128
    assert prompt.text == "\n".join(blocks[: prompt.num_train_instances] + [eval_block])  # the last ones went first
    one_more = "\n".join(blocks[: prompt.num_train_instances + 1] + [eval_block])
    assert len(tiny_tokenizer(one_more).input_ids) + 5 > 128  # dropping one fewer would not fit


def test_prompt_truncated_from_right_when_no_example_fits(tiny_tokenizer):
    spec = select_scenarios(load_helm_suite(), ["boolq"])[0]
    (query,) = short_boolq(1, "A very long passage about the weather. " * 40)
    blocks = [example_block(spec, e, include_output=True) for e in short_boolq(5)]
    prompt = build_prompt(spec, tiny_tokenizer, "", blocks, example_block(spec, query, False), 128, 5)
    assert (prompt.num_dropped, prompt.num_train_instances, prompt.truncated) == (5, 0, True)
    assert len(prompt.input_ids) == 128 - 5
    assert prompt.text.startswith("Passage: A very long passage") and not prompt.text.endswith("Answer:")


# ------------------------------------------------------------------ end to end on a tiny random LLaMA


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory, book_text) -> Path:
    """Tiny random LLaMA with a 1024-token context (the prompts fit with their 5 examples)."""
    from llmft.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("helm") / "long", text=book_text, vocab_size=512, hidden_size=64,
                           num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory, book_text) -> Path:
    """The same architecture with a 128-token context."""
    from llmft.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("helm") / "short", text=book_text, vocab_size=512, hidden_size=64,
                           num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_short):
    return AutoTokenizer.from_pretrained(tiny_short)


def test_run_helm_end_to_end_tiny_model(tiny_long, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_long)
    tokenizer = AutoTokenizer.from_pretrained(tiny_long)
    lines = []
    results = run_helm(model, tokenizer, ["boolq", "mmlu"], DATA, max_instances=None, seed=0, log=lines.append)
    assert list(results) == ["boolq", "mmlu"]
    boolq, mmlu = results["boolq"], results["mmlu"]
    assert (boolq["metric"], boolq["instances"], boolq["trials"], boolq["prompts"]) == ("quasi_exact_match", 3, 3, 9)
    assert (mmlu["metric"], mmlu["instances"], mmlu["trials"]) == ("exact_match", 4, 3)
    assert mmlu["subsets"]["abstract_algebra"]["instances"] == 4
    assert len(mmlu["subsets_missing"]) == 4
    for r in results.values():
        assert 0.0 <= r["score"] <= 1.0
        assert r["in_context_examples_dropped"] == 0 and r["mean_in_context_examples"] == 5
        assert r["score"] == pytest.approx(sum(p["score"] for p in r["predictions"]) / (r["instances"] * 3))
    for p in boolq["predictions"]:  # the score is HELM's quasi-exact match of the stripped completion
        assert p["score"] == helm_score("quasi_exact_match", p["references"], p["prediction"])
        assert "\n" not in p["prediction"]  # cut at the stop sequence
    assert mmlu["sample_prompt"].startswith("The following are multiple choice questions (with answers) about abstract")
    assert len(lines) == 2 and lines[0].startswith("helm boolq: quasi_exact_match = ")

    # a sample of instances, the same one for the same seed
    again = run_helm(model, tokenizer, ["boolq"], DATA, max_instances=2, seed=0, log=lines.append)
    assert again["boolq"]["instances"] == 2
    with pytest.raises(ValueError, match="trials: got 0; expected at least 1"):
        run_helm(model, tokenizer, ["boolq"], DATA, trials=0)

    json_path, md_path = write_helm_report(results, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["boolq"]["score"] == boolq["score"] and saved["mmlu"]["instances"] == 4
    table = md_path.read_text()
    assert "| BoolQ | quasi_exact_match | " in table and "| MMLU | exact_match | " in table
    assert "| score | ± | trials |" in table and f"| {boolq['stddev']:.3f} | 3 | 3 |" in table
    assert format_helm_table(results) in table


def test_run_helm_reports_dropped_examples_on_short_context(tiny_short):
    model = AutoModelForCausalLM.from_pretrained(tiny_short)
    tokenizer = AutoTokenizer.from_pretrained(tiny_short)
    result = run_helm(model, tokenizer, ["boolq"], DATA, max_instances=None, seed=0, log=lambda _: None)["boolq"]
    assert result["context_length"] == 128 and result["instances"] == 3 and result["prompts"] == 9  # 3 trials
    assert result["prompts_with_dropped_examples"] == 9 and result["in_context_examples_dropped"] > 0
    assert result["mean_in_context_examples"] == pytest.approx(5 - result["in_context_examples_dropped"] / 9)
    assert f"5 ({result['in_context_examples_dropped']})" in format_helm_table({"boolq": result})


# ------------------------------------------------------------------ train trials


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def boolq_block(row: dict, with_answer: bool) -> str:
    """HELM's BoolQ example block, written from the raw row (PassageQuestionInput, "Answer:" output prefix)."""
    question = row["question"].strip().capitalize()
    question += "" if question.endswith("?") else "?"
    text = f"Passage: {row['passage']}\nQuestion: {question}\nAnswer:"
    return text + (f" {'Yes' if row['answer'] else 'No'}\n" if with_answer else "")


def helm_trial_draws(train_rows: list[dict], k: int, trials: int) -> list[list[int]]:
    """Row indices HELM's sample_examples draws in train trials 0..trials-1 (seed = train-trial index)."""
    instances = [Instance(str(i), [Reference("Yes" if r["answer"] else "No", True)], "train")
                 for i, r in enumerate(train_rows)]
    return [[int(e.input) for e in helm_sample_examples(list(instances), k, trial)] for trial in range(trials)]


def test_train_trials_draw_helm_examples_on_the_same_instances(tiny_long):
    """Three trials: HELM's draws for train-trial indices 0, 1, 2, the same sampled eval instances, and per-trial
    predictions and scores equal to an independent greedy run on independently written prompts."""
    model = AutoModelForCausalLM.from_pretrained(tiny_long)
    tokenizer = AutoTokenizer.from_pretrained(tiny_long)
    result = run_helm(model, tokenizer, ["boolq"], DATA, max_instances=2, seed=0, log=lambda _: None)["boolq"]
    train_rows, dev_rows = read_jsonl(DATA / "boolq" / "train.jsonl"), read_jsonl(DATA / "boolq" / "dev.jsonl")
    draws = helm_trial_draws(train_rows, 5, 3)
    assert result["trials"] == 3 and result["subsets"]["boolq"]["in_context_example_ids"] == draws
    assert len({tuple(d) for d in draws}) == 3  # three different draws
    chosen = random.Random(0).sample(range(len(dev_rows)), 2)  # the instance sample, drawn once with the seed
    trial_scores = []
    for trial, draw in enumerate(draws):
        records = [p for p in result["predictions"] if p["trial"] == trial]
        assert [p["instance_id"] for p in records] == chosen  # the same instances in every trial
        scores = []
        for p, i in zip(records, chosen):
            prompt = "\n".join([boolq_block(train_rows[j], True) for j in draw] + [boolq_block(dev_rows[i], False)])
            ids = torch.tensor([tokenizer(prompt).input_ids])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id)
            prediction = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
            assert p["prediction"] == prediction
            scores.append(helm_score("quasi_exact_match", ["Yes" if dev_rows[i]["answer"] else "No"], prediction))
        trial_scores.append(sum(scores) / len(scores))
    assert result["trial_scores"] == pytest.approx(trial_scores)
    assert result["score"] == pytest.approx(sum(trial_scores) / 3)
    assert result["stddev"] == pytest.approx(statistics.pstdev(trial_scores))  # HELM's Stat.stddev: population


def test_trial_scores_are_averaged_and_their_spread_reported(tiny_long, monkeypatch):
    """With an instance score that depends on the trial's examples (the share of examples whose answer is the
    instance's), the reported score is the mean of the per-trial scores computed here and the ± is their spread."""
    import llmft.eval.helm.runner as helm

    def score_by_examples(spec, model, tokenizer, instructions, train_blocks, inst, max_length, counters):
        share = sum(b.endswith(f"Answer: {inst.golds[0]}\n") for b in train_blocks) / max(len(train_blocks), 1)
        return {"prediction": "", "references": inst.golds, "score": share}

    monkeypatch.setattr(helm, "_evaluate_instance", score_by_examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_long)
    results = run_helm(model, None, ["boolq", "hellaswag"], DATA, seed=0, trials=3, log=lambda _: None)
    train_rows, dev_rows = read_jsonl(DATA / "boolq" / "train.jsonl"), read_jsonl(DATA / "boolq" / "dev.jsonl")
    expected = [sum(sum(train_rows[j]["answer"] == row["answer"] for j in draw) / 5 for row in dev_rows) / 3
                for draw in helm_trial_draws(train_rows, 5, 3)]
    boolq = results["boolq"]
    assert len(set(expected)) > 1 and boolq["trial_scores"] == pytest.approx(expected)
    assert boolq["score"] == pytest.approx(statistics.mean(expected))
    assert boolq["stddev"] == pytest.approx(statistics.pstdev(expected)) and boolq["stddev"] > 0
    assert boolq["subsets"]["boolq"]["trial_scores"] == pytest.approx(expected)
    assert results["hellaswag"]["trials"] == 1 and results["hellaswag"]["stddev"] == 0  # zero-shot: one trial
    row = next(line for line in format_helm_table(results).splitlines() if line.startswith("| BoolQ |"))
    assert row.startswith(f"| BoolQ | quasi_exact_match | {boolq['score']:.3f} | {boolq['stddev']:.3f} | 3 | 3 |")


def option_logprob(model, tokenizer, text: str, option: str) -> float:
    """Independent: log P(last tokens = " option" | the rest) by cross entropy over the whole text."""
    ids = torch.tensor([tokenizer(text).input_ids])
    n = len(tokenizer(" " + option, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits[-n:], ids[0, -n:], reduction="sum")
    return -float(nll), n


def test_separate_and_joint_multiple_choice_run(tiny_long):
    model = AutoModelForCausalLM.from_pretrained(tiny_long)
    tokenizer = AutoTokenizer.from_pretrained(tiny_long)
    results = run_helm(model, tokenizer, ["hellaswag", "openbookqa", "truthful_qa"], DATA, max_instances=None,
                       seed=0, log=lambda _: None)
    hellaswag, openbookqa = results["hellaswag"], results["openbookqa"]
    assert hellaswag["trials"] == openbookqa["trials"] == 1  # zero-shot: one trial, as HELM sets
    assert hellaswag["instances"] == 2 and hellaswag["prompts"] == 8  # one prompt per ending, zero-shot
    assert openbookqa["instances"] == 2 and openbookqa["prompts"] == 16  # plus one calibration prompt per option
    assert hellaswag["in_context_examples"] == openbookqa["in_context_examples"] == 0
    # original: mean log probability per option token; calibrated: log P(option | question) - log P(option | Answer:)
    rows = [json.loads(line) for line in (DATA / "hellaswag" / "hellaswag_val.jsonl").read_text().splitlines()]
    for row, p in zip(rows, hellaswag["predictions"]):
        question = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'][0].upper() + row['ctx_b'][1:]}"
        scores = [lp / n for lp, n in (option_logprob(model, tokenizer, f"{question} {e}", e) for e in row["endings"])]
        best = max(range(4), key=lambda i: scores[i])
        assert p["prediction"] == row["endings"][best] and p["score"] == float(best == row["label"])
    rows = [json.loads(line) for line in (DATA / "openbookqa" / "test.jsonl").read_text().splitlines()]
    for row, p in zip(rows, openbookqa["predictions"]):
        options = [c["text"] for c in row["question"]["choices"]]
        scores = [option_logprob(model, tokenizer, f"{row['question']['stem']} {o}", o)[0]
                  - option_logprob(model, tokenizer, f"Answer: {o}", o)[0] for o in options]
        best = max(range(4), key=lambda i: scores[i])
        assert p["prediction"] == options[best] and p["score"] == float("ABCD"[best] == row["answerKey"])
    truthful = results["truthful_qa"]
    assert truthful["instances"] == 4 and truthful["mean_in_context_examples"] == 1  # one train question exists
    for p in truthful["predictions"]:  # joint: the letter is mapped back to its option; anything else scores 0
        assert p["score"] in (0.0, 1.0) and len(p["prediction"]) <= 8


def test_generation_is_greedy_and_cut_at_the_first_stop_sequence(tiny_long):
    model = AutoModelForCausalLM.from_pretrained(tiny_long)
    tokenizer = AutoTokenizer.from_pretrained(tiny_long)
    ids = tokenizer("Passage: It was a dark and stormy night.\nAnswer:").input_ids
    full, full_logprob = generate(model, tokenizer, ids, 12, [])
    with torch.no_grad():  # greedy: the first token is the argmax of a plain forward pass
        first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    assert full.startswith(tokenizer.decode([first]))
    stop = next(full[i: i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i: i + 2].strip())
    cut, cut_logprob = generate(model, tokenizer, ids, 12, ["@@never@@", stop])
    assert cut == full[: full.index(stop)]
    assert full_logprob <= cut_logprob <= 0.0  # fewer tokens kept, each log probability <= 0


def write_msmarco(root: Path) -> None:
    """MS MARCO passage-track files in HELM's names: one train query (gold + BM25 top 20), one dev query (top 30)."""
    root.mkdir(parents=True)
    docs = {d: f"Passage {d} talks about topic {d % 7}." for d in range(1, 61)}
    (root / "documents.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in docs.items()))
    (root / "train_queries.tsv").write_text("1\twhat is topic one\n2\twhat is topic two\n")
    (root / "train_qrels.tsv").write_text("1\t0\t1\t1\n2\t0\t2\t1\n")
    (root / "train_topk.tsv").write_text("".join(f"{q}\t{d}\t{d}\n" for q in (1, 2) for d in range(1, 21)))
    (root / "regular_queries.tsv").write_text("100\twhich passage mentions topic five\n")
    (root / "regular_qrels.tsv").write_text("100\t0\t40\t1\n")
    (root / "regular_topk.tsv").write_text("".join(f"100\t{d}\t{d - 30}\n" for d in range(31, 61)))


def test_msmarco_ranking_run(tiny_long, tmp_path):
    write_msmarco(tmp_path / "msmarco")
    model = AutoModelForCausalLM.from_pretrained(tiny_long)
    tokenizer = AutoTokenizer.from_pretrained(tiny_long)
    result = run_helm(model, tokenizer, ["msmarco_regular"], tmp_path, max_instances=None, seed=0, trials=1,
                      log=lambda _: None)["msmarco_regular"]  # one trial: 30 prompts each
    assert result["metric"] == "RR@10" and result["instances"] == 1 and result["prompts"] == 30
    (prediction,) = result["predictions"]
    assert sorted(prediction["ranking"]) == list(range(30)) and len(prediction["references"]) == 1
    position = prediction["ranking"].index(prediction["references"][0]) + 1
    assert result["score"] == pytest.approx(1 / position if position <= 10 else 0.0)
    assert "Does the passage answer the query?\nAnswer: Yes\n" in result["sample_prompt"]
    assert result["sample_prompt"].endswith("Query: which passage mentions topic five\n"
                                            "Does the passage answer the query?\nAnswer:")


# ------------------------------------------------------------------ loaders of the other public formats


def spec_of(name: str):
    return select_scenarios(load_helm_suite(), [name])[0]


def only_subset(name: str, data_dir: Path):
    (subset,), skipped = load_subsets(spec_of(name), data_dir)
    return subset


def test_narrativeqa_loader_one_question_per_summary(tmp_path):
    root = tmp_path / "narrative_qa"
    root.mkdir()
    (root / "summaries.csv").write_text(
        "document_id,set,summary,summary_tokenized\n"
        "d1,train,\" Mark Hunter starts a pirate radio station. \",x\n"
        "d2,test,Victor Frankenstein builds a creature.,x\n")
    (root / "qaps.csv").write_text(
        "document_id,set,question,answer1,answer2,question_tokenized,answer1_tokenized,answer2_tokenized\n"
        "d1,train,Who is Mark Hunter,A loner,A student,x,x,x\n"
        "d2,test,Who builds the creature?,Victor,Frankenstein,x,x,x\n"
        "d2,test,What does Victor build,A creature,A monster,x,x,x\n")
    subset = only_subset("narrative_qa", tmp_path)
    train, test = subset.instances
    assert (train.split, test.split) == ("train", "test")
    assert train.input == "Mark Hunter starts a pirate radio station.\nQuestion: Who is Mark Hunter?"
    assert train.golds == ["A loner", "A student"]
    rnd = random.Random(0)  # HELM: random.seed(0), one random.choice per document, splits in order
    rnd.choice([0])
    question = ["Who builds the creature?", "What does Victor build?"][rnd.choice([0, 1])]
    assert test.input == f"Victor Frankenstein builds a creature.\nQuestion: {question}"
    assert example_block(spec_of("narrative_qa"), train, True) == (
        "Passage: Mark Hunter starts a pirate radio station.\nQuestion: Who is Mark Hunter?\nAnswer: A loner\n")


def test_natural_qa_loader_reads_nq_dev_format(tmp_path):
    def sample(question, context, short):
        html_doc = f"<P>{context}</P>"
        start = html_doc.index(short)
        answers = [{"long_answer": {"start_byte": 0, "end_byte": len(html_doc.encode())},
                    "short_answers": [{"start_byte": len(html_doc[:start].encode()),
                                       "end_byte": len(html_doc[:start].encode()) + len(short.encode())}]}]
        return {"document_html": html_doc, "document_title": "t", "question_text": question, "annotations": answers,
                "document_tokens": []}

    root = tmp_path / "natural_qa"
    root.mkdir()
    rows = [sample("who wrote frankenstein", "Frankenstein was written by Mary Shelley.", "Mary Shelley"),
            sample("where is the louvre", "The Louvre is in Paris &amp; is a museum.", "Paris"),
            {"document_html": "<P>x</P>", "document_title": "t", "question_text": "no answer", "document_tokens": [],
             "annotations": [{"long_answer": {"start_byte": -1, "end_byte": -1}, "short_answers": []}]}]
    (root / "nq-dev-00.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    closed = only_subset("natural_qa_closedbook", tmp_path).instances
    assert [(i.input, i.split, i.golds) for i in closed] == [
        ("Who wrote frankenstein?", "train", ["Mary Shelley"]), ("Where is the louvre?", "valid", ["Paris"])]
    (_, valid) = only_subset("natural_qa_openbook_longans", tmp_path).instances
    assert valid.input == "Passage: The Louvre is in Paris & is a museum.\n\nQuestion: Where is the louvre?"
    assert example_block(spec_of("natural_qa_openbook_longans"), valid, False).endswith("louvre?\nAnswer:")


def test_quac_loader_builds_dialogue_prefix(tmp_path):
    def dialogue(n):
        qas = [
            {"question": f"q{i}", "orig_answer": {"text": f"a{i}"}, "answers": [{"text": f"a{i}"}, {"text": f"a{i}"}]}
            for i in range(n)
        ]
        return {"title": "T", "background": "B", "section_title": "S",
                "paragraphs": [{"context": "C C CANNOTANSWER", "qas": qas}]}

    root = tmp_path / "quac"
    root.mkdir()
    (root / "train_v0.2.json").write_text(json.dumps({"data": [dialogue(3)]}))
    (root / "val_v0.2.json").write_text(json.dumps({"data": [dialogue(6)]}))
    train, valid = only_subset("quac", tmp_path).instances
    rnd = random.Random(0)
    k_train, k_valid = rnd.randint(3, 3) - 1, rnd.randint(3, 6) - 1
    assert k_train == 2 and train.input == (
        "Title: T\n\nBackground: B\n\nSection: S\nPassage: C C\n\nQuestion: q0\nAnswer: a0\n\nQuestion: q2")
    history = "".join(f"Question: q{i}\nAnswer: a{i}\n\n" for i in range(k_valid - 1))  # HELM skips q(k-1)
    assert valid.input == f"Title: T\n\nBackground: B\n\nSection: S\nPassage: C C\n\n{history}Question: q{k_valid}"
    assert valid.golds == [f"a{k_valid}"]  # duplicates removed


def test_summarization_loader_filters_and_truncates(tmp_path):
    root = tmp_path / "summarization_xsum"
    root.mkdir()
    words = " ".join(f"w{i}" for i in range(600))
    rows = {"train": [{"document": " ".join(words.split()[:80]), "summary": "one two three four five six seven eight "
                                                                              "nine ten eleven"},
                      {"document": " ".join(words.split()[:30]), "summary": "too short an article for training use"},
                      {"document": " ".join(words.split()[:80]), "summary": "short summary"}],
            "test": [{"document": words.replace("w5 ", "w5\n"), "summary": "{Braced} summary\nline"}]}
    for split, items in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    instances = only_subset("summarization_xsum", tmp_path).instances
    assert [i.split for i in instances] == ["train", "test"]  # 30-word article and <= 10-word summary dropped
    test = instances[1]
    assert len(test.input.split()) == 512 and "\n" not in test.input
    assert test.golds == ["{Braced} summary line"]
    spec = spec_of("summarization_xsum")
    assert example_block(spec, test, False).endswith("\n\nSummarize the above article in 1 sentence.")
    assert example_block(spec, instances[0], True).startswith("###\nArticle: w0 w1")


def test_imdb_raft_civil_comments_loaders(tmp_path):
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            (tmp_path / "imdb" / split / label).mkdir(parents=True)
            (tmp_path / "imdb" / split / label / "0_9.txt").write_text(f" A {label} review. \n")
    imdb = only_subset("imdb", tmp_path).instances
    assert [(i.input, i.golds[0], i.split) for i in imdb] == [
        ("A pos review.", "Positive", "train"), ("A neg review.", "Negative", "train"),
        ("A pos review.", "Positive", "valid"), ("A neg review.", "Negative", "valid")]

    raft = tmp_path / "raft"
    raft.mkdir()
    (raft / "prompt_construction_settings.json").write_text(
        json.dumps({"ade_corpus_v2": ["Sentence"]}) + "\n" + json.dumps({"ade_corpus_v2": "Label the sentence."}))
    (raft / "ade_corpus_v2.jsonl").write_text("".join(json.dumps(
        {"Sentence": f"s{i}", "ID": i, "Label": "ADE-related" if i % 3 == 0 else "not ADE-related"}) + "\n"
        for i in range(10)))
    (subset,), skipped = load_subsets(spec_of("raft"), tmp_path)
    assert subset.instructions == "Label the sentence.\n" and len(skipped) == 10
    splits = [i.split for i in subset.instances]
    assert splits.count("train") == 2 and splits.count("test") == 8  # train_test_split(test_size=0.8, seed=42)
    assert {i.input for i in subset.instances} == {f"Sentence: s{i}" for i in range(10)}
    assert example_block(spec_of("raft"), subset.instances[0], True).startswith("Sentence: s")

    civil = tmp_path / "civil_comments"
    civil.mkdir()
    (civil / "all_data_with_identities.csv").write_text(
        ",id,comment_text,split,toxicity,male,female\n"
        "0,1,You are great,train,0.0,0.0,0.9\n"
        "1,2,You are awful,test,0.8,0.7,\n"
        "2,3,Nice weather,test,0.1,0.0,0.6\n")
    spec = spec_of("civil_comments")
    subsets, skipped = load_subsets(spec, tmp_path)
    by_name = {s.name: s.instances for s in subsets}
    assert [i.golds[0] for i in by_name["all"]] == ["False", "True", "False"]
    assert [i.input for i in by_name["male"]] == ["You are awful\nQuestion: Is the passage above toxic?"]
    assert len(by_name["female"]) == 2 and by_name["LGBTQ"] == []


# ------------------------------------------------------------------ scenario data from a datasets (hub) directory


def write_hub_repo(repo: Path, splits: dict[str, list[dict]], config: str | None = None, features=None,
                   suffix: str = "parquet") -> None:
    """A dataset directory laid out like its Hub repository: data/<split>-00000-of-00001.<suffix>, or, for a named
    configuration, <config>/<split>-... files listed under `configs` in README.md (as cais/mmlu, cnn_dailymail do)."""
    import datasets

    folder = repo / (config or "data")
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        path = folder / f"{split}-00000-of-00001.{suffix}"
        if suffix == "parquet":
            datasets.Dataset.from_list(rows, features=features).to_parquet(path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
        (repo / "README.md").write_text("\n".join(lines + ["---", ""]))


def mmlu_hub_rows(path: Path) -> list[dict]:
    """cais/mmlu rows of one Hendrycks CSV: {question, subject, choices, answer: index of the letter}."""
    import csv

    with open(path, newline="") as f:
        return [{"question": r[0], "subject": "abstract_algebra", "choices": r[1:5], "answer": "ABCD".index(r[5])}
                for r in csv.reader(f)]


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """A data directory holding, at their hub ids, copies of four scenarios' hub datasets in the hub's schemas
    (written from the local fixture files) and none of the local files; datasets' cache goes to tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    boolq = {split: [{"question": r["question"], "answer": r["answer"], "passage": r["passage"]}
                     for r in read_jsonl(DATA / "boolq" / f"{stem}.jsonl")]
             for split, stem in (("train", "train"), ("validation", "dev"))}
    write_hub_repo(data / "google" / "boolq", boolq)
    hellaswag = [{**r, "label": str(r["label"])} for r in read_jsonl(DATA / "hellaswag" / "hellaswag_val.jsonl")]
    write_hub_repo(data / "Rowan" / "hellaswag", {"validation": hellaswag}, suffix="jsonl")  # label: "3"
    openbookqa = [{"id": r["id"], "question_stem": r["question"]["stem"],
                   "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                               "label": [c["label"] for c in r["question"]["choices"]]},
                   "answerKey": r["answerKey"]} for r in read_jsonl(DATA / "openbookqa" / "test.jsonl")]
    write_hub_repo(data / "allenai" / "openbookqa", {"test": openbookqa}, config="main")
    features = datasets.Features({"question": datasets.Value("string"), "subject": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.ClassLabel(names=["A", "B", "C", "D"])})
    mmlu = {split: mmlu_hub_rows(DATA / "mmlu" / split / f"abstract_algebra_{split}.csv") for split in ("dev", "test")}
    write_hub_repo(data / "cais" / "mmlu", mmlu, config="abstract_algebra", features=features)
    return data


def test_hub_layout_directory_gives_the_local_files_instances_and_scores(tiny_long, hub_dir):
    """Local files absent: each scenario reads its hub dataset's copy under data_dir/<hub id> (parquet or jsonl
    data files, configurations from README.md), converts the hub schema, and scores exactly as from the files."""
    names = ["boolq", "mmlu", "hellaswag", "openbookqa"]
    for name in names:
        subsets, skipped = load_subsets(spec_of(name), hub_dir)
        local, _ = load_subsets(spec_of(name), DATA)
        assert [s.instances for s in subsets] == [s.instances for s in local] and subsets[0].instances
    (_, skipped) = load_subsets(spec_of("mmlu"), hub_dir)  # subjects without a configuration are reported
    assert len(skipped) == 4 and f"hub dataset {hub_dir / 'cais' / 'mmlu'} config college_chemistry split dev" \
        in skipped[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_long)
    tokenizer = AutoTokenizer.from_pretrained(tiny_long)
    run = ["boolq", "mmlu"]  # generation through the model; the other two differ in their loaders only
    from_hub = run_helm(model, tokenizer, run, hub_dir, max_instances=2, seed=0, trials=1, log=lambda _: None)
    from_files = run_helm(model, tokenizer, run, DATA, max_instances=2, seed=0, trials=1, log=lambda _: None)
    for name in run:
        assert from_hub[name]["score"] == from_files[name]["score"]
        assert from_hub[name]["predictions"] == from_files[name]["predictions"]


def test_hub_schema_of_summarization_and_a_missing_hub_split(hub_dir):
    """cnn_dailymail's 3.0.0 configuration reads like the jsonl files; a hub copy without the needed split is one
    error naming the local file, the copy and the split."""
    words = " ".join(f"w{i}" for i in range(80))
    rows = {"train": [{"article": words, "highlights": "Police said two men were held.\nThey were released.",
                       "id": "a"}],
            "test": [{"article": "A short test article.", "highlights": "Short.", "id": "b"}]}
    local = hub_dir / "files" / "summarization_cnndm"
    local.mkdir(parents=True)
    for split, items in rows.items():
        (local / f"{split}.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("article", "highlights")}) + "\n"
                                                      for r in items))
    write_hub_repo(hub_dir / "abisee" / "cnn_dailymail", rows, config="3.0.0")
    assert only_subset("summarization_cnndm", hub_dir).instances == only_subset(
        "summarization_cnndm", hub_dir / "files").instances
    write_hub_repo(hub_dir / "files" / "google" / "boolq", {"train": [{"question": "q", "answer": True,
                                                                        "passage": "p"}]})
    with pytest.raises(HelmDataError) as e:
        load_subsets(spec_of("boolq"), hub_dir / "files")
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        f"boolq: data file {hub_dir / 'files' / 'boolq' / 'dev.jsonl'} not found (and the hub dataset "
        f"{hub_dir / 'files' / 'google' / 'boolq'} split validation could not be loaded: ValueError: ")
    assert "Expected BoolQ jsonl files" in message and "or choose other scenarios" in message


def test_llmft_eval_helm_cli(tiny_long, tmp_path, capsys):
    """`llmft eval --helm` runs the scenarios on a model directory and writes the report; bad input exits 2."""
    from llmft.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--helm", "boolq", "--helm-data", str(DATA), "--model", str(tiny_long),
                 "--max-instances", "2", "--helm-trials", "2", "--out", str(out)]) == 0
    assert "| BoolQ | quasi_exact_match | " in capsys.readouterr().out
    saved = json.loads((out / "helm.json").read_text())
    assert saved["boolq"]["instances"] == 2 and 0.0 <= saved["boolq"]["score"] <= 1.0
    assert saved["boolq"]["trials"] == 2 and len(saved["boolq"]["trial_scores"]) == 2
    assert main(["eval", "--helm", "boolq", "--helm-data", str(DATA), "--model", str(tiny_long),
                 "--helm-trials", "0"]) == 2
    assert "--helm-trials: got 0; expected at least 1" in capsys.readouterr().err
    assert main(["eval", "--helm", "boolk", "--helm-data", str(DATA), "--model", str(tiny_long)]) == 2
    err = capsys.readouterr().err
    assert "boolk" in err and "boolq" in err and "Traceback" not in err
    assert main(["eval", "--helm", "imdb", "--helm-data", str(tmp_path), "--model", str(tiny_long)]) == 2
    assert "not found" in capsys.readouterr().err
