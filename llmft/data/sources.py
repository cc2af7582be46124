"""Public dataset formats, on local disk or on the Hugging Face Hub -> a stream of :class:`Document`.

One :class:`SourceSpec` (an entry of a data-mix YAML) names a format and a path: a file, a directory (every
file of that format inside it, recursively, sorted, hidden files skipped) or a glob pattern -- or, instead
of the path, a ``datasets`` hub name (see "Hub sources" below). :func:`read_source` yields its documents one
at a time, so a source never has to fit in memory.

Formats and the layouts they read (the layouts the public datasets are published in):

===================== ==================================================================================
text                  a .txt file (or .txt.gz / .txt.zst) is one document
jsonl                 one JSON object per line, text in ``text_field`` (.jsonl, .json, .gz, .zst)
parquet, arrow        ``text_field`` column of a parquet file, an Arrow IPC/feather file or a
                      ``datasets`` ``save_to_disk`` directory
redpajama             RedPajama-1T jsonl ``{"text", "meta", "red_pajama_subset"}``
oig                   OIG jsonl ``{"text": "<human>: ...\\n<bot>: ...", "metadata": {...}}``
natural_instructions  Natural Instructions v2 ``task*.json``: one prompt/answer document per instance
p3                    P3 jsonl ``{"inputs_pretokenized", "targets_pretokenized"}``
pile                  The Pile jsonl ``{"text", "meta": {"pile_set_name"}}`` (usually .jsonl.zst)
pg19                  a directory of Gutenberg ``<id>.txt`` books, or the HF rows (jsonl/parquet)
csv                   a column, or a ``str.format`` template over columns
sqlite                the rows of a SELECT (column ``text``; other columns go to ``meta``)
html                  the visible text of .html/.htm pages
prompt_completion     jsonl pairs: the prompt is conditioned on, only the completion is trained on
===================== ==================================================================================

A malformed record (bad JSON, non-UTF-8 bytes, a missing or non-string field, empty text, a truncated
archive) is counted in a :class:`SourceReport` with its location, then skipped (``on_error="skip"``, with a
warning) or fatal (``on_error="stop"``, :class:`SourceError`). Locations are ``path:line`` (1-based) for
line-oriented files, ``path#row`` (0-based) for table rows, ``path`` for whole files. A source that cannot
fit its spec at all (a missing column, a template naming a column the header lacks, a query sqlite
rejects) raises :class:`SourceError` whatever ``on_error`` says: skipping would silently read nothing.
Compressed files are recognised by their magic bytes, not their names (gzip via the standard library,
zstd via pyarrow's codec).

Hub sources. ``hub`` (instead of ``path``) names a ``datasets`` Hub id, or one of the packaged builders
json/parquet/arrow/csv/text reading local ``data_files``; :func:`read_source` streams it through
``datasets.load_dataset(hub, hub_config, split=, revision=, data_files=, streaming=)`` and turns every row
into a document with the same function the file reader of its format uses. The record formats take a hub:
jsonl, parquet, arrow, redpajama, oig, p3, pile, pg19 (the HF rows), prompt_completion. ::

    - {name: books, weight: 0.3, source: {format: pg19, hub: deepmind/pg19, revision: <commit sha>}}
    - name: rp_book                       # the 1T-Sample names each file after its subset
      weight: 0.7
      source: {format: redpajama, hub: togethercomputer/RedPajama-Data-1T-Sample, revision: <commit sha>,
               data_files: [book_sample.jsonl]}
    - {name: p3, weight: 0.1, source: {format: p3, hub: json, data_files: [data/p3/*.jsonl.gz]}}

Row locations are ``hub[hub_config]/split:row`` (row 0-based; ``[hub_config]`` only when one is set). A
malformed row follows ``on_error`` like a file record; a field missing from the first row is a missing
column, and a dataset that cannot be loaded (unknown id, no network, bad config or split) or breaks off
while streaming raises :class:`SourceError` whatever ``on_error`` says. Pin ``revision`` to a commit: the
build cache knows a hub source by its spec (id, config, split, revision, data_files) only -- local
``data_files`` are hashed like other input files -- so an unpinned source is re-used from the cache after
the dataset changes upstream (a warning says so when it is read). Loading scripts are never run
(``trust_remote_code`` is rejected; ``datasets`` 5 dropped scripts).
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import logging
import re
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmft.config.sources import (
    REDPAJAMA_SUBSETS,
    TEXT_FIELD_FORMATS,
    TEXT_SUFFIXES,
    SourceSpec,
    hub_local_root,
    list_files,
    template_fields,
)

log = logging.getLogger(__name__)

_MAX_EXAMPLES = 20


# ------------------------------------------------------------------------------------- documents, report


@dataclass
class Document:
    """One training document and where it came from."""

    text: str  # the text trained on (for prompt/completion pairs: the completion)
    where: str  # "path:line" (1-based), "path" for whole files, "path#row" (0-based) for table rows,
    # "hub[config]/split:row" (0-based) for hub rows
    meta: dict = field(default_factory=dict)  # e.g. {"red_pajama_subset": "book"}, {"task": "task085"}
    prompt: str = ""  # conditioned on but not trained on (loss masked); "" for plain text


class SourceError(Exception):
    """A malformed record under ``on_error="stop"``, or a source that does not fit its spec at all."""


class DataError(Exception):
    """Bad input data under ``on_error: stop``, no usable data, or a build that cannot be read or written (the
    message names the file, and the line where there is one). The CLI exits 2 with it."""


@dataclass
class SourceReport:
    """What reading one source found: documents yielded and malformed records with their locations."""

    documents: int = 0
    bad_records: int = 0
    examples: list[str] = field(default_factory=list)  # the first 20 "where: reason"
    filtered: int = 0  # well-formed records dropped by subsets / exclude_subsets
    files_read: int = 0  # local files opened (a file is counted when its reading starts)
    bytes_read: int = 0  # their sizes on disk (compressed where they are)

    def merge(self, other: dict) -> None:
        """Add the counts of another report (as a dict), e.g. one file's from the data engine."""
        for key in ("documents", "bad_records", "filtered", "files_read", "bytes_read"):
            setattr(self, key, getattr(self, key) + other[key])
        self.examples += other["examples"][: max(0, _MAX_EXAMPLES - len(self.examples))]

    def bad(self, where: str, reason: str, on_error: str) -> None:
        """Count a malformed record and keep it as an example.

        Args:
            where: its location, ``path:line``, ``path#row``, ``path`` or ``hub[config]/split:row``.
            reason: what is wrong with it, e.g. ``malformed JSON (Expecting value)``.
            on_error: ``"skip"`` logs a warning and returns; ``"stop"`` raises.

        Raises:
            SourceError: when ``on_error == "stop"``.
        """
        self.bad_records += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")
        if on_error == "stop":
            raise SourceError(f"{where}: {reason} (on_error is 'stop'; set on_error: skip to skip such records)")
        log.warning("skipping %s: %s", where, reason)


# --------------------------------------------------------------------------------------- reading bytes


def _compression(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return ""


def _open_binary(path: Path, kind: str):
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))
    return open(path, "rb")


def _archive_failure(e: BaseException, kind: str) -> str | None:
    """Why a compressed stream failed (``truncated gzip``, ...), or None when ``e`` is not about the archive."""
    if not kind or not isinstance(e, (EOFError, OSError, zlib.error, pa.ArrowException)):
        return None
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return f"truncated {kind}"
    return f"corrupt {kind} ({e})"


def _read_bytes(path: Path, on_error: str, report: SourceReport) -> bytes | None:
    """The whole (decompressed) file, or None after reporting a truncated/corrupt archive.

    Raises:
        OSError: the file cannot be read for another reason (permissions, I/O): re-raised as is.
        SourceError: a truncated/corrupt archive under ``on_error="stop"``.
    """  # noqa: DOC501 (a re-raise names what the except clause catches)
    kind = _compression(path)
    try:
        with _open_binary(path, kind) as f:
            return f.read()
    except (EOFError, OSError, zlib.error, pa.ArrowException) as e:
        reason = _archive_failure(e, kind)
        if reason is None:
            raise
        report.bad(str(path), reason, on_error)
        return None


def _decode_text(data: bytes, where: str, on_error: str, report: SourceReport) -> str | None:
    """UTF-8 text with the BOM removed and CRLF/CR line ends made LF, or None after reporting non-UTF-8."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        report.bad(where, f"not UTF-8 ({e.reason} at byte {e.start})", on_error)
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _string_field(record: dict, name: str, where: str, on_error: str, report: SourceReport,
                  allow_empty: bool = False) -> str | None:
    """``record[name]`` when it is a (non-empty) string, else None after reporting why not."""
    if name not in record:
        report.bad(where, f"missing field {name!r}", on_error)
        return None
    value = record[name]
    if not isinstance(value, str):
        report.bad(where, f"field {name!r} is {_json_type(value)}, expected a string", on_error)
        return None
    if not allow_empty and not value.strip():
        report.bad(where, f"empty text in field {name!r}", on_error)
        return None
    return value


MAX_RECORD_BYTES = 256 * 2**20  # a JSON line longer than this is reported, not parsed (e.g. a file without newlines)


def _json_lines(path: Path, on_error: str, report: SourceReport) -> Iterator[tuple[str, dict]]:
    """``(path:line, object)`` for each line of a JSON-lines file that holds a JSON object.

    Blank lines are skipped silently. Malformed JSON, non-UTF-8 bytes, a non-object line, a line longer than
    ``MAX_RECORD_BYTES`` and a truncated or corrupt archive are reported; a truncated archive is reported at the
    line that was cut off.

    Raises:
        OSError: the file cannot be read for another reason (permissions, I/O): re-raised as is.
        SourceError: a bad record under ``on_error="stop"``.
    """  # noqa: DOC501 (a re-raise names what the except clause catches)
    kind = _compression(path)
    lineno = 0
    try:
        with _open_binary(path, kind) as stream:
            while raw := stream.readline(MAX_RECORD_BYTES + 1):
                lineno += 1
                where = f"{path}:{lineno}"
                if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):  # skip the rest without holding it
                    while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                    report.bad(where, f"line longer than {MAX_RECORD_BYTES:,} bytes (a damaged file, or raise "
                               "llmft.data.sources.MAX_RECORD_BYTES)", on_error)
                    continue
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    report.bad(where, f"not UTF-8 ({e.reason} at byte {e.start})", on_error)
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    report.bad(where, f"malformed JSON ({e.msg}: column {e.colno})", on_error)
                    continue
                if not isinstance(record, dict):
                    report.bad(where, f"a JSON line must be an object, got {_json_type(record)}", on_error)
                    continue
                yield where, record
    except (EOFError, OSError, zlib.error, pa.ArrowException) as e:
        reason = _archive_failure(e, kind)
        if reason is None:
            raise
        # Complete lines before the damage were yielded; the line being read when the data ended is the bad one.
        report.bad(f"{path}:{lineno + 1}", reason, on_error)


# ------------------------------------------------------------------------------------------ the formats


def _read_text(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    data = _read_bytes(path, on_error, report)
    text = None if data is None else _decode_text(data, str(path), on_error, report)
    if text is None:
        return
    if not text.strip():
        report.bad(str(path), "empty text", on_error)
        return
    yield Document(text=text, where=str(path))


# The record formats: one function per format turns one record (a JSON line, a table row or a hub row) into a
# Document, or reports why it cannot and returns None. The file readers and the hub reader both call it.


@dataclass
class _Rows:
    """What a record -> Document function needs besides the record."""

    spec: SourceSpec
    on_error: str
    report: SourceReport
    subset: str | None = None  # redpajama: the subset the rows' location implies, for records naming none
    no_subset: str = "the file's name and directories name no subset"  # redpajama: why `subset` is None


_RecordFn = Callable[[dict, str, _Rows], "Document | None"]


def _convert(records: Iterator[tuple[str, dict]], convert: _RecordFn, rows: _Rows) -> Iterator[Document]:
    for where, record in records:
        doc = convert(record, where, rows)
        if doc is not None:
            yield doc


def _jsonl_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, rows.spec.text_field, where, rows.on_error, rows.report)
    return None if text is None else Document(text=text, where=where)


def _table_record(record: dict, where: str, rows: _Rows) -> Document | None:
    column = rows.spec.text_field
    text = record.get(column)
    if isinstance(text, str) and text.strip():
        return Document(text=text, where=where)
    if text is None or isinstance(text, str):
        reason = f"{'null' if text is None else 'empty'} text in column {column!r}"
    else:  # a file's column type is checked up front; a hub row's value is not
        reason = f"column {column!r} holds {_json_type(text)}, expected a string"
    rows.report.bad(where, reason, rows.on_error)
    return None


def _merge_meta(meta: dict, original: Any, key: str) -> dict:
    """``meta`` plus the record's own metadata: merged when an object (or a JSON string of one), else kept
    under ``key`` (the RedPajama HF loader stores ``meta`` as a JSON string)."""
    if isinstance(original, str):
        try:
            original = json.loads(original)
        except json.JSONDecodeError:
            pass
    if isinstance(original, dict):
        return {**original, **meta}
    if original is not None:
        return {key: original, **meta}
    return meta


def _redpajama_subset_from_path(path: Path) -> str | None:
    """The subset a RedPajama file belongs to by its place: 1T keeps each subset in a directory of that name,
    the 1T-Sample in files named after it (arxiv_*.jsonl, book_*.jsonl, c4-train.*.jsonl, cc_*.jsonl, ...)."""
    for parent in path.parents:
        if parent.name in REDPAJAMA_SUBSETS:
            return parent.name
    prefixes = {"arxiv": "arxiv", "book": "book", "c4": "c4", "cc_": "common_crawl", "common_crawl": "common_crawl",
                "github": "github", "stackexchange": "stackexchange", "wiki": "wikipedia"}
    for prefix, subset in prefixes.items():
        if path.name.startswith(prefix):
            return subset
    return None


def _keep_subset(name: str, spec: SourceSpec) -> bool:
    return (not spec.subsets or name in spec.subsets) and name not in spec.exclude_subsets


def _redpajama_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    subset = record.get("red_pajama_subset")
    if subset is None:  # absent, or null in a hub row whose dataset has the column for other rows
        subset = rows.subset
    if not isinstance(subset, str):
        rows.report.bad(where, f"no red_pajama_subset field, and {rows.no_subset}", rows.on_error)
        return None
    if not _keep_subset(subset, rows.spec):
        rows.report.filtered += 1
        return None
    return Document(text=text, where=where, meta=_merge_meta({"red_pajama_subset": subset}, record.get("meta"), "meta"))


def _pile_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    meta = record.get("meta")
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        rows.report.bad(where, "no string meta.pile_set_name", rows.on_error)
        return None
    if not _keep_subset(name, rows.spec):
        rows.report.filtered += 1
        return None
    return Document(text=text, where=where, meta=dict(meta))


def _oig_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    # The dialogue stays one document with its "<human>:"/"<bot>:" turns, as OIG publishes it.
    return Document(text=text, where=where, meta=_merge_meta({}, record.get("metadata"), "metadata"))


def _pair_record(record: dict, where: str, rows: _Rows, prompt_field: str, completion_field: str) -> Document | None:
    prompt = _string_field(record, prompt_field, where, rows.on_error, rows.report, allow_empty=True)
    if prompt is None:
        return None
    completion = _string_field(record, completion_field, where, rows.on_error, rows.report)
    return None if completion is None else Document(text=completion, where=where, prompt=prompt)


def _p3_record(record: dict, where: str, rows: _Rows) -> Document | None:
    return _pair_record(record, where, rows, "inputs_pretokenized", "targets_pretokenized")


def _prompt_completion_record(record: dict, where: str, rows: _Rows) -> Document | None:
    return _pair_record(record, where, rows, rows.spec.prompt_field, rows.spec.completion_field)


def _read_json_records(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    """The JSON-lines record formats (jsonl, redpajama, oig, p3, pile, prompt_completion): one record a line."""
    rows = _Rows(spec, on_error, report, subset=_redpajama_subset_from_path(path))
    yield from _convert(_json_lines(path, on_error, report), _RECORDS[spec.format], rows)


def _ni_text(value: Any) -> str | None:
    """An NI string field; outputs are lists in instances (the first is the reference) and strings in examples."""
    if isinstance(value, list) and value:
        value = value[0]
    return value.strip() if isinstance(value, str) and value.strip() else None


def _read_natural_instructions(path: Path, spec: SourceSpec, on_error: str,
                               report: SourceReport) -> Iterator[Document]:
    data = _read_bytes(path, on_error, report)
    text = None if data is None else _decode_text(data, str(path), on_error, report)
    if text is None:
        return
    try:
        task = json.loads(text)
    except json.JSONDecodeError as e:
        report.bad(str(path), f"malformed JSON ({e.msg}: line {e.lineno})", on_error)
        return
    if not isinstance(task, dict) or not isinstance(task.get("Instances"), list):
        report.bad(str(path), "not a Natural Instructions task: no 'Instances' list", on_error)
        return
    definition = task.get("Definition")
    # Older task files hold the definition as a string, newer ones as a list of strings.
    if isinstance(definition, list) and all(isinstance(d, str) for d in definition):
        definition = "\n".join(d.strip() for d in definition)
    if not isinstance(definition, str) or not definition.strip():
        report.bad(str(path), "no 'Definition' string (or list of strings)", on_error)
        return
    shots = []
    for i, example in enumerate(task.get("Positive Examples") or []):
        if len(shots) == spec.ni_positive_examples:
            break
        ex_in = _ni_text(example.get("input")) if isinstance(example, dict) else None
        ex_out = _ni_text(example.get("output")) if isinstance(example, dict) else None
        if ex_in is None or ex_out is None:
            report.bad(f"{path}#Positive Examples[{i}]", "needs a string input and output", on_error)
            continue
        shots.append(f"Input: {ex_in}\nOutput: {ex_out}\n\n")
    head = f"Definition: {definition.strip()}\n\n" + "".join(shots)
    name = path.name.removesuffix(".json")
    for i, instance in enumerate(task["Instances"]):
        where = f"{path}#instances[{i}]"
        inst_in = _ni_text(instance.get("input")) if isinstance(instance, dict) else None
        if inst_in is None:
            report.bad(where, "no string 'input'", on_error)
            continue
        answer = _ni_text(instance.get("output"))
        if answer is None:
            report.bad(where, "no 'output' (a non-empty list of strings)", on_error)
            continue
        # The full NI release gives every instance an id ("task085-..."); trimmed copies may not.
        # ni_head / ni_query let the few-shot transform put many instances of a task after one header
        meta = {"task": name, "id": instance.get("id", f"{name}-{i}"), "ni_head": head,
                "ni_query": f"Input: {inst_in}\nOutput: "}
        yield Document(text=answer, where=where, meta=meta, prompt=f"{head}Input: {inst_in}\nOutput: ")


def _table_batches(path: Path, fmt: str, text_column: str, extra: list[str], on_error: str,
                   report: SourceReport) -> Iterator[pa.RecordBatch]:
    """The record batches of a parquet or Arrow file: ``text_column`` and those of ``extra`` that exist.

    Raises:
        SourceError: ``text_column`` is missing or not a string column.
    """
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
        else:
            source = pa.memory_map(str(path))  # the batches below are views into this map
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid:
                # `datasets` writes the IPC stream format; feather v2 / .arrow files use the file format.
                reader = pa.ipc.open_stream(source)
            schema = reader.schema
    except (pa.ArrowException, OSError) as e:
        report.bad(str(path), f"not a readable {fmt} file ({e})", on_error)
        return
    if text_column not in schema.names:
        raise SourceError(f"{path}: no column {text_column!r} (columns: {', '.join(schema.names)}); set text_field")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(f"{path}: column {text_column!r} is {kind}, expected string")
    columns = [text_column] + [c for c in extra if c in schema.names and c != text_column]
    if fmt == "parquet":
        # Small batches, and only the columns needed: one row can be a whole book.
        yield from pf.iter_batches(batch_size=64, columns=columns)
    elif isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i).select(columns)
    else:
        for batch in reader:
            yield batch.select(columns)


def _table_rows(path: Path, fmt: str, text_column: str, extra: list[str], on_error: str,
                report: SourceReport) -> Iterator[tuple[str, dict]]:
    row = 0
    for batch in _table_batches(path, fmt, text_column, extra, on_error, report):
        for record in batch.to_pylist():
            yield f"{path}#{row}", record
            row += 1


def _read_table(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    rows = _table_rows(path, spec.format, spec.text_field, [], on_error, report)
    yield from _convert(rows, _table_record, _Rows(spec, on_error, report))


_PG19_META = ["short_book_title", "publication_date", "url"]


def _pg19_record(record: dict, where: str, rows: _Rows) -> Document | None:
    """A book in the Hugging Face layout ``{short_book_title, publication_date, url, text}``."""
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    # The HF rows come without the Gutenberg header and footer; a copy that kept them is stripped like a .txt.
    text = strip_gutenberg(text)
    if not text:
        rows.report.bad(where, "no text between the Project Gutenberg header and footer", rows.on_error)
        return None
    meta = {k: record[k] for k in _PG19_META if record.get(k) is not None}
    book_id = re.search(r"(\d+)/?$", str(meta.get("url", "")))
    if book_id:
        meta["book_id"] = book_id.group(1)
    return Document(text=text, where=where, meta=meta)


def _read_pg19(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        for doc in _read_text(path, spec, on_error, report):
            book_id = path.name[: -len(next(s for s in TEXT_SUFFIXES if name.endswith(s)))]
            text = strip_gutenberg(doc.text)
            if not text:
                report.bad(doc.where, "no text between the Project Gutenberg header and footer", on_error)
                continue
            yield Document(text=text, where=doc.where, meta={"book_id": book_id})
        return
    # The Hugging Face layout: one row per book.
    if name.endswith(".parquet"):
        records = _table_rows(path, "parquet", "text", _PG19_META, on_error, report)
    else:
        records = _json_lines(path, on_error, report)
    yield from _convert(records, _pg19_record, _Rows(spec, on_error, report))


def _read_csv(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    # One long-context document can exceed csv's default 128 KiB field limit; the limit is process-wide.
    csv.field_size_limit(2**31 - 1)
    kind = _compression(path)
    end = 0  # last line of the previous record
    try:
        with _open_binary(path, kind) as raw:
            # surrogateescape defers bad bytes to the record they are in instead of failing the whole file.
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
            reader = csv.reader(text)
            try:
                header = next(reader)
            except StopIteration:
                report.bad(str(path), "empty csv file (no header)", on_error)
                return
            end = reader.line_num
            needed = template_fields(spec.template) if spec.template is not None else [spec.text_field]
            missing = [c for c in needed if c not in header]
            if missing:
                raise SourceError(f"{path}:1: the header has no column {missing[0]!r} (columns: {', '.join(header)})")
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    report.bad(f"{path}:{end + 1}", f"malformed csv ({e})", on_error)
                    end = reader.line_num
                    continue
                where, end = f"{path}:{end + 1}", reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    report.bad(where, f"{len(row)} fields, the header has {len(header)}", on_error)
                    continue
                if any(re.search("[\udc80-\udcff]", cell) for cell in row):
                    report.bad(where, "not UTF-8", on_error)
                    continue
                record = dict(zip(header, row))
                try:
                    text = spec.template.format(**record) if spec.template is not None else record[spec.text_field]
                except (ValueError, IndexError, AttributeError) as e:  # e.g. a format spec a cell cannot take
                    report.bad(where, f"template failed ({e})", on_error)
                    continue
                if not text.strip():
                    report.bad(where, "empty text", on_error)
                    continue
                yield Document(text=text, where=where)
    except (EOFError, OSError, zlib.error, pa.ArrowException) as e:
        reason = _archive_failure(e, kind)
        if reason is None:
            raise
        report.bad(f"{path}:{end + 1}", reason, on_error)


def _read_sqlite(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    # mode=ro: reading a training source must never create or change the database.
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        try:
            cursor = con.execute(spec.query)
        except sqlite3.OperationalError as e:
            raise SourceError(f"{path}: query failed: {e} (query: {spec.query})") from None
        except sqlite3.DatabaseError as e:
            report.bad(str(path), f"not a readable SQLite database ({e})", on_error)
            return
        names = [d[0] for d in cursor.description]
        if "text" not in names:
            raise SourceError(f"{path}: the query returns no column named text (columns: {', '.join(names)}); "
                              "alias one, e.g. SELECT body AS text FROM ...")
        for row, values in enumerate(cursor):
            where = f"{path}#{row}"
            record = dict(zip(names, values))
            text = record.pop("text")
            if not isinstance(text, str) or not text.strip():
                reason = "NULL text" if text is None else ("empty text" if isinstance(text, str)
                                                           else f"text is {type(text).__name__}, expected a string")
                report.bad(where, reason, on_error)
                continue
            yield Document(text=text, where=where, meta=record)
    finally:
        con.close()


# -------------------------------------------------------------------------------------------------- html

# Not visible, or page furniture repeated on every page of a site: dropped with everything inside them.
_HTML_DROP = {"script", "style", "nav", "header", "footer", "aside", "form", "head", "noscript", "template",
              "svg", "iframe", "object", "button", "select"}
# Elements that start a new paragraph.
_HTML_BLOCKS = {"address", "article", "blockquote", "dd", "details", "div", "dl", "dt", "figcaption", "figure",
                "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "main", "ol", "p", "pre", "section", "summary",
                "table", "tr", "ul", "caption", "body"}


class _VisibleText(HTMLParser):
    """Collects visible text as paragraphs of lines; whitespace inside a line is collapsed later."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[list[list[str]]] = [[[]]]
        self._drop = 0  # depth inside dropped elements
        self._pre = 0

    def _paragraph(self) -> None:
        if any(any(s.strip() for s in line) for line in self.paragraphs[-1]):
            self.paragraphs.append([[]])

    def _line(self) -> None:
        self.paragraphs[-1].append([])

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _HTML_DROP:
            self._drop += 1
        elif self._drop:
            return
        elif tag in _HTML_BLOCKS:
            self._paragraph()
            if tag == "pre":
                self._pre += 1
        elif tag == "br":
            self._line()
        elif tag in ("td", "th"):
            self.paragraphs[-1][-1].append(" ")  # cells of a row stay on one line, apart

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_DROP:
            self._drop = max(0, self._drop - 1)
        elif not self._drop and tag in _HTML_BLOCKS:
            if tag == "pre" and self._pre:
                self._pre -= 1
            self._paragraph()

    def handle_data(self, data: str) -> None:
        if self._drop:
            return
        if self._pre:
            first, *rest = data.split("\n")
            self.paragraphs[-1][-1].append(first)
            for piece in rest:
                self._line()
                self.paragraphs[-1][-1].append(piece)
        else:
            self.paragraphs[-1][-1].append(data)

    def text(self) -> str:
        out = []
        for paragraph in self.paragraphs:
            lines = [" ".join("".join(line).split()) for line in paragraph]
            lines = [line for line in lines if line]
            if lines:
                out.append("\n".join(lines))
        return "\n\n".join(out)


def html_to_text(html: str) -> str:
    """The visible text of an HTML page: one blank line between paragraphs, whitespace collapsed.

    Scripts, styles, the head and page furniture (nav, header, footer, aside, forms) are dropped with their
    contents; ``<br>`` and newlines inside ``<pre>`` become line breaks.

    Args:
        html: the page source.

    Returns:
        The text, stripped ("" when nothing is visible).
    """
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    return parser.text()


def _decode_html(data: bytes) -> str:
    """Decode a page: UTF-8, else the charset its <meta> declares (old pages are often windows-1252).

    Raises:
        UnicodeDecodeError: neither works.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as first:
        declared = re.search(rb"""<meta[^>]*charset\s*=\s*["']?([\w.:-]+)""", data[:4096], re.I)
        if declared:
            try:
                return data.decode(declared.group(1).decode("ascii"))
            except (LookupError, UnicodeDecodeError):
                pass
        raise first


def _read_html(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    data = _read_bytes(path, on_error, report)
    if data is None:
        return
    try:
        page = _decode_html(data)
    except UnicodeDecodeError as e:
        report.bad(str(path), f"not UTF-8 and no usable <meta charset> ({e.reason} at byte {e.start})", on_error)
        return
    text = html_to_text(page)
    if not text:
        report.bad(str(path), "no visible text", on_error)
        return
    yield Document(text=text, where=str(path))


# ----------------------------------------------------------------------------------------------- gutenberg

_PG_START = re.compile(r"^[ \t]*\*+[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*\n?", re.I | re.M)
_PG_END = re.compile(r"^[ \t]*\*+[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*", re.I | re.M)
# Old e-texts end their header with the "small print" instead of a START line.
_PG_OLD_START = re.compile(r"^[^\n]*\*END\*THE SMALL PRINT[^\n]*\n?", re.I | re.M)
# The line Gutenberg puts just before the END marker, and the end of the text when there is no marker.
_PG_END_LINE = re.compile(r"^[ \t]*End of (?:the |this )?Project Gutenberg[^\n]*", re.I | re.M)
_PG_CREDITS = re.compile(r"\A\s*(?:Produced by|E-?text prepared by|This e-?text was produced by|Transcribed by)"
                         r".*?(?:\r?\n[ \t]*\r?\n|\Z)", re.I | re.S)


def strip_gutenberg(text: str) -> str:
    """Remove the BOM and the Project Gutenberg header and footer of an e-text.

    The body is the text between the ``*** START OF ... PROJECT GUTENBERG ...`` and ``*** END OF ...`` lines
    (spacing and THE/THIS variants tolerated, e.g. ``***START OF THE PROJECT GUTENBERG EBOOK``; old e-texts'
    ``*END*THE SMALL PRINT`` line also counts as a start). With markers, a leading "Produced by ..."
    credits paragraph and a closing "End of the Project Gutenberg EBook of ..." line are dropped too.

    Args:
        text: a whole e-text.

    Returns:
        The body, stripped. Text without any marker is returned stripped and otherwise unchanged.
    """
    text = text.lstrip("\ufeff")
    start = _PG_START.search(text) or _PG_OLD_START.search(text)
    end = _PG_END.search(text, start.end() if start else 0)
    if end is None and start is not None:
        end = _PG_END_LINE.search(text, start.end())
    if start is None and end is None:
        return text.strip()
    body = text[start.end() if start else 0 : end.start() if end else len(text)]
    trailer = list(_PG_END_LINE.finditer(body))
    if trailer and not body[trailer[-1].end():].strip():
        body = body[: trailer[-1].start()]
    return _PG_CREDITS.sub("", body, count=1).strip()


# --------------------------------------------------------------------------------------------------- hub

_RECORDS: dict[str, _RecordFn] = {
    "jsonl": _jsonl_record,
    "parquet": _table_record,
    "arrow": _table_record,
    "redpajama": _redpajama_record,
    "oig": _oig_record,
    "p3": _p3_record,
    "pile": _pile_record,
    "pg19": _pg19_record,
    "prompt_completion": _prompt_completion_record,
}


def _hub_name(spec: SourceSpec) -> str:
    """``hub[config]/split``: the prefix of a hub row's location."""
    config = f"[{spec.hub_config}]" if spec.hub_config else ""
    return f"{spec.hub}{config}/{spec.split}"


def _needed_fields(spec: SourceSpec) -> tuple[list[str], str]:
    """The fields every row of a hub source must have, and the setting that names them."""
    if spec.format in TEXT_FIELD_FORMATS:
        return [spec.text_field], "set text_field"
    if spec.format == "prompt_completion":
        return [spec.prompt_field, spec.completion_field], "set prompt_field and completion_field"
    if spec.format == "p3":
        return ["inputs_pretokenized", "targets_pretokenized"], f"is it in the {spec.format} layout?"
    return ["text"], f"is it in the {spec.format} layout?"


def _one_line(e: BaseException) -> str:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _read_hub(spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    """The rows of a ``datasets`` dataset, each through its format's record function.

    Raises:
        SourceError: the dataset cannot be loaded, stops while streaming, or lacks a field the format needs.
    """
    name = _hub_name(spec)
    if spec.revision is None and hub_local_root(spec.hub) is None:
        log.warning("hub source %s is not pinned: set revision: <commit sha> to make builds reproducible (the "
                    "build cache knows it by its spec only, not by its contents)", spec.hub)
    import datasets  # only hub sources need it, and it is slow to import

    if hub_local_root(spec.hub) is None:
        load_fix = ("check the id, hub_config, split and data_files (and your access, for a gated dataset); "
                    "offline, download it once while online and set HF_HUB_OFFLINE=1 to read it from the cache, "
                    "or download the files and use path:")
        read_fix = "retry a network error; or download it once and set HF_HUB_OFFLINE=1, or use path:"
    else:
        load_fix = read_fix = (f"check data_files; or read the files with path: and format {spec.format}, which "
                               "reports and skips malformed records instead of stopping")
    try:
        # trust_remote_code is never passed: no dataset script runs (datasets 5 removed them).
        dataset = datasets.load_dataset(spec.hub, spec.hub_config, split=spec.split, revision=spec.revision,
                                        data_files=spec.data_files, streaming=spec.streaming)
    except Exception as e:  # not found, offline, gated, bad config or split, missing data_files: one message
        raise SourceError(f"{name}: could not load the dataset ({_one_line(e)}); {load_fix}") from e
    subsets = {_redpajama_subset_from_path(Path(entry)) for entry in spec.data_files or []}
    rows = _Rows(spec, on_error, report, subset=subsets.pop() if len(subsets) == 1 else None,
                 no_subset="data_files name no subset (read one subset's files, e.g. data_files: [book_sample.jsonl])")
    convert = _RECORDS[spec.format]
    records = iter(dataset)
    for i in itertools.count():
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as e:  # a network error or a file the builder cannot parse: the stream cannot go on
            raise SourceError(f"{name}:{i}: reading the dataset failed ({_one_line(e)}); {read_fix}") from e
        if i == 0:
            # A row has every column of the dataset, so a field missing here is missing from every row.
            needed, hint = _needed_fields(spec)
            missing = [f for f in needed if f not in record]
            if missing:
                raise SourceError(f"{name}: the rows have no field {missing[0]!r} (fields: {', '.join(record)}); "
                                  f"{hint}")
        doc = convert(record, f"{name}:{i}", rows)
        if doc is not None:
            yield doc


# ------------------------------------------------------------------------------------------------- entry

_READERS = {
    "text": _read_text,
    "jsonl": _read_json_records,
    "parquet": _read_table,
    "arrow": _read_table,
    "redpajama": _read_json_records,
    "oig": _read_json_records,
    "natural_instructions": _read_natural_instructions,
    "p3": _read_json_records,
    "pile": _read_json_records,
    "pg19": _read_pg19,
    "csv": _read_csv,
    "sqlite": _read_sqlite,
    "html": _read_html,
    "prompt_completion": _read_json_records,
}


def _read_files(files: list[Path], spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    """The documents of ``files`` in order, counting each file's size into ``report`` as its reading starts.

    Raises:
        SourceError: as the format's reader, or a file that no longer exists (removed since it was listed).
    """
    reader = _READERS[spec.format]
    for path in files:
        try:
            size = path.stat().st_size
            report.files_read += 1
            report.bytes_read += size
            yield from reader(path, spec, on_error, report)
        except FileNotFoundError:
            raise SourceError(f"{path}: the file was removed while the build was reading the source (it was listed "
                              "when the source was opened); restore it or take it out of the source, and build "
                              "again") from None


def read_source(spec: SourceSpec, on_error: str = "skip", report: SourceReport | None = None,
                files: list[Path] | None = None) -> Iterator[Document]:
    """Yield the documents of one source, file by file in :func:`list_files` order, or row by row from a hub.

    Args:
        spec: the source.
        on_error: ``"skip"`` counts, logs and skips a malformed record; ``"stop"`` raises on the first one.
        report: counters to update (documents, bad records, filtered, files and bytes read); a fresh one when None.
        files: read these of the source's files, in this order, instead of :func:`list_files` (a local source; a
            hub source ignores it).

    Returns:
        An iterator of documents; nothing is read before iteration starts.

    Raises:
        SourceError: a malformed record under ``on_error="stop"``, or a source that does not fit its spec
            (missing column, template column not in the header, a query sqlite rejects), a file removed while
            the source is read, or a hub dataset that cannot be loaded or breaks off while streaming.
        ValueError: ``on_error`` is neither "skip" nor "stop".
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    report = report if report is not None else SourceReport()
    if spec.hub is not None:
        docs = _read_hub(spec, on_error, report)
    else:
        docs = _read_files(list_files(spec) if files is None else files, spec, on_error, report)
    for doc in docs:
        report.documents += 1
        yield doc
