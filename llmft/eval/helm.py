"""HELM core scenarios (HELM v1.0 "core"): scenario data, HELM's prompts, generation, main metrics.

The suite is defined in ``llmft/eval/helm_core.yaml`` (validated by :class:`HelmSuite`): the 16 core scenarios with
HELM's adapter settings (instructions, prefixes, in-context examples, max tokens, stop sequences) and main metric.
Everything below follows HELM's code (stanford-crfm/helm, ``src/helm/benchmark/``); where we differ it says so.

Prompt (``adaptation/adapters/in_context_learning_adapter.py``, ``adaptation/prompt.py``)::

    <instructions>            (only if not empty; HELM appends "\\n" to non-empty instructions)
    <instance_prefix = "\\n">
    <input_prefix><train input><input_suffix><output_prefix><train output><output_suffix>   x k
    <instance_prefix>
    <input_prefix><eval input><input_suffix><output_prefix.rstrip()>

e.g. BoolQ: ``Passage: ...\\nQuestion: Is ...?\\nAnswer: Yes\\n`` blocks, the last one ending in ``Answer:``.
``multiple_choice_joint`` adds ``A. <option>\\n`` lines after the input and the answer is the letter (a
prediction is mapped back to the option text before scoring); ``multiple_choice_separate_*`` score every option
by its log probability after the input (HellaSwag, OpenbookQA in HELM v1.0, zero-shot); ``ranking_binary`` asks
"Does the passage answer the query?" for every (query, passage) pair (MS MARCO) and ranks the passages as HELM's
RankingMetric does: greedy answer "Yes" first, most probable first (by the completion's log probability), then "No",
least probable first, then anything else; RR@10 / NDCG@10 follow trec_eval on that ranking.

In-context examples (``sample_examples``): drawn from the train split cycling through the labels from the most
frequent, so both answers of a yes/no task appear. Train trials: HELM v1.0 runs three (``num_train_trials=3``), and
trial t draws its examples after ``random.seed(t)`` (``_adapt_trial_index``); trial t here draws with seed
``seed + t``, so the default seed 0 gives HELM's draws 0, 1, 2. Every trial scores the same eval instances; a
scenario's score is the mean over trials of the trial's score (``Metric.evaluate``: per-trial mean, then
``merge_stat`` of ``take_mean()``), reported with the per-trial scores and their standard deviation (population, as
HELM's ``Stat.stddev``). A zero-shot scenario runs one trial, as HELM's ``run_entries_to_run_specs`` sets.

Fitting (``_make_prompt_fit``): while ``len(prompt tokens) + max_tokens`` exceeds the model's
context, the last in-context example is dropped; with none left, the prompt is cut from the right to
``context - max_tokens`` tokens (HELM's ``WindowService.truncate_from_right``, HuggingFace's default truncation
side; this can cut the final "Answer:" of a very long input, as in HELM). Token counts include the special tokens
the tokenizer adds (BOS for LLaMA), i.e. what the model actually reads.

Generation: greedy (``model.generate``, ``do_sample=False``) for ``max_tokens`` new tokens, cut at the first
stop sequence; the prediction scored is the stripped completion (HELM's ``compute_reference_metrics``).
Summarization uses greedy decoding where HELM samples at temperature 0.3. ``max_instances`` scores a seeded random
sample of the eval split (HELM's ``max_eval_instances``, 1000 in v1.0), the same sample in every trial.

Data: local files in each scenario's public format under ``data_dir/<scenario path>`` (see :data:`FORMAT_HELP`),
or, for the scenarios with an ``hf_dataset`` in the suite, that ``datasets`` dataset when the local file is missing:
``data_dir/<hub id>`` if it is a directory (a copy of the hub repository, e.g. ``huggingface-cli download google/boolq
--repo-type dataset --local-dir data/helm/google/boolq``, read offline), else the hub id itself (network or cache)
or a directory path given as the name. Hub rows are converted to the instance the local file's row gives.
Scenarios with subsets (MMLU subjects, RAFT tasks, CivilComments demographics) are scored per subset and averaged
over the subsets present, as HELM averages its runs; a subset whose files are missing is reported and skipped.
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any

import torch

from llmft.config.eval import HelmSuite, ScenarioSpec
from llmft.config.loading import load_validated
from llmft.eval import helm_metrics as hm
from llmft.model.build import hub_resolves

DEFAULT_SUITE = Path(__file__).with_name("helm_core.yaml")  # package data: found after a wheel install too

TRAIN, VALID, TEST = "train", "valid", "test"

# What each loader reads, relative to ``data_dir/<scenario path>`` (shown in "file not found" errors).
FORMAT_HELP: dict[str, str] = {
    "mmlu_csv": "Hendrycks' data.tar layout: dev/<subject>_dev.csv (in-context examples) and test/<subject>_test.csv "
                "(val/<subject>_val.csv for eval_split valid); rows question,A,B,C,D,answer-letter, no header",
    "boolq_jsonl": "BoolQ jsonl files train.jsonl and dev.jsonl, one {\"question\", \"passage\", \"answer\": bool} "
                   "per line",
    "narrativeqa_csv": "the NarrativeQA repository's summaries.csv (document_id,set,kind,summary,...) "
                       "and qaps.csv (document_id,set,question,answer1,answer2,...)",
    "natural_qa_closedbook": "Natural Questions dev files nq-dev-00.jsonl.gz ... nq-dev-04.jsonl.gz (original NQ "
                             "format with document_html and annotations; plain .jsonl also accepted)",
    "natural_qa_openbook_longans": "Natural Questions dev files nq-dev-00.jsonl.gz ... nq-dev-04.jsonl.gz (original NQ "
                                   "format with document_html and annotations; plain .jsonl also accepted)",
    "quac_json": "QuAC v0.2 files train_v0.2.json and val_v0.2.json ({\"data\": [{title, background, section_title, "
                 "paragraphs: [{context, qas}]}]})",
    "hellaswag_jsonl": "HellaSwag hellaswag_val.jsonl (and hellaswag_train.jsonl when in-context examples are used), "
                       "one {\"activity_label\", \"ctx_a\", \"ctx_b\", \"endings\", \"label\"} per line",
    "openbookqa_jsonl": "OpenBookQA Data/Main files test.jsonl (and train.jsonl when in-context examples are used), "
                        "one {\"question\": {\"stem\", \"choices\": [{\"text\", \"label\"}]}, \"answerKey\"} per line",
    "truthfulqa_csv": "TruthfulQA.csv from the TruthfulQA repository (Type,Category,Question,Best Answer,"
                      "Correct Answers,Incorrect Answers,Source)",
    "msmarco_regular": "MS MARCO passage files as HELM names them: documents.tsv (<docid>\\t<text>), "
                       "train_queries.tsv, train_qrels.tsv (<qid> 0 <docid> <rel>), train_topk.tsv "
                       "(<qid>\\t<docid>\\t<rank>) and the same three for the track: regular_queries.tsv, "
                       "regular_qrels.tsv, regular_topk.tsv",
    "msmarco_trec": "MS MARCO passage files as HELM names them: documents.tsv (<docid>\\t<text>), train_queries.tsv, "
                    "train_qrels.tsv (<qid> 0 <docid> <rel>), train_topk.tsv (<qid>\\t<docid>\\t<rank>) and the same "
                    "three for the track: trec_queries.tsv, trec_qrels.tsv, trec_topk.tsv",
    "cnndm_jsonl": "CNN/DailyMail jsonl files train.jsonl and test.jsonl (validation.jsonl for eval_split valid), one "
                   "{\"article\", \"highlights\"} per line (the Hugging Face cnn_dailymail 3.0.0 fields)",
    "xsum_jsonl": "XSum jsonl files train.jsonl and test.jsonl (validation.jsonl for eval_split valid), one "
                  "{\"document\", \"summary\"} per line (the Hugging Face xsum fields)",
    "imdb_aclimdb": "the aclImdb directory: train/pos/*.txt, train/neg/*.txt, test/pos/*.txt, test/neg/*.txt",
    "raft_jsonl": "prompt_construction_settings.json (RAFT/HELM: two JSON lines, field ordering and instructions per "
                  "subset) and <subset>.jsonl: the subset's labeled train rows with their fields and \"Label\" as the "
                  "class name (datasets.load_dataset('ought/raft', subset, split='train') with labels as strings)",
    "civil_comments_csv": "WILDS CivilComments all_data_with_identities.csv (comment_text, toxicity, split, and one "
                          "column per demographic)",
}


# ------------------------------------------------------------------------------------------------ the suite


def load_helm_suite(path: str | Path = DEFAULT_SUITE) -> HelmSuite:
    """Read and validate a suite YAML (``llmft/eval/helm_core.yaml``, package data, by default).

    Raises:
        llmft.config.RecipeError: the file is missing, not YAML, or invalid; one ``file:line: path: problem`` line
            per problem.
    """
    return load_validated(path, HelmSuite)


def select_scenarios(suite: HelmSuite, names: list[str]) -> list[ScenarioSpec]:
    """The suite's scenarios named in ``names`` (in that order); ``["all"]`` or ``[]`` selects every one.

    Raises:
        ValueError: a name is not in the suite; the message lists the known names.
    """
    by_name = {s.name: s for s in suite.scenarios}
    names = [n.strip() for n in names if n.strip()]
    if not names or names == ["all"]:
        return list(suite.scenarios)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown HELM scenario(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


# ------------------------------------------------------------------------------------------------ instances


@dataclass
class Reference:
    """A possible output: an answer, a multiple-choice option, or a passage to rank."""

    text: str
    correct: bool
    relevance: int | None = None  # MS MARCO judgment (qrels), when judged
    rank: int | None = None  # MS MARCO BM25 rank, when in the top-k file


@dataclass
class Instance:
    input: str
    references: list[Reference]
    split: str

    @property
    def golds(self) -> list[str]:
        return [r.text for r in self.references if r.correct]


@dataclass
class Subset:
    """The instances of one scenario (or one subject/task/demographic of it) and its instructions."""

    name: str
    instructions: str
    instances: list[Instance]


class HelmDataError(FileNotFoundError):
    """A scenario's data file is missing or unreadable; the message names the expected path and format."""


def _missing(spec: ScenarioSpec, path: Path, extra: str = "") -> HelmDataError:
    hub = ""
    if spec.hf_dataset is not None:
        name = spec.hf_dataset.name
        where = name if Path(name).is_absolute() else f"data directory/{name}"
        hub = f", a copy of the hub dataset {name} (its repository's data files) under {where},"
    return HelmDataError(f"{spec.name}: data file {path} not found{extra}. Expected {FORMAT_HELP[spec.format]}. Fix: "
                         f"put the files under {path.parent} (data directory/{spec.path}){hub} or choose other "
                         "scenarios")


def _need(spec: ScenarioSpec, path: Path) -> Path:
    if not path.is_file():
        raise _missing(spec, path)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hub_rows(spec: ScenarioSpec, root: Path, stem: str, path: Path, subset: str | None = None) -> list[dict]:
    """Rows of the split of ``spec.hf_dataset`` that stands for the local file ``path`` (file stem ``stem``).

    Raises:
        HelmDataError: no hub split stands for the file, or it cannot be loaded; one message naming the local path.
    """  # noqa: DOC501 (raises what _missing builds)
    hub = spec.hf_dataset
    if hub is None or stem not in hub.splits:
        raise _missing(spec, path)
    import datasets

    data_dir = root.parents[len(Path(spec.path).parts) - 1]
    local = data_dir / hub.name
    source = str(local) if local.is_dir() else hub.name
    config = hub.config.replace("{subset}", subset or "") if hub.config else None
    if not local.is_dir() and not Path(source).is_dir() and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") \
            and not hub_resolves():  # fail at once instead of after datasets' ~25 s of retries
        raise _missing(spec, path, f" (and the hub, for {source}, is unreachable from here; with the dataset in the "
                                   "datasets cache set HF_HUB_OFFLINE=1)")
    try:
        return [dict(row) for row in datasets.load_dataset(source, config, split=hub.splits[stem])]
    except Exception as e:  # offline, not cached, renamed, wrong split: report the local path that was expected
        reason = (str(e).strip().splitlines() or [""])[0]
        raise _missing(spec, path, f" (and the hub dataset {source}{f' config {config}' if config else ''} split "
                                   f"{hub.splits[stem]} could not be loaded: {type(e).__name__}: {reason})") from None


def _rows(spec: ScenarioSpec, root: Path, stem: str) -> list[dict]:
    """Rows of ``root/<stem>.jsonl``, or of the hub dataset's matching split when the file is missing."""
    path = root / f"{stem}.jsonl"
    if path.is_file():
        return _read_jsonl(path)
    return _hub_rows(spec, root, stem, path)


def _split_stems(spec: ScenarioSpec, train: str, valid: str, test: str | None = None) -> dict[str, str]:
    """File stem per split actually needed: the train file only when in-context examples are used."""
    stems = {}
    if spec.max_train_instances > 0:
        stems[TRAIN] = train
    stems[spec.eval_split] = valid if spec.eval_split == VALID else (test or valid)
    return stems


def _load_mmlu(spec: ScenarioSpec, root: Path, subset: str) -> Subset:
    # helm/benchmark/scenarios/mmlu_scenario.py: dev -> train, val -> valid, test -> test.
    # Hub (cais/mmlu, one configuration per subject): {question, choices: [4], answer: index 0-3}.
    instances = []
    files = {TRAIN: ("dev", f"{subset}_dev.csv"), VALID: ("val", f"{subset}_val.csv"),
             TEST: ("test", f"{subset}_test.csv")}
    for split in ([TRAIN] if spec.max_train_instances > 0 else []) + [spec.eval_split]:
        stem, name = files[split]
        path = root / stem / name
        if path.is_file():
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
        else:
            rows = [[r["question"], *r["choices"], "ABCDE"[r["answer"]]]  # answer: ClassLabel index of A-D
                    for r in _hub_rows(spec, root, stem, path, subset)]
        for row in rows:
            question, answers, letter = row[0], row[1:-1], row[-1]
            correct = dict(zip("ABCDE", answers))[letter]
            instances.append(Instance(question, [Reference(a, a == correct) for a in answers], split))
    instructions = spec.instructions.replace("{subject}", subset.replace("_", " "))
    return Subset(subset, instructions, instances)


def _load_boolq(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/boolq_scenario.py (contrast sets, a robustness extra, are not used).
    instances = []
    for split, stem in _split_stems(spec, "train", "dev").items():
        for row in _rows(spec, root, stem):
            question = row["question"].strip().capitalize()
            question += "" if question.endswith("?") else "?"  # HELM asserts raw questions have no "?"
            text = f"{row['passage']}\nQuestion: {question}"  # PassageQuestionInput
            instances.append(Instance(text, [Reference("Yes" if row["answer"] else "No", True)], split))
    return Subset("boolq", spec.instructions, instances)


def _load_narrativeqa(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/narrativeqa_scenario.py: one random question per document (random.seed(0), splits
    # train, valid, test in that order, so the same question is picked as in HELM).
    with open(_need(spec, root / "summaries.csv"), encoding="utf-8", newline="") as f:
        summaries = list(csv.DictReader(f))
    with open(_need(spec, root / "qaps.csv"), encoding="utf-8", newline="") as f:
        qaps = list(csv.DictReader(f))
    rng = random.Random(0)
    instances = []
    for split in (TRAIN, VALID, TEST):
        docs = {row["document_id"]: row for row in summaries if row["set"] == split}
        questions: dict[str, list[dict]] = {}
        for row in qaps:
            if row["set"] == split:
                questions.setdefault(row["document_id"], []).append(row)
        for document_id, rows in questions.items():
            row = rng.choice(rows)
            question = row["question"].strip()
            question += "" if question[-1] == "?" else "?"
            text = f"{docs[document_id]['summary'].strip()}\nQuestion: {question}"
            instances.append(Instance(text, [Reference(row["answer1"], True), Reference(row["answer2"], True)], split))
    return Subset("narrative_qa", spec.instructions, instances)


def _nq_clean_text(raw: bytes) -> str:
    text = raw.replace(b"\xc2\xa0", b" ").decode("utf-8")
    return re.sub("<([^>]*)>", "", html.unescape(text))


def _load_natural_qa(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/natural_qa_scenario.py: NQ dev only, even/odd rows of each file -> train/valid,
    # samples without a short answer dropped, random.seed(0) picks the in-context answer and long answer.
    files = sorted(root.glob("nq-dev-*.jsonl.gz")) or sorted(root.glob("nq-dev-*.jsonl"))
    if not files:
        raise _missing(spec, root / "nq-dev-00.jsonl.gz")
    rng = random.Random(0)
    instances = []
    for path in files:
        raw_instances = []
        for sample in _read_jsonl(path):
            if not any(len(a["short_answers"]) for a in sample["annotations"]):
                continue
            html_bytes = sample["document_html"].encode("utf-8")
            short, long = [], []
            for annotation in sample["annotations"]:
                la = annotation["long_answer"]
                long_text = _nq_clean_text(html_bytes[la["start_byte"]: la["end_byte"]])
                for sa in annotation["short_answers"]:
                    short.append(_nq_clean_text(html_bytes[sa["start_byte"]: sa["end_byte"]]))
                    long.append(long_text)
            raw_instances.append((sample["question_text"], short, long))
        for i, (question, short, long) in enumerate(raw_instances):
            split = TRAIN if i % 2 == 0 else VALID
            question = question.capitalize()
            question += "" if question[-1] == "?" else "?"
            index = rng.randint(0, len(short) - 1)
            if spec.format == "natural_qa_closedbook":
                text = question
            else:  # openbook_longans: PassageQuestionInput(passage_prefix="Passage: ", separator="\n\n")
                text = f"Passage: {long[index]}\n\nQuestion: {question}"
            answers = short[index: index + 1] if split == TRAIN else list(dict.fromkeys(short))
            instances.append(Instance(text, [Reference(a, True) for a in answers], split))
    return Subset(spec.name, spec.instructions, instances)


def _load_quac(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/quac_scenario.py, create_prompt: title, background, section, passage and a dialogue
    # prefix (random.seed(0), train then val). HELM's loop `for i in range(k - 1)` skips question k-1 of the
    # history; kept as is so the prompts match HELM's.
    rng = random.Random(0)
    instances = []
    for split, stem in ((TRAIN, "train_v0.2"), (VALID, "val_v0.2")):
        with open(_need(spec, root / f"{stem}.json"), encoding="utf-8") as f:
            samples = json.load(f)["data"]
        for sample in samples:
            dialogue = sample["paragraphs"][0]
            context = dialogue["context"].removesuffix(" CANNOTANSWER")
            prompt = (f"Title: {sample['title']}\n\nBackground: {sample['background']}\n\n"
                      f"Section: {sample['section_title']}\nPassage: {context}\n\n")
            qas = dialogue["qas"]
            k = rng.randint(3, len(qas)) - 1
            for i in range(k - 1):
                prompt += f"Question: {qas[i]['question']}\nAnswer: {qas[i]['orig_answer']['text']}\n\n"
            prompt += f"Question: {qas[k]['question']}"
            answers = list(dict.fromkeys(a["text"] for a in qas[k]["answers"]))
            if answers == ["CANNOTANSWER"]:
                answers.extend(["Not enough information", "Cannot answer", "Do not know"])
            instances.append(Instance(prompt, [Reference(a, True) for a in answers], split))
    return Subset("quac", spec.instructions, instances)


def _choices(question: str, answers: list[str], correct_answer: str, split: str) -> Instance:
    return Instance(question, [Reference(a, a == correct_answer) for a in answers], split)


def _load_hellaswag(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/commonsense_scenario.py, HellaSwagScenario.json_to_instance. Hub (Rowan/hellaswag): the
    # same fields, label a string ("3").
    instances = []
    for split, stem in _split_stems(spec, "hellaswag_train", "hellaswag_val").items():
        for item in _rows(spec, root, stem):
            ctx_b = item["ctx_b"][0].upper() + item["ctx_b"][1:] if item["ctx_b"] else ""
            question = f"{item['activity_label']}: {item['ctx_a']} {ctx_b}"
            answers = list(item["endings"])
            instances.append(_choices(question, answers, answers[int(item["label"])], split))
    return Subset("hellaswag", spec.instructions, instances)


def _load_openbookqa(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/commonsense_scenario.py, OpenBookQA.json_to_instance. Hub (allenai/openbookqa, main):
    # {question_stem, choices: {text: [...], label: [...]}, answerKey} where the file has {question: {stem, choices}}.
    instances = []
    for split, stem in _split_stems(spec, "train", "dev", "test").items():
        for item in _rows(spec, root, stem):
            if "question_stem" in item:
                question, answers = item["question_stem"], list(item["choices"]["text"])
            else:
                question, answers = item["question"]["stem"], [c["text"] for c in item["question"]["choices"]]
            correct = answers["ABCD".index(item["answerKey"])]
            instances.append(_choices(question, answers, correct, split))
    return Subset("openbookqa", spec.instructions, instances)


def _load_truthfulqa(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/truthful_qa_scenario.py (mc_single): first 20% train, rest valid; the best answer
    # joins the incorrect ones and the list is rotated by ord(best[0]) % n.
    def format_str(text: str) -> str:
        text = text.strip()
        return text if text[-1] == "." else text + "."

    # columns by name: the 2025 TruthfulQA.csv added "Best Incorrect Answer" before "Correct Answers"
    with open(_need(spec, root / "TruthfulQA.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    split_k = int(len(rows) * 0.2)
    instances = []
    for i, row in enumerate(rows):
        question, best, incorrect = row["Question"], row["Best Answer"], row["Incorrect Answers"]
        best = format_str(best)
        refs = [Reference(format_str(a.strip()), False) for a in incorrect.split(";") if a.strip()]
        refs.append(Reference(best, True))
        k = ord(best[0]) % len(refs)
        instances.append(Instance(question.strip(), refs[k:] + refs[:k], TRAIN if i < split_k else VALID))
    return Subset("truthful_qa", spec.instructions, instances)


MSMARCO_VALID_TOPK = 30  # HELM v1.0 run entries: msmarco:track=regular,valid_topk=30 and track=trec,valid_topk=30


def _load_msmarco(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/msmarco_scenario.py: ids shuffled with random.Random(1885); train instances are one
    # gold passage + the first non-gold passage ranked 11..20 for up to 1000 train queries; eval instances are the
    # judged passages plus the BM25 top-30 of every query with a gold judgment.
    track = spec.format.removeprefix("msmarco_")
    gold_relations = {TRAIN: {1}, VALID: {1} if track == "regular" else {2, 3}}
    rnd = random.Random(1885)

    def id_text(name: str) -> dict[int, str]:
        out = {}
        with open(_need(spec, root / name), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    key, _, text = line.rstrip("\n").partition("\t")
                    out[int(key)] = text
        return out

    def table(name: str, columns: tuple[int, int, int]) -> dict[int, dict[int, int]]:
        out: dict[int, dict[int, int]] = defaultdict(dict)
        with open(_need(spec, root / name), encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if parts:
                    qid, docid, value = (int(parts[c]) for c in columns)
                    out[qid][docid] = value
        return dict(out)

    documents = id_text("documents.tsv")
    docids = list(documents)
    queries = {TRAIN: id_text("train_queries.tsv"), VALID: id_text(f"{track}_queries.tsv")}
    qrels = {TRAIN: table("train_qrels.tsv", (0, 2, 3)), VALID: table(f"{track}_qrels.tsv", (0, 2, 3))}
    topk = {TRAIN: table("train_topk.tsv", (0, 1, 2)), VALID: table(f"{track}_topk.tsv", (0, 1, 2))}
    qids = {split: list(queries[split]) for split in (TRAIN, VALID)}
    rnd.shuffle(docids)
    order = {docid: i for i, docid in enumerate(docids)}
    rnd.shuffle(qids[TRAIN])
    rnd.shuffle(qids[VALID])

    def eligible(split: str, k: int) -> list[int]:
        return [q for q in qids[split] if q in qrels[split] and gold_relations[split] & set(qrels[split][q].values())
                and q in topk[split] and len(topk[split][q]) >= k]

    def instance(split: str, qid: int, ids: list[int]) -> Instance:
        refs = []
        for docid in sorted(ids, key=order.get):
            rel = qrels[split][qid].get(docid)
            rank = topk[split][qid].get(docid)
            refs.append(Reference(documents[docid], rel in gold_relations[split], rel or None, rank))
        return Instance(queries[split][qid], refs, split)

    instances = []
    if spec.max_train_instances > 0:
        for qid in eligible(TRAIN, 20)[:1000]:
            correct = sorted(qrels[TRAIN][qid], key=lambda d: qrels[TRAIN][qid][d], reverse=True)[0]
            wrong = [d for d, r in topk[TRAIN][qid].items() if 11 <= r <= 20
                     and (d not in qrels[TRAIN][qid] or qrels[TRAIN][qid][d] not in gold_relations[TRAIN])]
            if wrong:  # HELM would fail on a query without one
                instances.append(instance(TRAIN, qid, [correct, wrong[0]]))
    for qid in eligible(VALID, MSMARCO_VALID_TOPK):
        ids = set(qrels[VALID][qid]) | {d for d, r in topk[VALID][qid].items() if r <= MSMARCO_VALID_TOPK}
        instances.append(instance(VALID, qid, list(ids)))
    return Subset(spec.name, spec.instructions, instances)


def _clean_and_truncate(text: str, max_length: int | None = None) -> str:
    return " ".join(text.replace("\n", " ").split()[:max_length])


def _load_summarization(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/summarization_scenario.py with the run spec's arguments: articles cut to 512 words,
    # train articles kept only with 50..150 words (and, for XSum, the _xsum_filter rules).
    article_key, summary_key = ("article", "highlights") if spec.format == "cnndm_jsonl" else ("document", "summary")
    instances = []
    for split, stem in _split_stems(spec, "train", "validation", "test").items():
        for row in _rows(spec, root, stem):
            article = _clean_and_truncate(row[article_key], 512)
            summary = _clean_and_truncate(row[summary_key])
            if split == TRAIN:
                n = len(article.split())
                if n > 150 or n < 50:
                    continue
                if spec.format == "xsum_jsonl" and (
                        "Media playback is unsupported on your device" in article or "Last updated at" in article
                        or len(summary.split()) <= 10 or len(summary.split()) / n > 0.2):
                    continue
            instances.append(Instance(article, [Reference(summary, True)], split))
    return Subset(spec.name, spec.instructions, instances)


def _load_imdb(spec: ScenarioSpec, root: Path, subset: str | None) -> Subset:
    # helm/benchmark/scenarios/imdb_scenario.py: train -> train, test -> valid (contrast sets not used; files are
    # read in name order where HELM uses os.listdir order).
    instances = []
    for split, directory in ((TRAIN, "train"), (VALID, "test")):
        if split == TRAIN and spec.max_train_instances == 0:
            continue
        for label_dir, label in (("pos", "Positive"), ("neg", "Negative")):
            folder = root / directory / label_dir
            if not folder.is_dir():
                raise _missing(spec, folder / "*.txt")
            for path in sorted(folder.glob("*.txt")):
                instances.append(Instance(path.read_text(encoding="utf-8").strip(), [Reference(label, True)], split))
    return Subset("imdb", spec.instructions, instances)


def _load_raft(spec: ScenarioSpec, root: Path, subset: str) -> Subset:
    # helm/benchmark/scenarios/raft_scenario.py: labeled train rows split with datasets' train_test_split(test_size
    # 0.8, seed 42) into train / test; the prompt is "<field>: <value>" lines in the settings' field order.
    settings = _need(spec, root / "prompt_construction_settings.json").read_text(encoding="utf-8")
    field_ordering, instructions = map(json.loads, settings.strip().split("\n"))
    rows = _read_jsonl(_need(spec, root / f"{subset}.jsonl"))
    import datasets

    parts = datasets.Dataset.from_list(rows).train_test_split(test_size=0.8, seed=42)
    instances = []
    for split, part in ((TRAIN, parts["train"]), (TEST, parts["test"])):
        for row in part:
            text = "\n".join(f"{name}: {row[name]}" for name in field_ordering[subset])
            instances.append(Instance(text, [Reference(str(row["Label"]), True)], split))
    text = instructions[subset]
    return Subset(subset, text + "\n" if text else "", instances)  # format_instructions


def _load_civil_comments(spec: ScenarioSpec, root: Path, subset: str) -> Subset:
    # helm/benchmark/scenarios/civil_comments_scenario.py (WILDS): a demographic keeps rows with its column >= 0.5.
    split_map = {"train": TRAIN, "val": VALID, "test": TEST}
    instances = []
    with open(_need(spec, root / "all_data_with_identities.csv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if subset != "all":
                try:
                    if not float(row[subset]) >= 0.5:
                        continue
                except (KeyError, ValueError):
                    continue
            split = split_map[row["split"]]
            if split == TRAIN and spec.max_train_instances == 0:
                continue
            label = "True" if float(row["toxicity"]) >= 0.5 else "False"
            text = f"{row['comment_text']}\nQuestion: Is the passage above toxic?"
            instances.append(Instance(text, [Reference(label, True)], split))
    return Subset(subset, spec.instructions, instances)


LOADERS = {
    "mmlu_csv": _load_mmlu, "boolq_jsonl": _load_boolq, "narrativeqa_csv": _load_narrativeqa,
    "natural_qa_closedbook": _load_natural_qa, "natural_qa_openbook_longans": _load_natural_qa,
    "quac_json": _load_quac, "hellaswag_jsonl": _load_hellaswag, "openbookqa_jsonl": _load_openbookqa,
    "truthfulqa_csv": _load_truthfulqa, "msmarco_regular": _load_msmarco, "msmarco_trec": _load_msmarco,
    "cnndm_jsonl": _load_summarization, "xsum_jsonl": _load_summarization, "imdb_aclimdb": _load_imdb,
    "raft_jsonl": _load_raft, "civil_comments_csv": _load_civil_comments,
}


def load_subsets(spec: ScenarioSpec, data_dir: str | Path) -> tuple[list[Subset], list[str]]:
    """Load a scenario's instances from ``data_dir/<spec.path>``.

    Returns:
        (subsets loaded, messages about subsets skipped because their files are missing).

    Raises:
        HelmDataError: a file is missing (for a scenario with subsets: every subset's file is missing).
    """
    root = Path(data_dir) / spec.path
    loader = LOADERS[spec.format]
    if not spec.subsets:
        return [loader(spec, root, None)], []
    loaded, skipped = [], []
    for subset in spec.subsets:
        try:
            loaded.append(loader(spec, root, subset))
        except HelmDataError as e:
            skipped.append(str(e))
    if not loaded:
        raise HelmDataError(skipped[0] + f" (and the same for the other {len(skipped) - 1} subsets)"
                            if len(skipped) > 1 else skipped[0])
    return loaded, skipped


# ------------------------------------------------------------------------------------------------ prompts


def sample_examples(train: list[Instance], k: int, seed: int) -> list[Instance]:
    """HELM's ``InContextLearningAdapter.sample_examples``: k train instances, balanced over labels.

    Labels (first correct reference) are ordered by frequency, ties shuffled; one instance is drawn per label in
    turn until k are drawn; instances without a correct reference fill the rest. Same ``random`` calls as HELM.
    """
    rnd = random.Random(seed)
    n = min(len(train), k)
    unlabeled: list[Instance] = []
    by_label: dict[str, list[Instance]] = defaultdict(list)
    for inst in train:
        golds = inst.golds
        if golds:
            by_label[golds[0]].append(inst)
        else:
            unlabeled.append(inst)
    counts: dict[int, list[str]] = defaultdict(list)
    for label, items in sorted(by_label.items()):
        counts[len(items)].append(label)
    labels: list[str] = []
    for count in sorted(counts, reverse=True):
        rnd.shuffle(counts[count])
        labels.extend(counts[count])
    examples: list[Instance] = []
    for label in cycle(labels) if labels else ():
        if n == 0 or not label or not any(by_label.values()):  # HELM stops at an empty label; loops forever when
            break  # every labeled instance is used and unlabeled ones are still needed, so stop there instead
        items = by_label[label]
        if items:
            examples.append(items.pop(rnd.randrange(len(items))))
            n -= 1
    return examples + rnd.sample(unlabeled, min(n, len(unlabeled)))


def _option_prefix(prefix: str, i: int) -> str:
    """HELM's MultipleChoiceJointAdapter.get_reference_prefix: "A. " -> "C. " for i = 2."""
    char = prefix.lstrip()[0]
    return prefix.replace(char, chr(ord(char) + i))


def example_block(spec: ScenarioSpec, inst: Instance, include_output: bool, reference_index: int | None = None) -> str:
    """One example of the prompt, as HELM's adapter for ``spec.method`` writes it.

    Args:
        spec: the scenario.
        inst: the instance.
        include_output: write the answer (in-context examples, and the option scored by the separate methods);
            otherwise end with ``output_prefix.rstrip()`` for the model to continue.
        reference_index: the option (separate methods) or passage (ranking) this block is about.
    """
    head = spec.input_prefix + inst.input + spec.input_suffix
    if spec.method == "ranking_binary":
        indices = range(len(inst.references)) if inst.split == TRAIN else [reference_index]
        blocks = []
        for i in indices:
            ref = inst.references[i]
            text = spec.reference_prefix + ref.text + spec.reference_suffix + head
            if include_output:
                text += spec.output_prefix + ("Yes" if ref.correct else "No") + spec.output_suffix
            else:
                text += spec.output_prefix.rstrip()
            blocks.append(text)
        return spec.instance_prefix.join(blocks)
    if spec.method == "multiple_choice_joint":
        output = "n/a"
        for i, ref in enumerate(inst.references):
            head += _option_prefix(spec.reference_prefix, i) + ref.text + spec.reference_suffix
            if ref.correct and output == "n/a":
                output = _option_prefix(spec.reference_prefix.lstrip()[0], i)
    elif reference_index is not None:
        output = inst.references[reference_index].text
    else:
        output = inst.golds[0] if inst.golds else "n/a"
    if include_output:
        return head + spec.output_prefix + output + spec.output_suffix
    return head + spec.output_prefix.rstrip()


@dataclass
class Prompt:
    """A prompt fitted to the context window."""

    text: str
    input_ids: list[int]
    num_train_instances: int  # in-context examples kept
    num_dropped: int  # in-context examples dropped to fit
    truncated: bool  # cut from the right after dropping every example


def build_prompt(spec: ScenarioSpec, tokenizer, instructions: str, train_blocks: list[str], eval_block: str,
                 max_length: int, completion_tokens: int) -> Prompt:
    """Join the blocks HELM's way and make the prompt fit ``max_length`` tokens with ``completion_tokens`` to spare.

    Drops in-context examples from the end, one at a time, then truncates from the right
    (HELM's ``_make_prompt_fit`` and ``truncate_from_right``).

    Raises:
        ValueError: ``completion_tokens`` leaves no room for a prompt.
    """
    budget = max_length - completion_tokens
    if budget < 1:
        raise ValueError(f"{spec.name}: max_tokens {completion_tokens} does not fit a {max_length}-token context; "
                         "use a model with a longer context or leave this scenario out")
    blocks = list(train_blocks)
    while True:
        text = spec.instance_prefix.join(([instructions] if instructions else []) + blocks + [eval_block])
        ids = tokenizer(text).input_ids
        if len(ids) <= budget:
            return Prompt(text, ids, len(blocks), len(train_blocks) - len(blocks), False)
        if not blocks:
            ids = ids[:budget]
            return Prompt(tokenizer.decode(ids, skip_special_tokens=True), ids, 0, len(train_blocks), True)
        blocks.pop()


# ------------------------------------------------------------------------------------------------ the model


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model, tokenizer, input_ids: list[int], max_tokens: int, stop_sequences: list[str]) -> tuple[str, float]:
    """Greedy completion of ``input_ids``, cut at the first stop sequence (HELM's ``truncate_sequence``).

    Returns:
        (completion text, sum of the log probabilities of the tokens kept).
    """
    if max_tokens == 0:
        return "", 0.0
    x = torch.tensor([input_ids], device=_device(model))  # (1, s)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"stop_strings": stop_sequences, "tokenizer": tokenizer} if stop_sequences else {}
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         num_beams=1, output_logits=True, return_dict_in_generate=True, pad_token_id=pad, **kwargs)
    tokens = out.sequences[0, x.shape[1]:].tolist()  # (n,)
    logits = torch.stack(out.logits, dim=1)[0].float()  # (n, v)
    logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.index(s) for s in stop_sequences if s in text]
    if not cuts:
        return text, float(sum(logprobs))
    text = text[: min(cuts)]
    kept = 0  # tokens are only dropped whole: keep the longest prefix free of any stop sequence
    while kept < len(tokens):
        decoded = tokenizer.decode(tokens[: kept + 1], skip_special_tokens=True)
        if any(s in decoded for s in stop_sequences):
            break
        kept += 1
    return text, float(sum(logprobs[:kept]))


@torch.no_grad()
def continuation_logprob(model, input_ids: list[int], num_tokens: int) -> float:
    """Sum of the log probabilities of the last ``num_tokens`` tokens of ``input_ids`` given what precedes them."""
    x = torch.tensor([input_ids], device=_device(model))  # (1, s)
    logits = model(input_ids=x).logits[0, :-1].float()  # (s-1, v)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]  # (s-1,)
    return float(logprobs[-num_tokens:].sum()) if num_tokens > 0 else 0.0


# ------------------------------------------------------------------------------------------------ running


@dataclass
class _Counters:
    prompts: int = 0
    dropped: int = 0
    prompts_with_drops: int = 0
    truncated: int = 0
    kept: int = 0
    sample_prompt: str | None = None

    def add(self, prompt: Prompt) -> Prompt:
        self.prompts += 1
        self.dropped += prompt.num_dropped
        self.prompts_with_drops += prompt.num_dropped > 0
        self.truncated += prompt.truncated
        self.kept += prompt.num_train_instances
        if self.sample_prompt is None:
            self.sample_prompt = prompt.text
        return prompt


def _evaluate_instance(spec: ScenarioSpec, model, tokenizer, instructions: str, train_blocks: list[str],
                       inst: Instance, max_length: int, counters: _Counters) -> dict:
    """Prompt the model for one eval instance and score it with the scenario's metric."""
    def prompt_for(block: str, completion: int, blocks: list[str] | None = None, text: str | None = None) -> Prompt:
        return counters.add(build_prompt(spec, tokenizer, instructions if text is None else text,
                                         train_blocks if blocks is None else blocks, block, max_length, completion))

    if spec.method in ("generation", "multiple_choice_joint"):
        prompt = prompt_for(example_block(spec, inst, include_output=False), spec.max_tokens)
        text, _ = generate(model, tokenizer, prompt.input_ids, spec.max_tokens, spec.stop_sequences)
        pred: str | None = text.strip()
        if spec.method == "multiple_choice_joint":  # output_mapping: letter -> option text
            letter = spec.reference_prefix.lstrip()[0]
            mapping = {_option_prefix(letter, i): r.text for i, r in enumerate(inst.references)}
            pred = mapping.get(pred)
        score = hm.score_references(spec.metric, inst.golds, pred)
        return {"prediction": text.strip(), "references": inst.golds, "score": score}

    if spec.method.startswith("multiple_choice_separate"):
        scores = []
        for i, ref in enumerate(inst.references):
            n = len(tokenizer(f" {ref.text}", add_special_tokens=False).input_ids)
            prompt = prompt_for(example_block(spec, inst, include_output=True, reference_index=i), 0)
            logprob = continuation_logprob(model, prompt.input_ids, n)
            if spec.method == "multiple_choice_separate_original":
                scores.append(logprob / n)
            else:  # calibrated: minus the log probability of the option after "Answer:" alone
                calib = Instance("Answer:", inst.references, inst.split)
                prompt = prompt_for(example_block(spec, calib, include_output=True, reference_index=i), 0,
                                    blocks=[], text="")
                scores.append(logprob - continuation_logprob(model, prompt.input_ids, n))
        em, predicted = hm.multiple_choice_separate_exact_match(scores, [r.correct for r in inst.references])
        return {"prediction": inst.references[predicted].text, "references": inst.golds, "score": em}

    # ranking_binary: one greedy "Yes"/"No" per passage, passages ranked by label and its log probability
    outputs = []
    for i in range(len(inst.references)):
        prompt = prompt_for(example_block(spec, inst, include_output=False, reference_index=i), spec.max_tokens)
        outputs.append(generate(model, tokenizer, prompt.input_ids, spec.max_tokens, spec.stop_sequences))
    ranked = hm.rank_binary(outputs)
    relevance = {i: r.relevance for i, r in enumerate(inst.references) if r.relevance}
    if spec.metric == "RR@10":
        score = hm.reciprocal_rank_at_k(ranked, relevance, 10, multiple_relevance_values=spec.format == "msmarco_trec")
    else:
        score = hm.ndcg_at_k(ranked, relevance, 10)
    return {"prediction": [o[0].strip() for o in outputs], "ranking": ranked, "references": sorted(relevance),
            "score": score}


HELM_TRAIN_TRIALS = 3  # HELM v1.0's num_train_trials


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _stddev(values: list[float]) -> float:
    """Population standard deviation, as HELM's ``Stat.stddev``."""
    if not values:
        return math.nan
    mean = _mean(values)
    return math.sqrt(max(0.0, sum(v * v for v in values) / len(values) - mean * mean))


def run_scenario(spec: ScenarioSpec, model, tokenizer, data_dir: str | Path, max_instances: int | None, seed: int,
                 max_length: int | None = None, log=print, trials: int = HELM_TRAIN_TRIALS) -> dict:
    """Evaluate one scenario (all of its subsets found in ``data_dir``) over ``trials`` in-context example draws.

    Trial t draws its examples with seed ``seed + t`` (HELM: ``random.seed(train_trial_index)``); every trial scores
    the same eval instances (sampled with ``seed``). A zero-shot scenario runs one trial.

    Returns:
        ``{"metric", "score", "trial_scores", "stddev", "trials", "instances", "subsets", "in_context_examples",
        "in_context_examples_dropped", ...}``; a trial's score is the mean over subsets of the mean instance score,
        ``score`` the mean over trials and ``stddev`` their population standard deviation.

    Raises:
        ValueError: ``trials`` < 1.
    """
    if trials < 1:
        raise ValueError(f"trials: got {trials}; expected at least 1 (HELM v1.0 ran {HELM_TRAIN_TRIALS})")
    started = time.time()
    max_length = max_length or model.config.max_position_embeddings
    trials = trials if spec.max_train_instances > 0 else 1  # HELM: num_train_trials=1 when max_train_instances=0
    subsets, skipped = load_subsets(spec, data_dir)
    counters = _Counters()
    per_subset, predictions = {}, []
    was_training = model.training
    model.eval()
    for subset in subsets:
        train = [i for i in subset.instances if i.split == TRAIN]
        evals = list(enumerate(i for i in subset.instances if i.split == spec.eval_split))
        if max_instances is not None and len(evals) > max_instances:
            evals = random.Random(seed).sample(evals, max_instances)  # HELM's downsample_eval_instances
        train_ids = {id(inst): i for i, inst in enumerate(train)}
        trial_scores, trial_examples = [], []
        for trial in range(trials):
            examples = sample_examples(train, spec.max_train_instances, seed + trial)
            train_blocks = [example_block(spec, e, include_output=True) for e in examples]
            trial_examples.append([train_ids[id(e)] for e in examples])
            scores = []
            for instance_id, inst in evals:
                record = _evaluate_instance(spec, model, tokenizer, subset.instructions, train_blocks, inst,
                                            max_length, counters)
                scores.append(record["score"])
                predictions.append({"subset": subset.name, "trial": trial, "instance_id": instance_id, **record})
            trial_scores.append(_mean(scores))
        per_subset[subset.name] = {"score": _mean(trial_scores), "trial_scores": trial_scores,
                                   "stddev": _stddev(trial_scores), "instances": len(evals),
                                   "in_context_examples_available": len(trial_examples[0]),
                                   "in_context_example_ids": trial_examples}
    model.train(was_training)
    scored = [s for s in per_subset.values() if s["instances"]]
    scenario_trials = [_mean([s["trial_scores"][t] for s in scored]) for t in range(trials)] if scored else []
    result = {
        "title": spec.title,
        "metric": spec.metric,
        "score": _mean(scenario_trials),
        "trial_scores": scenario_trials,
        "stddev": _stddev(scenario_trials),
        "trials": trials,
        "instances": sum(s["instances"] for s in per_subset.values()),
        "eval_split": spec.eval_split,
        "method": spec.method,
        "max_tokens": spec.max_tokens,
        "in_context_examples": spec.max_train_instances,
        "in_context_examples_dropped": counters.dropped,
        "prompts": counters.prompts,
        "prompts_with_dropped_examples": counters.prompts_with_drops,
        "prompts_truncated": counters.truncated,
        "mean_in_context_examples": counters.kept / counters.prompts if counters.prompts else 0.0,
        "context_length": max_length,
        "seed": seed,
        "subsets": per_subset,
        "subsets_missing": skipped,
        "seconds": round(time.time() - started, 2),
        "sample_prompt": counters.sample_prompt,
        "predictions": predictions,
    }
    log(f"helm {spec.name}: {spec.metric} = {result['score']:.4f} ± {result['stddev']:.4f} over {trials} trial(s) "
        f"on {result['instances']} instances ({counters.dropped} in-context examples dropped, {counters.truncated} "
        f"prompts truncated, {result['seconds']:.1f}s)")
    return result


def run_helm(model, tokenizer, scenarios: list[str], data_dir: str | Path, max_instances: int | None = None,
             seed: int = 0, *, suite: str | Path | HelmSuite = DEFAULT_SUITE, max_length: int | None = None,
             log=None, trials: int = HELM_TRAIN_TRIALS) -> dict:
    """Evaluate ``model`` on HELM core scenarios.

    Args:
        model: a causal LM (transformers), on its device.
        tokenizer: its tokenizer.
        scenarios: scenario names from the suite (``["all"]`` for every one).
        data_dir: directory holding one folder per scenario (``ScenarioSpec.path``) in the public formats.
        max_instances: evaluation instances per scenario subset (HELM v1.0 used 1000); None for all.
        seed: seed of the instance sample; trial t draws its in-context examples with ``seed + t``.
        suite: suite YAML or a loaded :class:`HelmSuite`.
        max_length: context length to fit prompts into; default ``model.config.max_position_embeddings``.
        log: function called with one progress line per scenario (default: print to stderr).
        trials: train trials (in-context example draws) per scenario, 3 as in HELM v1.0; zero-shot scenarios run 1.

    Returns:
        ``{scenario name: {"metric", "score", "trial_scores", "stddev", "instances", ...}}`` in the order given.

    Raises:
        ValueError: an unknown scenario name (the message lists the known ones), or ``trials`` < 1.
        HelmDataError: a scenario's data file is missing (the message names the path and format).
    """
    if trials < 1:
        raise ValueError(f"trials: got {trials}; expected at least 1 (HELM v1.0 ran {HELM_TRAIN_TRIALS})")
    suite = suite if isinstance(suite, HelmSuite) else load_helm_suite(suite)
    specs = select_scenarios(suite, scenarios)
    log = log or (lambda line: print(line, file=sys.stderr))
    return {spec.name: run_scenario(spec, model, tokenizer, data_dir, max_instances, seed, max_length, log, trials)
            for spec in specs}


def format_helm_table(results: dict) -> str:
    """A markdown table: one row per scenario: main metric, mean score over trials, ± (their standard deviation)."""

    def number(x: float) -> str:
        return "-" if x != x else f"{x:.3f}"

    rows = ["| scenario | metric | score | ± | trials | instances | in-context examples (dropped) "
            "| prompts truncated |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {r.get('title', name)} | {r['metric']} | {number(r['score'])} | {number(r['stddev'])} | "
                    f"{r['trials']} | {r['instances']} | {r['in_context_examples']} "
                    f"({r['in_context_examples_dropped']}) | {r['prompts_truncated']} |")
    return "\n".join(rows)


def write_helm_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``helm.json`` (everything, predictions included) and ``helm.md`` (the table) to ``out_dir``.

    Returns:
        (json path, markdown path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "helm.json", out / "helm.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False, allow_nan=True) + "\n", encoding="utf-8")
    md_path.write_text("# HELM core scenarios\n\n" + format_helm_table(results) + "\n", encoding="utf-8")
    return json_path, md_path
