"""llmft.data.sources: every format on real files written in its published layout, bad data, spec validation."""

from __future__ import annotations

import csv
import gzip
import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from llmft.config.sources import SourceSpec, list_files
from llmft.data.sources import (
    Document,
    SourceError,
    SourceReport,
    html_to_text,
    read_json_lines,
    read_source,
    strip_gutenberg,
)


def read(on_error: str = "skip", **spec) -> tuple[list[Document], SourceReport]:
    report = SourceReport()
    docs = list(read_source(SourceSpec(**spec), on_error=on_error, report=report))
    return docs, report


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# ------------------------------------------------------------------------------------------ formats


def test_text_file_and_directory(tmp_path):
    d = tmp_path / "books"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"\xef\xbb\xbfsecond\r\nline\r\n")
    with gzip.open(d / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("first")
    (d / "sub" / "c.txt").write_text("third")
    (d / "notes.md").write_text("not a .txt file")
    (d / ".hidden.txt").write_text("hidden")
    docs, report = read(format="text", path=d)
    assert docs == [
        Document(text="first", where=str(d / "a.txt.gz")),
        Document(text="second\nline\n", where=str(d / "b.txt")),
        Document(text="third", where=str(d / "sub" / "c.txt")),
    ]
    assert (report.documents, report.bad_records) == (3, 0)
    one, _ = read(format="text", path=d / "b.txt")
    assert [x.text for x in one] == ["second\nline\n"]


def test_jsonl_text_field_gzip_zstd_and_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "alpha", "id": 1}, {"body": "beta"}])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"body": "gamma"}], opener=gzip.open)
    # The Pile and RedPajama ship .jsonl.zst; written here with pyarrow's zstd codec.
    with pa.output_stream(str(tmp_path / "c.jsonl.zst"), compression="zstd") as f:
        f.write(b'{"body": "delta"}\n')
    docs, report = read(format="jsonl", path=tmp_path, text_field="body")
    assert [(x.text, x.where) for x in docs] == [
        ("alpha", f"{tmp_path / 'a.jsonl'}:1"),
        ("beta", f"{tmp_path / 'a.jsonl'}:2"),
        ("gamma", f"{tmp_path / 'b.jsonl.gz'}:1"),
        ("delta", f"{tmp_path / 'c.jsonl.zst'}:1"),
    ]
    assert all(x.prompt == "" and x.meta == {} for x in docs)
    globbed, _ = read(format="jsonl", path=tmp_path / "*.jsonl*", text_field="body")
    assert [x.text for x in globbed] == ["alpha", "beta", "gamma", "delta"]


def test_parquet_rows(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"content": ["one", None, "three"], "n": [1, 2, 3]}), path)
    docs, report = read(format="parquet", path=path, text_field="content")
    assert docs == [Document(text="one", where=f"{path}#0"), Document(text="three", where=f"{path}#2")]
    assert report.examples == [f"{path}#1: null text in column 'content'"]
    with pytest.raises(SourceError, match="no column 'text'"):
        read(format="parquet", path=path)
    with pytest.raises(SourceError, match="column 'n' is int64, expected string"):
        read(format="parquet", path=path, text_field="n")


def test_arrow_feather_file_and_save_to_disk_dir(tmp_path):
    feather.write_feather(pa.table({"text": ["x", "y"]}), tmp_path / "t.feather")
    docs, _ = read(format="arrow", path=tmp_path / "t.feather")
    assert docs == [Document(text="x", where=f"{tmp_path / 't.feather'}#0"),
                    Document(text="y", where=f"{tmp_path / 't.feather'}#1")]

    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(5)]}).save_to_disk(saved, num_shards=2)
    # An .arrow file that is not one of the dataset's shards (a map() cache) must not be read.
    feather.write_feather(pa.table({"text": ["cache"]}), saved / "cache-123.arrow")
    docs, report = read(format="arrow", path=saved)
    assert [x.text for x in docs] == [f"row {i}" for i in range(5)]
    assert docs[0].where == f"{saved / 'data-00000-of-00002.arrow'}#0"
    assert docs[3].where == f"{saved / 'data-00001-of-00002.arrow'}#0"
    assert report.documents == 5


def test_redpajama_subsets_and_meta(tmp_path):
    records = [
        {"text": "a book", "meta": {"title": "Moby Dick"}, "red_pajama_subset": "book"},
        {"text": "a paper", "meta": {"arxiv_id": "2306.15595"}, "red_pajama_subset": "arxiv"},
        {"text": "a web page", "meta": json.dumps({"url": "http://x"}), "red_pajama_subset": "c4"},
        {"text": "code", "meta": {"repo_name": "r"}, "red_pajama_subset": "github"},
    ]
    path = write_jsonl(tmp_path / "rp.jsonl", records)
    books, report = read(format="redpajama", path=path, subsets=["book"])
    assert books == [Document(text="a book", where=f"{path}:1",
                              meta={"title": "Moby Dick", "red_pajama_subset": "book"})]
    assert report.filtered == 3
    other, report = read(format="redpajama", path=path, exclude_subsets=["book", "arxiv"])
    assert [(x.text, x.meta) for x in other] == [
        ("a web page", {"url": "http://x", "red_pajama_subset": "c4"}),
        ("code", {"repo_name": "r", "red_pajama_subset": "github"}),
    ]
    assert (report.documents, report.filtered, report.bad_records) == (2, 2, 0)
    # The raw RedPajama-1T files carry no subset field: it is the directory they sit in.
    (tmp_path / "arxiv").mkdir()
    raw = write_jsonl(tmp_path / "arxiv" / "arxiv_0.jsonl", [{"text": "raw paper", "meta": {}}])
    docs, _ = read(format="redpajama", path=raw, subsets=["arxiv"])
    assert [x.meta for x in docs] == [{"red_pajama_subset": "arxiv"}]
    orphan = write_jsonl(tmp_path / "misc.jsonl", [{"text": "t", "meta": {}}])
    _, report = read(format="redpajama", path=orphan)
    assert report.examples == [f"{orphan}:1: no red_pajama_subset field, and the file's name and directories "
                               "name no subset"]


def test_oig_dialogue_kept_as_is(tmp_path):
    text = "<human>: What is 2+2?\n<bot>: 4.\n<human>: Thanks!\n<bot>: You're welcome."
    path = write_jsonl(tmp_path / "unified_ul2_plus_oscar_en_sample_dialog.jsonl",
                       [{"text": text, "metadata": {"source": "unified_ul2_plus_oscar_en_sample_dialog"}}])
    docs, _ = read(format="oig", path=path)
    assert docs == [Document(text=text, where=f"{path}:1",
                             meta={"source": "unified_ul2_plus_oscar_en_sample_dialog"})]


def test_natural_instructions_list_definition_and_bad_instance(tmp_path):
    task = {
        "Definition": ["Answer with the sum."],
        "Positive Examples": [{"input": "1 2", "output": "3", "explanation": "1+2"},
                              {"input": "2 2", "output": "4", "explanation": "2+2"}],
        "Negative Examples": [{"input": "1 1", "output": "3", "explanation": "wrong"}],
        "Instances": [{"id": "task999-a", "input": "4 5", "output": ["9", "nine"]},
                      {"id": "task999-b", "input": "no output"}],
    }
    path = tmp_path / "task999_sum.json"
    path.write_text(json.dumps(task))
    docs, report = read(format="natural_instructions", path=tmp_path, ni_positive_examples=1)
    assert docs == [
        Document(
            text="9",
            where=f"{path}#instances[0]",
            meta={
                "task": "task999_sum",
                "id": "task999-a",
                "ni_head": "Definition: Answer with the sum.\n\nInput: 1 2\nOutput: 3\n\n",
                "ni_query": "Input: 4 5\nOutput: ",
            },
            prompt="Definition: Answer with the sum.\n\nInput: 1 2\nOutput: 3\n\nInput: 4 5\nOutput: ",
        )
    ]
    assert report.examples == [f"{path}#instances[1]: no 'output' (a non-empty list of strings)"]


def test_natural_instructions_real_task_file(shared_data):
    path = shared_data / "natural_instructions" / "task085_unnatural_addsub_arithmetic.json"
    task = json.loads(path.read_text())
    definition = task["Definition"] if isinstance(task["Definition"], str) else "\n".join(task["Definition"])
    docs, report = read(format="natural_instructions", path=path)
    assert (len(docs), report.documents, report.bad_records) == (30, 30, 0)
    first = docs[0]
    assert first.prompt.startswith(f"Definition: {definition.strip()}\n\n")
    assert first.prompt.count("Input: ") == 3 and first.prompt.count("Output: ") == 3  # 2 examples + the instance
    for ex in task["Positive Examples"][:2]:
        assert f"Input: {ex['input']}\nOutput: {ex['output']}\n\n" in first.prompt
    assert first.prompt.endswith(f"Input: {task['Instances'][0]['input']}\nOutput: ")
    assert first.text == task["Instances"][0]["output"][0]
    assert first.meta["task"] == "task085_unnatural_addsub_arithmetic"
    assert [d.text for d in docs] == [i["output"][0] for i in task["Instances"]]
    zero, _ = read(format="natural_instructions", path=path, ni_positive_examples=0)
    assert zero[0].prompt.count("Input: ") == 1


def test_p3_prompt_and_target(tmp_path):
    path = write_jsonl(tmp_path / "p3.jsonl", [{
        "inputs": [1, 2], "inputs_pretokenized": "Is the sky blue? Yes or no?",
        "targets": [3], "targets_pretokenized": "Yes",
    }])
    docs, _ = read(format="p3", path=path)
    assert docs == [Document(text="Yes", where=f"{path}:1", prompt="Is the sky blue? Yes or no?")]


def test_pile_set_filter(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [
        {"text": "gutenberg book", "meta": {"pile_set_name": "Gutenberg (PG-19)"}},
        {"text": "web", "meta": {"pile_set_name": "Pile-CC"}},
        {"text": "no set", "meta": {}},
    ])
    docs, report = read(format="pile", path=path, subsets=["Gutenberg (PG-19)"])
    assert docs == [Document(text="gutenberg book", where=f"{path}:1", meta={"pile_set_name": "Gutenberg (PG-19)"})]
    assert (report.filtered, report.bad_records) == (1, 1)
    assert report.examples == [f"{path}:3: no string meta.pile_set_name"]
    rest, _ = read(format="pile", path=path, exclude_subsets=["Gutenberg (PG-19)"])
    assert [x.text for x in rest] == ["web"]


def test_pg19_directory_of_real_books(shared_data):
    docs, report = read(format="pg19", path=shared_data / "gutenberg")
    assert [(d.where, d.meta) for d in docs] == [
        (str(shared_data / "gutenberg" / "2701.txt"), {"book_id": "2701"}),
        (str(shared_data / "gutenberg" / "84.txt"), {"book_id": "84"}),
    ]
    moby, frankenstein = docs
    assert moby.text.startswith("MOBY-DICK;") and moby.text.endswith("only found another orphan.")
    for boilerplate in ("Project Gutenberg License", "Project Gutenberg-tm", "START OF", "END OF", "gutenberg.org"):
        assert boilerplate not in moby.text
    assert frankenstein.text == (shared_data / "gutenberg" / "84.txt").read_text(encoding="utf-8").strip()
    assert report.bad_records == 0


def test_pg19_hugging_face_rows(tmp_path):
    row = {"short_book_title": "The Whale", "publication_date": 1851, "url": "http://www.gutenberg.org/ebooks/2701",
           "text": "Call me Ishmael.\n"}
    path = write_jsonl(tmp_path / "validation.jsonl", [row])
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "test-00000.parquet")
    docs, _ = read(format="pg19", path=tmp_path)
    meta = {"short_book_title": "The Whale", "publication_date": 1851,
            "url": "http://www.gutenberg.org/ebooks/2701", "book_id": "2701"}
    assert docs == [Document(text="Call me Ishmael.", where=f"{tmp_path / 'test-00000.parquet'}#0", meta=meta),
                    Document(text="Call me Ishmael.", where=f"{path}:1", meta=meta)]


def test_strip_gutenberg_real_books(shared_data):
    raw = (shared_data / "gutenberg" / "2701.txt").read_text(encoding="utf-8")
    assert raw.startswith("\ufeffThe Project Gutenberg EBook")
    body = strip_gutenberg(raw)
    assert body.startswith("MOBY-DICK;")
    assert "Call me Ishmael" in body[:len(body) // 20]
    assert "Project Gutenberg" not in body[:2000] and "Project Gutenberg" not in body[-2000:]
    assert body.endswith("only found another orphan.")
    plain = (shared_data / "gutenberg" / "84.txt").read_text(encoding="utf-8")
    assert strip_gutenberg(plain) == plain.strip()


def test_strip_gutenberg_marker_variants():
    header = "The Project Gutenberg eBook of X\n\n"
    assert strip_gutenberg(f"{header}***START OF THE PROJECT GUTENBERG EBOOK X***\n\nBody.\n\n"
                           "***END OF THE PROJECT GUTENBERG EBOOK X***\nlicense") == "Body."
    assert strip_gutenberg("\ufeff*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\nProduced by Someone\r\n\r\n"
                           "Chapter 1\r\n\r\nEnd of the Project Gutenberg EBook of X\r\n"
                           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\n") == "Chapter 1"
    assert strip_gutenberg("\ufeff  No markers here.\n") == "No markers here."


def test_csv_column_template_and_record_lines(tmp_path):
    path = tmp_path / "posts.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["title", "body"])
        w.writerow(["One", "first\nbody spans\nthree lines"])
        w.writerow(["Two", ""])
        w.writerow(["Three", "third"])
    docs, report = read(format="csv", path=path, text_field="body")
    assert docs == [Document(text="first\nbody spans\nthree lines", where=f"{path}:2"),
                    Document(text="third", where=f"{path}:6")]
    assert report.examples == [f"{path}:5: empty text"]
    docs, _ = read(format="csv", path=path, template="{title}\n\n{body}")
    assert [(x.text, x.where) for x in docs] == [
        ("One\n\nfirst\nbody spans\nthree lines", f"{path}:2"),
        ("Two\n\n", f"{path}:5"),  # an empty column does not make the templated text empty
        ("Three\n\nthird", f"{path}:6"),
    ]
    with pytest.raises(SourceError, match="header has no column 'summary'"):
        read(format="csv", path=path, template="{summary}")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text\nok\n\xff\xfe broken\nshort,extra\n")
    docs, report = read(format="csv", path=bad)
    assert [x.text for x in docs] == ["ok"]
    assert report.examples == [f"{bad}:3: not UTF-8", f"{bad}:4: 2 fields, the header has 1"]


def test_sqlite_query_meta_and_read_only(tmp_path):
    db = tmp_path / "forum.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE posts (id INTEGER, body TEXT, lang TEXT)")
    con.executemany("INSERT INTO posts VALUES (?, ?, ?)", [(1, "hello", "en"), (2, None, "en"), (3, "salut", "fr")])
    con.commit()
    con.close()
    before = db.read_bytes()
    docs, report = read(format="sqlite", path=db, query="SELECT id, body AS text, lang FROM posts ORDER BY id")
    assert docs == [Document(text="hello", where=f"{db}#0", meta={"id": 1, "lang": "en"}),
                    Document(text="salut", where=f"{db}#2", meta={"id": 3, "lang": "fr"})]
    assert report.examples == [f"{db}#1: NULL text"]
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["forum.sqlite"]
    with pytest.raises(SourceError, match="no column named text"):
        read(format="sqlite", path=db, query="SELECT body FROM posts")
    with pytest.raises(SourceError, match="no such table"):
        read(format="sqlite", path=db, query="SELECT body AS text FROM missing")


def test_html_visible_text(tmp_path):
    page = """<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style></head><body>
    <header>Site header</header><nav><a href="/">Home</a></nav>
    <article><h1>The   Title</h1><p>First   paragraph,
    wrapped &amp; spaced.</p><script>var x = "<p>not text</p>";</script>
    <p>Second<br>line two</p><aside>Related links</aside><form><input name="q"><button>Go</button></form>
    <ul><li>item one</li><li>item two</li></ul><pre>code  line 1
code  line 2</pre></article><footer>&copy; 2024</footer></body></html>"""
    (tmp_path / "a.html").write_text(page, encoding="utf-8")
    (tmp_path / "empty.htm").write_text("<html><body><nav>only nav</nav></body></html>")
    docs, report = read(format="html", path=tmp_path)
    assert docs == [Document(
        text="The Title\n\nFirst paragraph, wrapped & spaced.\n\nSecond\nline two\n\nitem one\n\nitem two\n\n"
        "code line 1\ncode line 2",
        where=str(tmp_path / "a.html"),
    )]
    assert report.examples == [f"{tmp_path / 'empty.htm'}: no visible text"]
    assert html_to_text("<p>caf\u00e9</p><table><tr><td>a</td><td>b</td></tr></table>") == "caf\u00e9\n\na b"
    # Old pages are often windows-1252 and say so in a <meta>.
    legacy = tmp_path / "legacy" / "page.htm"
    legacy.parent.mkdir()
    legacy.write_bytes('<meta charset="windows-1252"><p>\u201ccaf\u00e9\u201d</p>'.encode("cp1252"))
    docs, _ = read(format="html", path=legacy)
    assert [x.text for x in docs] == ["\u201ccaf\u00e9\u201d"]


def test_prompt_completion_fields(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "Capital of France?", "answer": " Paris."},
                                                {"question": "Empty prompt ok", "answer": ""}])
    docs, report = read(format="prompt_completion", path=path, prompt_field="question", completion_field="answer")
    assert docs == [Document(text=" Paris.", where=f"{path}:1", prompt="Capital of France?")]
    assert report.examples == [f"{path}:2: empty text in field 'answer'"]


# ---------------------------------------------------------------------------------------------- bad data


def bad_fixture(tmp_path: Path) -> tuple[Path, Path]:
    """A jsonl with one record of each kind of damage, and a gzip cut off mid-stream."""
    path = tmp_path / "bad" / "data.jsonl"
    path.parent.mkdir()
    lines = [
        b'{"text": "good one"}',          # 1
        b'{"text": "unterminated',        # 2 malformed JSON
        b'{"title": "no text field"}',    # 3 missing field
        b'{"text": 42}',                  # 4 wrong type
        b'{"text": ""}',                  # 5 empty text
        b'',                              # 6 blank line: not a record
        b'{"text": "caf\xe9"}',          # 7 latin-1 byte, not UTF-8
        b'{"text": "good two"}',          # 8
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    full = gzip.compress(b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(300)))
    cut = path.parent / "truncated.jsonl.gz"
    cut.write_bytes(full[: len(full) // 2])
    return path, cut


def test_bad_records_counted_with_path_and_line(tmp_path):
    path, cut = bad_fixture(tmp_path)
    docs, report = read(format="jsonl", path=path.parent)
    good_in_cut = len(docs) - 2
    assert [d.text for d in docs[:2]] == ["good one", "good two"]
    assert 0 < good_in_cut < 300
    assert [d.where for d in docs[2:]] == [f"{cut}:{i}" for i in range(1, good_in_cut + 1)]
    assert (report.documents, report.bad_records) == (len(docs), 6)
    assert report.examples == [
        f"{path}:2: malformed JSON (Unterminated string starting at: column 10)",
        f"{path}:3: missing field 'text'",
        f"{path}:4: field 'text' is a number, expected a string",
        f"{path}:5: empty text in field 'text'",
        f"{path}:7: not UTF-8 (invalid continuation byte at byte 13)",
        f"{cut}:{good_in_cut + 1}: truncated gzip",
    ]


def test_truncated_zstd_is_reported(tmp_path):
    full = tmp_path / "full.jsonl.zst"
    with pa.output_stream(str(full), compression="zstd") as f:
        f.write(b"".join(b'{"text": "doc %d"}\n' % i for i in range(1000)))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(full.read_bytes()[:-20])
    docs, report = read(format="jsonl", path=cut)
    assert report.bad_records == 1 and report.examples == [f"{cut}:{len(docs) + 1}: truncated zstd"]


def test_on_error_stop_raises_naming_the_line(tmp_path):
    path, cut = bad_fixture(tmp_path)
    docs = []
    with pytest.raises(SourceError) as e:
        for doc in read_source(SourceSpec(format="jsonl", path=path), on_error="stop"):
            docs.append(doc)
    assert str(e.value).startswith(f"{path}:2: malformed JSON")
    assert "on_error: skip" in str(e.value)
    assert [d.text for d in docs] == ["good one"]
    with pytest.raises(SourceError, match=f"^{cut}:\\d+: truncated gzip"):
        read(on_error="stop", format="jsonl", path=cut)
    with pytest.raises(ValueError, match="on_error"):
        read(on_error="ignore", format="jsonl", path=path)


# --------------------------------------------------------------------------------------------- spec


def spec_error(**spec) -> str:
    with pytest.raises(ValidationError) as e:
        SourceSpec(**spec)
    return str(e.value)


def test_spec_validation_messages(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert "does not exist" in spec_error(format="jsonl", path=tmp_path / "missing.jsonl")
    assert "matches no files" in spec_error(format="jsonl", path=tmp_path / "*.parquet")
    assert "holds no .parquet files" in spec_error(format="parquet", path=tmp_path)
    assert "template applies only to format csv, not 'jsonl'" in spec_error(
        format="jsonl", path=tmp_path / "a.jsonl", template="{text}")
    assert "not {} or {0}" in spec_error(format="csv", path=tmp_path / "a.jsonl", template="{0}")
    assert "format sqlite needs query" in spec_error(format="sqlite", path=tmp_path / "a.jsonl")
    assert "did you mean 'book'" in spec_error(format="redpajama", path=tmp_path / "a.jsonl", subsets=["books"])
    assert "apply to formats redpajama and pile" in spec_error(format="jsonl", path=tmp_path, subsets=["book"])
    assert "text_field applies to formats" in spec_error(format="oig", path=tmp_path, text_field="body")
    assert "Extra inputs are not permitted" in spec_error(format="jsonl", path=tmp_path, txt_field="body")
    spec = SourceSpec(format="jsonl", path=tmp_path)
    assert list_files(spec) == [tmp_path / "a.jsonl"]


def test_a_huge_line_is_reported_and_skipped_without_losing_the_rest(tmp_path, monkeypatch):
    import llmft.data.sources as sources

    monkeypatch.setattr(sources.files, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "huge.jsonl"
    huge = json.dumps({"text": "x" * 5000}).encode()
    path.write_bytes(b'{"text": "before"}\n' + huge + b'\n{"text": "after"}\n' + b"y" * 3000)  # no final newline
    docs, report = read(format="jsonl", path=path)
    assert [d.text for d in docs] == ["before", "after"] and [d.where for d in docs] == [f"{path}:1", f"{path}:3"]
    assert report.bad_records == 2
    assert report.examples == [f"{path}:2: line longer than 1,000 bytes (a damaged file, or raise "
                               "llmft.data.sources.files.MAX_RECORD_BYTES)",
                               f"{path}:4: line longer than 1,000 bytes (a damaged file, or raise "
                               "llmft.data.sources.files.MAX_RECORD_BYTES)"]


def test_read_json_lines_reads_every_compression_and_stops_at_a_bad_line(tmp_path):
    rows = [{"question": "q1", "answers": ["a"]}, {"question": "q2", "answers": []}]
    body = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "a.jsonl").write_text(body)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(body)
    with pa.output_stream(str(tmp_path / "c.jsonl.zst"), compression="zstd") as f:
        f.write(body.encode())
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        assert read_json_lines(tmp_path / name) == rows
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: malformed JSON"):
        read_json_lines(tmp_path / "bad.jsonl")
