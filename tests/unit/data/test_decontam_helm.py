"""Decontamination against HELM reads every core scenario through the loaders of ``llmft eval --helm``.

A small data directory holds the 16 HELM v1.0 core scenarios, each in its public layout (CSV, TSV, JSON,
gzip-free NQ jsonl, aclImdb text files, ...). For each, one field an eval instance is built from (an article, a
question, a comment, a passage) is planted in a training document: verbatim, and reflowed and re-cased. Both are
removed; an unrelated document is kept. The build reports per target what was indexed and what it removed, and a
target that yields nothing is an error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import REPO

from llmft.data.decontam import Decontaminator, DecontamReport, DecontamTargetError

# Distinct sentences of 14-30 words: each scenario's planted field is one of these, so a hit names its scenario.
PLANTED = {
    "mmlu": "Which of the following statements best describes the effect of a binding price ceiling imposed "
            "below the equilibrium price in a competitive market for rental apartments",
    "boolq": "The Caspian Sea is the largest enclosed inland body of water on Earth by area and is variously "
             "classed as the world's largest lake or a full-fledged sea",
    "narrative_qa": "A retired lighthouse keeper named Elias Brandt adopts a stray dog and slowly reconciles with "
                    "the estranged daughter who left the island twenty years earlier",
    "natural_qa_closedbook": "who was the first woman to win two nobel prizes in two different scientific fields "
                             "of study during the twentieth century",
    "natural_qa_openbook_longans": "The Great Barrier Reef is the world's largest coral reef system composed of "
                                   "over two thousand nine hundred individual reefs and nine hundred islands",
    "quac": "In 1964 the band released its third studio album which was recorded in only eleven days at a small "
            "studio in the north of England",
    "hellaswag": "A woman is kneeling in a garden next to a wooden planter box filled with soil. She picks up a "
                 "small trowel and",
    "openbookqa": "A student places a metal spoon and a wooden spoon into a cup of hot cocoa and notices after "
                  "several minutes that one of them",
    "truthful_qa": "What happens to your body if you swallow a piece of chewing gum and do not drink any water for "
                   "the rest of the afternoon",
    "msmarco_regular": "The average gestation period of an African elephant is about twenty two months which is "
                       "the longest of any land mammal alive today",
    "msmarco_trec": "how long does it take for a newly planted avocado tree grown from seed to produce its first "
                    "edible fruit",
    "summarization_cnndm": "Firefighters battled a blaze at a historic textile mill on Tuesday night as residents "
                           "of nearby streets were evacuated from their homes as a precaution",
    "summarization_xsum": "The town council has approved plans for a new cycle path linking the railway station "
                          "with the university campus after a three year campaign by residents",
    "imdb": "This film wastes a talented cast on a script that never decides whether it wants to be a comedy or "
            "a thriller and the ending made me laugh",
    "raft": "Patients receiving the higher dose developed a persistent skin rash within two weeks of starting "
            "treatment and several discontinued the drug entirely",
    "civil_comments": "Honestly the city should have fixed that intersection years ago instead of waiting for "
                      "another accident before anybody at the council paid attention",
}
FILLER = ("Preheat the oven and grease a loaf tin. Mix the flour with the butter until it looks like breadcrumbs, "
          "then stir in the sugar and the grated zest of one lemon before adding the beaten eggs.")


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def csv_rows(path: Path, header: list[str] | None, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def other(i: int) -> str:
    return f"filler sentence number {i} about nothing in particular that is here only to make the row"


def write_helm_core(root: Path) -> Path:
    """The 16 core scenarios in their public layouts under ``root`` (what ``--helm-data`` points at)."""
    p = PLANTED
    # MMLU (Hendrycks' data.tar): dev/ for examples, test/ scored; no header; question,A,B,C,D,answer
    csv_rows(root / "mmlu/dev/abstract_algebra_dev.csv", None, [[other(i), "a", "b", "c", "d", "A"] for i in range(5)])
    csv_rows(
        root / "mmlu/test/abstract_algebra_test.csv",
        None,
        [[p["mmlu"], "a shortage", "a surplus", "no change", "lower rents", "A"], [other(9), "a", "b", "c", "d", "B"]],
    )
    # BoolQ jsonl
    jsonl(
        root / "boolq/train.jsonl",
        [{"question": "is it q", "passage": other(i), "answer": i % 2 == 0} for i in range(5)],
    )
    jsonl(root / "boolq/dev.jsonl", [{"question": "is the caspian a lake", "passage": p["boolq"], "answer": True}])
    # NarrativeQA repository CSVs
    csv_rows(root / "narrative_qa/summaries.csv", ["document_id", "set", "summary", "summary_tokenized"],
             [["d1", "train", other(1), "x"], ["d2", "test", p["narrative_qa"], "x"]])
    csv_rows(
        root / "narrative_qa/qaps.csv",
        [
            "document_id",
            "set",
            "question",
            "answer1",
            "answer2",
            "question_tokenized",
            "answer1_tokenized",
            "answer2_tokenized",
        ],
        [
            ["d1", "train", "Who is it", "A", "B", "x", "x", "x"],
            ["d2", "test", "Who adopts the dog", "Elias", "Brandt", "x", "x", "x"],
        ],
    )
    # NaturalQuestions dev jsonl (original format: document_html, byte offsets of the long/short answers)
    def nq(question: str, passage: str, short: str) -> dict:
        html = f"<P>{passage}</P>"
        start = len(html[: html.index(short)].encode())
        return {"document_html": html, "document_title": "t", "question_text": question, "document_tokens": [],
                "annotations": [{"long_answer": {"start_byte": 0, "end_byte": len(html.encode())},
                                 "short_answers": [{"start_byte": start, "end_byte": start + len(short.encode())}]}]}
    jsonl(root / "natural_qa/nq-dev-00.jsonl", [
        nq("who built it", other(2), "filler"),  # the first dev row is HELM's train split
        nq(p["natural_qa_closedbook"], p["natural_qa_openbook_longans"], "Great Barrier Reef")])
    # QuAC v0.2 json
    def quac(context: str) -> dict:
        qas = [
            {"question": f"q{i}", "orig_answer": {"text": f"a{i}"}, "answers": [{"text": f"a{i}"}]} for i in range(3)
        ]
        return {"title": "T", "background": "B", "section_title": "S",
                "paragraphs": [{"context": context + " CANNOTANSWER", "qas": qas}]}
    (root / "quac").mkdir()
    (root / "quac/train_v0.2.json").write_text(json.dumps({"data": [quac(other(3))]}))
    (root / "quac/val_v0.2.json").write_text(json.dumps({"data": [quac(p["quac"])]}))
    # HellaSwag val jsonl (zero-shot in HELM: no train file needed); ctx = ctx_a + " " + ctx_b
    ctx_a, ctx_b = p["hellaswag"].rsplit(". ", 1)
    jsonl(root / "hellaswag/hellaswag_val.jsonl", [{"ind": 1, "activity_label": "Gardening", "ctx_a": ctx_a + ".",
          "ctx_b": ctx_b[0].lower() + ctx_b[1:], "ctx": p["hellaswag"], "split": "val", "split_type": "indomain",
          "label": 0, "endings": ["digs a hole.", "eats it.", "sings.", "leaves."]}])
    # OpenbookQA Data/Main test jsonl
    jsonl(
        root / "openbookqa/test.jsonl",
        [
            {
                "id": "1",
                "question": {
                    "stem": p["openbookqa"],
                    "choices": [
                        {"text": t, "label": lab} for t, lab in zip(["gets hot", "melts", "floats", "sinks"], "ABCD")
                    ],
                },
                "answerKey": "A",
            }
        ],
    )
    # TruthfulQA.csv
    csv_rows(root / "truthful_qa/TruthfulQA.csv", ["Type", "Category", "Question", "Best Answer", "Correct Answers",
                                                  "Incorrect Answers", "Source"],
             [["Adversarial", "Health", f"Q{i} {other(i)}?", "Nothing", "Nothing", "It stays", "src"] for i in range(5)]
             + [["Adversarial", "Health", p["truthful_qa"] + "?", "It passes through", "It passes through",
                 "It stays for seven years", "src"]])
    # MS MARCO passage track, HELM's file names (documents, queries, qrels, BM25 top-k per track)
    ms = root / "msmarco"
    ms.mkdir()
    docs = {d: other(100 + d) for d in range(1, 61)}
    docs[40] = p["msmarco_regular"]
    (ms / "documents.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in docs.items()))
    (ms / "train_queries.tsv").write_text("1\twhat is topic one\n2\twhat is topic two\n")
    (ms / "train_qrels.tsv").write_text("1\t0\t1\t1\n2\t0\t2\t1\n")
    (ms / "train_topk.tsv").write_text("".join(f"{q}\t{d}\t{d}\n" for q in (1, 2) for d in range(1, 21)))
    for track, query, rel in (("regular", "how long are elephants pregnant", 1), ("trec", p["msmarco_trec"], 3)):
        (ms / f"{track}_queries.tsv").write_text(f"100\t{query}\n")
        (ms / f"{track}_qrels.tsv").write_text(f"100\t0\t40\t{rel}\n")  # TREC DL judgments are graded 0-3
        (ms / f"{track}_topk.tsv").write_text("".join(f"100\t{d}\t{d - 30}\n" for d in range(31, 61)))
    # CNN/DM and XSum jsonl (Hugging Face fields); train articles need 50-150 words to be kept as examples
    train_article = " ".join(other(i) for i in range(5))
    for name, (a, b) in {"summarization_cnndm": ("article", "highlights"),
                         "summarization_xsum": ("document", "summary")}.items():
        jsonl(root / name / "train.jsonl", [{a: train_article, b: "a summary of the filler sentences for training"}])
        jsonl(root / name / "test.jsonl", [{a: p[name] + " " + other(7), b: "a summary"}])
    # aclImdb: train/ and test/ folders of reviews (test is HELM's valid split)
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            (root / "imdb" / split / label).mkdir(parents=True)
            text = p["imdb"] if (split, label) == ("test", "neg") else other(hash((split, label)) % 100)
            (root / "imdb" / split / label / "0_3.txt").write_text(text)
    # RAFT: prompt settings (two JSON lines) and the subset's labeled rows
    raft = root / "raft"
    raft.mkdir()
    (raft / "prompt_construction_settings.json").write_text(
        json.dumps({"ade_corpus_v2": ["Sentence"]}) + "\n" + json.dumps({"ade_corpus_v2": "Label the sentence."}))
    rows = [{"Sentence": other(200 + i), "ID": i, "Label": "not ADE-related"} for i in range(9)]
    rows.append({"Sentence": p["raft"], "ID": 9, "Label": "ADE-related"})
    jsonl(raft / "ade_corpus_v2.jsonl", rows)
    # CivilComments (WILDS all_data_with_identities.csv)
    csv_rows(root / "civil_comments/all_data_with_identities.csv",
             ["", "id", "comment_text", "split", "toxicity", "male", "female"],
             [[0, 1, other(300), "train", 0.0, 0.0, 0.0], [1, 2, p["civil_comments"], "test", 0.1, 0.0, 0.9]])
    return root


def reflowed(text: str) -> str:
    """The same words re-cased, with other line breaks and punctuation: what a scraped copy looks like."""
    words = text.split()
    return "\n".join(" ".join(w.upper() if i % 2 else w.capitalize() for i, w in enumerate(words[j : j + 4])) + ","
                     for j in range(0, len(words), 4))


@pytest.fixture(scope="module")
def helm_dir(tmp_path_factory) -> Path:
    return write_helm_core(tmp_path_factory.mktemp("helm_data") / "helm")


@pytest.fixture(scope="module")
def index(helm_dir) -> Decontaminator:
    d = Decontaminator(n=10)
    entry = d.add_target_path(helm_dir)
    assert entry.kind == "helm" and not entry.skipped, entry.skipped
    return d


def test_all_sixteen_scenarios_are_read(index):
    (entry,) = index.entries
    assert sorted(entry.scenarios) == sorted(PLANTED)  # every core scenario, through its loader
    assert all(n >= 1 for n in entry.scenarios.values()), entry.scenarios
    assert entry.ngrams > 0 and entry.files >= 20 and entry.instances == sum(entry.scenarios.values())


@pytest.mark.parametrize("scenario", sorted(PLANTED))
def test_a_planted_instance_is_removed_verbatim_and_reflowed(index, scenario):
    report = DecontamReport()
    text = PLANTED[scenario]
    assert index.clean(f"{FILLER} {text} {FILLER}", "document", "web", "w:1", report) is None
    assert index.clean(f"{FILLER}\n{reflowed(text)}\n{FILLER}", "document", "web", "w:2", report) is None
    assert index.clean(f"{FILLER} {FILLER}", "document", "web", "w:3", report) is not None
    assert report.documents_removed == 2 and report.documents_checked == 3
    assert all(e["target"].startswith("helm/") for e in report.examples)
    assert index.entries[0].hits_by_source["web"] >= 2


def test_a_scenario_folder_alone_is_a_target(helm_dir):
    d = Decontaminator(n=10)
    entry = d.add_target_path(helm_dir / "civil_comments")
    assert entry.kind == "helm" and list(entry.scenarios) == ["civil_comments"]
    assert d.find(PLANTED["civil_comments"]) and not d.find(PLANTED["imdb"])


def test_a_target_that_yields_nothing_is_an_error(tmp_path):
    (tmp_path / "csvs").mkdir()
    csv_rows(tmp_path / "csvs/questions.csv", None, [[PLANTED["mmlu"], "a", "b"]])  # not a layout we know
    with pytest.raises(DecontamTargetError, match=r"csvs yields no 10-word n-gram .*Understood: a HELM data dir"):
        Decontaminator(n=10).add_target_path(tmp_path / "csvs")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Decontaminator(n=10).add_target_path(tmp_path / "missing")


def test_the_build_reports_each_target_and_fails_on_an_empty_one(tmp_path, helm_dir, shared_data, capsys):
    """Through ``llmft data build``: a training source with one contaminated document per scenario; stats.json
    has, per target, the scenarios and n-grams indexed and the documents each removed per source."""
    from llmft.cli import main

    docs = [{"text": f"{FILLER} {PLANTED[s]} {FILLER}"} for s in sorted(PLANTED)] + [{"text": FILLER * 3}]
    jsonl(tmp_path / "web.jsonl", docs)
    recipe = {
        "tokenizer": str(REPO / "llmft/assets/tiny-llama"),
        "seq_len": 128,
        "validation_fraction": 0.0,
        "decontaminate": {"targets": [str(helm_dir), str(shared_data / "gutenberg")], "n": 10},
        "sources": [{"name": "web", "weight": 1.0, "source": {"format": "jsonl", "path": str(tmp_path / "web.jsonl")}}],
    }
    path = tmp_path / "mix.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    assert main(["data", "build", str(path), "--out", str(tmp_path / "out")]) == 0
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    assert stats["sources"]["web"]["decontaminated"] == 16
    helm, books = stats["decontamination"]["targets"]
    assert helm["kind"] == "helm" and len(helm["scenarios"]) == 16 and helm["hits_by_source"] == {"web": 16}
    assert books["kind"] == "files" and books["instances"] == 2 and books["ngrams"] > 100_000
    assert books["hits_by_source"] == {}

    recipe["decontaminate"]["targets"].append(str(tmp_path / "web.jsonl.missing"))
    path.write_text(yaml.safe_dump(recipe))
    assert main(["data", "build", str(path), "--out", str(tmp_path / "out2")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe["decontaminate"]["targets"][-1] = str(empty)
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["data", "build", str(path), "--out", str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err
    assert f"{empty} yields no 10-word n-gram" in err and "Traceback" not in err
    assert not (tmp_path / "out3" / "stats.json").exists()
