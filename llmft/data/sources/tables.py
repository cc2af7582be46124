"""Tabular sources: parquet, Arrow IPC and ``save_to_disk`` directories read in record batches, PG-19 (books or the HF
rows), CSV (a column or a template over columns) and SQLite queries."""

from __future__ import annotations

import csv
import io
import re
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llmft.config.sources import TEXT_SUFFIXES, SourceSpec, template_fields
from llmft.data.sources.base import Document, SourceError, SourceReport
from llmft.data.sources.files import _archive_failure, _compression, _json_lines, _open_binary
from llmft.data.sources.records import _PG19_META, _convert, _pg19_record, _Rows, _table_record
from llmft.data.sources.text import _read_text, strip_gutenberg


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
