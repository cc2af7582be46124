"""Scenario data: each core scenario's public files (or its ``datasets`` dataset) read into :class:`Instance` rows with
their references, split into train / valid / test, per subset."""

from __future__ import annotations

import csv
import html
import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from llmft.config.eval import ScenarioSpec
from llmft.data.sources import read_json_lines
from llmft.model.load import hub_resolves

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
        return read_json_lines(path)
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
        for sample in read_json_lines(path):
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
    rows = read_json_lines(_need(spec, root / f"{subset}.jsonl"))
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
