"""Decontamination: evaluation n-grams planted in training text are found at the right word, removed by
document or by exact character span, and nothing else is; real Gutenberg books and HELM-style records are
indexed from files, without their license boilerplate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmft.data.decontam import Decontaminator, DecontamReport, Hit, _words_with_offsets, normalize_words

# 20 words of evaluation text and unrelated training prose around it.
EVAL = ("The lighthouse keeper counted forty seven gulls circling above the broken pier before the storm "
        "reached the harbour that night.")
PLANTED = "lighthouse keeper counted forty seven gulls circling above the broken pier before the"  # words 1..13
FILLER_A = "Whisk the eggs with sugar until pale, then fold in the sifted flour."  # 13 words
FILLER_B = "Bake for twenty minutes and let the cake cool on a wire rack."  # 13 words


def index(*texts: str, n: int = 13, margin: int = 0) -> Decontaminator:
    d = Decontaminator(n=n, margin=margin)
    for i, text in enumerate(texts):
        d.add_target(f"eval/{i}", text)
    return d


@pytest.fixture(scope="module")
def books(shared_data) -> Decontaminator:
    """Both bundled Gutenberg books (84 Frankenstein, stripped; 2701 Moby Dick, with BOM, header, footer)."""
    d = Decontaminator()
    assert d.add_files([shared_data / "gutenberg"]) == 2
    assert d.targets == ["gutenberg/2701.txt", "gutenberg/84.txt"]
    return d


# ----------------------------------------------------------------------------------------- matching


def test_planted_ngram_is_found_at_its_word() -> None:
    d = index(EVAL)
    hits = d.find(f"{FILLER_A} {PLANTED} {FILLER_B}")
    assert hits == [Hit(ngram=PLANTED.lower(), target="eval/0", start_word=13)]
    assert d.num_ngrams == 20 - 13 + 1


def test_twelve_word_overlap_is_not_a_hit_at_13_but_is_at_10() -> None:
    twelve = " ".join(PLANTED.split()[:12])
    doc = f"{FILLER_A} {twelve} {FILLER_B}"
    assert index(EVAL).find(doc) == []
    hits = index(EVAL, n=10).find(doc)
    assert [h.start_word for h in hits] == [13, 14, 15]
    assert hits[0].ngram == "lighthouse keeper counted forty seven gulls circling above the broken"


def test_case_and_punctuation_are_ignored() -> None:
    d = index("Hello, World! Said the small robot to the big blue sky over the quiet town.")
    hits = d.find("notes: hello world said the small robot to the big blue sky over the")
    assert [h.start_word for h in hits] == [1]


def test_unicode_punctuation_is_dropped() -> None:
    assert normalize_words("“Hello,” she said—quietly… ¿Qué? «Non» — it’s") == [
        "hello", "she", "saidquietly", "qué", "non", "its"]
    d = index("“Never,” said the old captain—grimly—as he walked along the dark and narrow quay.")
    hits = d.find('"never" said the old captain--grimly--as he walked along the dark and narrow quay')
    assert len(hits) == 1 and hits[0].ngram.startswith("never said the old captaingrimlyas he")


def test_word_offsets_agree_with_normalize_words() -> None:
    text = "\ufeffA “quoted” — line…\n\tWith  İstanbul, (x) ... done!\u00a0end"
    words, starts, ends = _words_with_offsets(text)
    assert words == normalize_words(text)
    assert [text[s:e] for s, e in zip(starts, ends)] == [
        "\ufeffA", "“quoted”", "line…", "With", "İstanbul,", "(x)", "done!", "end"]


def test_repeated_ngrams_are_stored_once_under_their_first_target() -> None:
    d = index(EVAL, EVAL + " " + FILLER_B)
    assert d.num_ngrams == 8 + 13  # the 8 shared 13-grams once, and 13 more that run into FILLER_B
    assert {h.target for h in d.find(PLANTED)} == {"eval/0"}
    assert [h.target for h in d.find("that night. " + FILLER_B)] == ["eval/1"] * 3


# ----------------------------------------------------------------------------------------- cleaning


def test_document_mode_removes_only_the_contaminated_document() -> None:
    d = index(EVAL)
    docs = [FILLER_A, FILLER_B, f"{FILLER_A}\n{PLANTED}, {FILLER_B}", FILLER_B + " " + FILLER_A,
            " ".join(PLANTED.split()[:12])]
    report = DecontamReport()
    kept = [d.clean(doc, "document", "books", f"books.jsonl:{i + 1}", report) for i, doc in enumerate(docs)]
    assert kept == [docs[0], docs[1], None, docs[3], docs[4]]
    assert (report.documents_checked, report.documents_removed, report.spans_removed) == (5, 1, 0)
    assert report.words_removed == 13 + 13 + 13
    assert report.hits_by_source == {"books": 1}
    assert report.examples == [{"source": "books", "where": "books.jsonl:3", "target": "eval/0",
                                "ngram": PLANTED.lower()}]
    assert json.loads(json.dumps(report.to_dict()))["hits_by_source"] == {"books": 1}


def test_span_mode_cuts_exactly_the_planted_words() -> None:
    d = index(EVAL.replace("forty seven", "forty-seven"))
    # The planted words keep their capitals and punctuation and hold a punctuation-only token ("—"). A word's
    # characters are its whole whitespace-delimited token, so the comma of "storm," goes with it.
    planted = "Lighthouse keeper counted forty-seven — gulls circling above the broken pier before the storm,"
    assert len(normalize_words(planted)) == 13
    doc = f"{FILLER_A}\n\n  {planted} then\tsilence.\n"
    report = DecontamReport()
    out = d.clean(doc, "span", "web", "web.jsonl:9", report)
    assert out == f"{FILLER_A}\n\n   then\tsilence.\n"
    assert (report.documents_checked, report.documents_removed, report.spans_removed) == (1, 0, 1)
    assert report.words_removed == 13 and report.hits_by_source == {"web": 1}
    assert report.examples[0]["ngram"].startswith("lighthouse keeper counted fortyseven gulls")


def test_span_mode_merges_overlaps_and_applies_the_margin() -> None:
    d = index(EVAL, margin=2)
    # The whole 20-word evaluation sentence (8 overlapping 13-grams) is one span, widened by 2 words each side.
    doc = f"One two three four. {EVAL} Five six seven eight."
    report = DecontamReport()
    assert d.clean(doc, "span", "web", "w", report) == "One two  seven eight."
    assert (report.spans_removed, report.words_removed) == (1, 2 + 20 + 2)
    # Two separate copies give two spans; a document that is nothing but the copy is dropped.
    doc2 = f"{EVAL} Apples pears plums figs dates limes. {EVAL}"
    assert d.clean(doc2, "span", "web", "w", report) == " plums figs "
    assert d.clean(f"  {EVAL}\n", "span", "web", "w", report) is None
    assert report.documents_removed == 1
    assert report.spans_removed == report.hits_by_source["web"] == 4


# ----------------------------------------------------------------------------------------- files


def test_quoted_book_passage_is_caught_and_a_paraphrase_is_not(books: Decontaminator, shared_data) -> None:
    book = (shared_data / "gutenberg" / "84.txt").read_text(encoding="utf-8")
    tokens = book.split()
    quote = " ".join(tokens[len(tokens) // 2 : len(tokens) // 2 + 20])
    n_quote = len(normalize_words(quote))
    assert n_quote >= 19
    hits = books.find(f"{FILLER_A} {quote} {FILLER_B}")
    assert [h.start_word for h in hits] == list(range(13, 13 + n_quote - 13 + 1))
    assert {h.target for h in hits} == {"gutenberg/84.txt"}

    original = ("Clerval, whose eyes and feelings were always quick in discerning the sensations of others, "
                "declined the subject, alleging, in excuse, his total ignorance;")
    paraphrase = ("Clerval, whose eyes and feelings were ever quick to discern what others felt, dropped the "
                  "subject, pleading in excuse his complete ignorance;")
    assert books.find(f"A review. {original}") != []
    assert books.find(f"A review. {paraphrase}") == []


def test_gutenberg_license_boilerplate_is_not_indexed(books: Decontaminator, shared_data) -> None:
    raw = (shared_data / "gutenberg" / "2701.txt").read_text(encoding="utf-8")
    assert raw.startswith("\ufeff")
    boilerplate = raw[: raw.index("*** START OF")] + raw[raw.index("*** END OF") :]
    assert len(normalize_words(boilerplate)) > 2500
    assert books.find(boilerplate) == []
    # The same text would be flagged had the book been indexed raw, so the check above is not vacuous.
    raw_index = Decontaminator()
    raw_index.add_target("raw", raw)
    assert len(raw_index.find(boilerplate)) > 1000
    # The body is indexed: the first sentence of chapter 1.
    hits = books.find("Call me Ishmael. Some years ago—never mind how long precisely—having little or no money")
    assert [(h.start_word, h.target) for h in hits] == [(0, "gutenberg/2701.txt"), (1, "gutenberg/2701.txt")]


def test_helm_style_nested_jsonl_and_json(tmp_path: Path) -> None:
    passage = "The river otter is a semiaquatic mammal that builds dens in the banks of lakes and slow rivers"
    answer = "Otters mostly eat fish but will also take frogs crayfish turtles and birds when fish are scarce"
    hidden = "this identifier string is long enough to be an n gram but is not under a text field at all"
    question = "Which continent has the largest number of active volcanoes that erupted during the last decade"
    helm = tmp_path / "helm"
    helm.mkdir()
    records = [
        {"id": hidden, "input": {"text": passage}, "references": [{"output": {"text": answer}, "tags": ["correct"]}],
         "split": "test"},
        {"id": "id2", "input": {"text": "short"}, "references": []},
    ]
    (helm / "otters.jsonl").write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    (helm / "quiz.json").write_text(json.dumps({"instances": [{"question": question, "metadata": {"n": 1}}]}))

    d = Decontaminator()
    assert d.add_files([helm]) == 3
    assert d.find(passage)[0].target == "helm/otters.jsonl:1"
    assert d.find(f"Answer: {answer}.")[0].target == "helm/otters.jsonl:1"
    assert d.find(question)[0].target == "helm/quiz.json[0]"
    assert d.find(hidden) == []
    # Each string is indexed on its own: no n-gram runs from the passage into the answer.
    offset = len(normalize_words(passage))
    assert d.find(passage + " " + answer) == d.find(passage) + [
        Hit(h.ngram, h.target, h.start_word + offset) for h in d.find(answer)]

    only_input = Decontaminator()
    assert only_input.add_files([helm / "otters.jsonl"], text_fields=("input",)) == 2
    assert only_input.find(answer) == [] and only_input.find(passage)[0].target.endswith("otters.jsonl:1")


def test_add_files_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "book.txt"
    with pytest.raises(FileNotFoundError, match="nope/book.txt"):
        Decontaminator().add_files([missing])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: malformed JSON"):
        Decontaminator().add_files([bad])
    odd = tmp_path / "table.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        Decontaminator().add_files([odd])
    with pytest.raises(ValueError, match="mode"):
        index(EVAL).clean("x", "sentence", "s", "w", DecontamReport())  # type: ignore[arg-type]


def test_a_leading_byte_order_mark_does_not_hide_the_first_words():
    from llmft.data.decontam import Decontaminator

    words = " ".join(f"w{i}" for i in range(20))
    d = Decontaminator(n=13)
    d.add_target("eval", words)
    assert [h.start_word for h in d.find("\ufeff" + words)][:1] == [0]
