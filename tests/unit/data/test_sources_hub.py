"""llmft.data.sources hub sources: `datasets.load_dataset` rows through the same record functions as the file
readers. Offline: the packaged builders (json, parquet) and a local dataset directory stand in for the Hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from pydantic import ValidationError

from llmft.config.sources import HUB_FORMATS, SourceSpec, list_files
from llmft.data import sources
from llmft.data.sources import Document, SourceError, SourceReport, read_source


def read(on_error: str = "skip", **spec) -> tuple[list[Document], SourceReport]:
    report = SourceReport()
    docs = list(read_source(SourceSpec(**spec), on_error=on_error, report=report))
    return docs, report


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def content(docs: list[Document]) -> list[tuple[str, str, dict]]:
    """A document without its location (hub rows and file lines are numbered differently)."""
    return [(d.text, d.prompt, d.meta) for d in docs]


def spec_error(**spec) -> str:
    with pytest.raises(ValidationError) as e:
        SourceSpec(**spec)
    return str(e.value)


# ------------------------------------------------------------------------------------ same documents


def test_hub_json_redpajama_equals_path_reader(tmp_path):
    path = write_jsonl(tmp_path / "rp.jsonl", [
        {"text": "a book", "meta": {"title": "Moby Dick"}, "red_pajama_subset": "book"},
        {"text": "a paper", "meta": {"arxiv_id": "2306.15595"}, "red_pajama_subset": "arxiv"},
        {"text": "a web page", "meta": json.dumps({"url": "http://x"}), "red_pajama_subset": "c4"},
        {"text": "code", "meta": {"repo_name": "r"}, "red_pajama_subset": "github"},
    ])
    for filters in ({"subsets": ["book", "c4"]}, {"exclude_subsets": ["book", "arxiv"]}, {}):
        by_path, path_report = read(format="redpajama", path=path, **filters)
        by_hub, hub_report = read(format="redpajama", hub="json", data_files=[str(path)], **filters)
        assert content(by_hub) == content(by_path) and by_path
        assert (hub_report.documents, hub_report.filtered, hub_report.bad_records) == \
               (path_report.documents, path_report.filtered, 0)
    books, _ = read(format="redpajama", hub="json", data_files=[str(path)], subsets=["book"])
    assert books == [Document(text="a book", where="json/train:0",
                              meta={"title": "Moby Dick", "red_pajama_subset": "book"})]
    # The 1T-Sample rows carry no subset: it is in the file name, here the data_files name.
    sample = write_jsonl(tmp_path / "book_sample.jsonl", [{"text": "sample book", "meta": {"title": "T"}}])
    docs, _ = read(format="redpajama", hub="json", data_files=[str(sample)], subsets=["book"])
    assert content(docs) == content(read(format="redpajama", path=sample, subsets=["book"])[0])
    assert docs[0].meta == {"title": "T", "red_pajama_subset": "book"}
    orphan = write_jsonl(tmp_path / "misc.jsonl", [{"text": "t", "meta": {}}])
    _, report = read(format="redpajama", hub="json", data_files=[str(orphan)])
    assert report.examples == ["json/train:0: no red_pajama_subset field, and data_files name no subset (read one "
                               "subset's files, e.g. data_files: [book_sample.jsonl])"]


def test_hub_parquet_p3_equals_path_reader(tmp_path):
    records = [
        {"inputs": [1, 2], "inputs_pretokenized": "Is the sky blue? Yes or no?", "targets": [3],
         "targets_pretokenized": "Yes"},
        {"inputs": [4], "inputs_pretokenized": "", "targets": [5], "targets_pretokenized": "an empty prompt is fine"},
        {"inputs": [6], "inputs_pretokenized": "No target", "targets": [], "targets_pretokenized": ""},
    ]
    parquet = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    by_hub, hub_report = read(format="p3", hub="parquet", data_files=[str(parquet)])
    # The p3 file reader takes the jsonl P3 layout: the same rows, one a line.
    by_path, path_report = read(format="p3", path=write_jsonl(tmp_path / "p3.jsonl", records))
    assert content(by_hub) == content(by_path) == [
        ("Yes", "Is the sky blue? Yes or no?", {}), ("an empty prompt is fine", "", {})]
    assert [d.where for d in by_hub] == ["parquet/train:0", "parquet/train:1"]
    assert hub_report.examples == ["parquet/train:2: empty text in field 'targets_pretokenized'"]
    assert path_report.bad_records == 1


def test_hub_pile_subset_filter(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [
        {"text": "gutenberg book", "meta": {"pile_set_name": "Gutenberg (PG-19)"}},
        {"text": "web", "meta": {"pile_set_name": "Pile-CC"}},
        {"text": "no set", "meta": {}},
    ])
    docs, report = read(format="pile", hub="json", data_files=[str(path)], subsets=["Gutenberg (PG-19)"])
    assert docs == [Document(text="gutenberg book", where="json/train:0", meta={"pile_set_name": "Gutenberg (PG-19)"})]
    assert (report.documents, report.filtered, report.bad_records) == (1, 1, 1)
    assert report.examples == ["json/train:2: no string meta.pile_set_name"]
    rest, _ = read(format="pile", hub="json", data_files=[str(path)], exclude_subsets=["Gutenberg (PG-19)"])
    assert content(rest) == content(read(format="pile", path=path, exclude_subsets=["Gutenberg (PG-19)"])[0])
    assert [d.text for d in rest] == ["web"]


def test_hub_pg19_rows_strip_gutenberg_like_file_reader(tmp_path):
    book = ("\ufeffThe Project Gutenberg EBook of Moby Dick\n\n*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***"
            "\n\nProduced by Daniel Lazarus\n\nCall me Ishmael. Some years ago...\n\nEnd of Project Gutenberg's "
            "Moby Dick\n\n*** END OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\n\nFull license text.\n")
    rows = [{"short_book_title": "Moby Dick", "publication_date": 1851, "url": "http://www.gutenberg.org/ebooks/2701",
             "text": book},
            {"short_book_title": "Empty", "publication_date": 1900, "url": "http://www.gutenberg.org/ebooks/1",
             "text": "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n*** END OF THE PROJECT GUTENBERG EBOOK X ***"}]
    parquet = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    by_hub, hub_report = read(format="pg19", hub="parquet", data_files=[str(parquet)])
    by_path, path_report = read(format="pg19", path=parquet)
    assert content(by_hub) == content(by_path) == [("Call me Ishmael. Some years ago...", "", {
        "short_book_title": "Moby Dick", "publication_date": 1851, "url": "http://www.gutenberg.org/ebooks/2701",
        "book_id": "2701"})]
    assert hub_report.examples == ["parquet/train:1: no text between the Project Gutenberg header and footer"]
    assert path_report.examples == [f"{parquet}#1: no text between the Project Gutenberg header and footer"]


def test_hub_local_directory_names_its_config_in_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"question": "Capital of France?", "answer": " Paris."}])
    spec = dict(format="prompt_completion", hub="ds", hub_config="default", prompt_field="question",
                completion_field="answer")
    docs, _ = read(**spec)
    assert docs == [Document(text=" Paris.", where="ds[default]/train:0", prompt="Capital of France?")]
    assert list_files(SourceSpec(**spec)) == [Path("ds") / "train.jsonl"]
    assert set(HUB_FORMATS) == set(sources._RECORDS)  # every hub format has its record function


# ------------------------------------------------------------------------------------------- bad data


def test_hub_malformed_rows_counted_or_fatal(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"text": "good one"},
        {"title": "no text field"},  # the json builder gives it text: null (the column exists for other rows)
        {"text": 42},
        {"text": ""},
        {"text": "good two"},
    ])
    docs, report = read(format="jsonl", hub="json", data_files=[str(path)])
    assert docs == [Document(text="good one", where="json/train:0"), Document(text="good two", where="json/train:4")]
    assert (report.documents, report.bad_records) == (2, 3)
    assert report.examples == ["json/train:1: field 'text' is null, expected a string",
                               "json/train:2: field 'text' is a number, expected a string",
                               "json/train:3: empty text in field 'text'"]
    seen = []
    with pytest.raises(SourceError, match=r"^json/train:1: field 'text' is null, expected a string \(on_error is "
                                          r"'stop'; set on_error: skip"):
        for doc in read_source(SourceSpec(format="jsonl", hub="json", data_files=[str(path)]), on_error="stop"):
            seen.append(doc.text)
    assert seen == ["good one"]
    # A field no row has is a missing column, whatever on_error says: skipping would read nothing.
    with pytest.raises(SourceError, match=r"^json/train: the rows have no field 'body' \(fields: text, title\); "
                                          "set text_field"):
        read(format="jsonl", hub="json", data_files=[str(path)], text_field="body")


def test_hub_unknown_id_offline_is_one_line(monkeypatch, caplog):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variable when first imported; set what it would have set, so nothing is retried.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.WARNING, logger="llmft.data.sources"), pytest.raises(SourceError) as e:
        read(format="pg19", hub="llmft-tests/no-such-dataset")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("llmft-tests/no-such-dataset/train: could not load the dataset (")
    assert "check the id" in message and "HF_HUB_OFFLINE=1" in message and "use path:" in message
    assert "hub source llmft-tests/no-such-dataset is not pinned: set revision: <commit sha>" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmft.data.sources"), pytest.raises(SourceError):
        read(format="pg19", hub="llmft-tests/no-such-dataset", hub_config="x", revision="0" * 40)
    assert "not pinned" not in caplog.text


# ----------------------------------------------------------------------------------------------- spec


def test_hub_spec_validation_messages(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    assert "give either path or hub, not both" in spec_error(format="jsonl", path=data, hub="deepmind/pg19")
    assert "give path (local files" in spec_error(format="jsonl")
    message = spec_error(format="natural_instructions", hub="Muennighoff/natural-instructions")
    assert "format 'natural_instructions' reads local files only; hub applies to formats jsonl, parquet, arrow, " \
           "redpajama, oig, p3, pile, pg19, prompt_completion" in message
    for fmt in ("text", "csv", "html"):
        assert "reads local files only" in spec_error(format=fmt, hub="json", data_files=[str(data)])
    assert "reads local files only" in spec_error(format="sqlite", hub="x/y", query="SELECT 1 AS text")
    assert "packaged builder and reads data_files" in spec_error(format="jsonl", hub="json")
    assert "revision apply to Hub datasets, not to the packaged builder 'json'" in spec_error(
        format="jsonl", hub="json", data_files=[str(data)], revision="abc")
    assert "data_files entry" in spec_error(format="jsonl", hub="json", data_files=[str(tmp_path / "*.parquet")])
    assert "split/revision apply only to hub sources" in spec_error(format="jsonl", path=data, split="test",
                                                                    revision="abc")
    assert "a stream cannot take" in spec_error(format="pg19", hub="deepmind/pg19", split="train[:10]")
    assert "data_files form the 'train' split" in spec_error(format="pg19", hub="deepmind/pg19", split="test",
                                                            data_files=["data/test-*.parquet"])
    assert "trust_remote_code is not supported" in spec_error(format="pg19", hub="deepmind/pg19",
                                                              trust_remote_code=True)
    # A hub id is not checked against the filesystem, and a schema-only check skips local data_files too.
    assert SourceSpec(format="pg19", hub="deepmind/pg19", split="validation").path is None
    SourceSpec.model_validate({"format": "jsonl", "hub": "json", "data_files": ["missing/*.jsonl"]},
                              context={"check_paths": False})


# ----------------------------------------------------------------------------------------------- cache


def test_hub_fingerprint_follows_spec_and_local_data_files(tmp_path):
    from transformers import AutoTokenizer

    from llmft.config.data import MixRecipe
    from llmft.data.build import fingerprint

    tok = AutoTokenizer.from_pretrained(REPO / "llmft/assets/tiny-llama")

    def fp(**source) -> str:
        mix = MixRecipe.model_validate({"sources": [{"name": "s", "weight": 1.0, "source": source}]})
        return fingerprint(mix, tok, 256)

    hub = {"format": "pg19", "hub": "deepmind/pg19", "revision": "a" * 40}
    assert list_files(SourceSpec(**hub)) == []  # known by its spec alone
    base = fp(**hub)
    assert fp(**hub) == base
    changed = [fp(**{**hub, "revision": "b" * 40}), fp(**{**hub, "hub": "emozilla/pg19"}),
               fp(**{**hub, "hub_config": "other"}), fp(**{**hub, "split": "validation"}),
               fp(**{**hub, "data_files": ["data/train-*.parquet"]}), fp(**{**hub, "streaming": False})]
    assert len({base, *changed}) == 1 + len(changed)

    local = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    spec = {"format": "jsonl", "hub": "json", "data_files": [str(tmp_path / "*.jsonl")]}
    assert list_files(SourceSpec(**spec)) == [local]
    before = fp(**spec)
    write_jsonl(local, [{"text": "one"}, {"text": "two"}])
    assert fp(**spec) != before  # a changed local data file rebuilds
