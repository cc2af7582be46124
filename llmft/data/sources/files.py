"""Bytes and lines of local files: compression sniffed by magic bytes (gzip, zstd), UTF-8 decoding, and JSON lines with
every malformed line reported at ``path:line``."""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmft.data.sources.base import SourceReport


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
                               "llmft.data.sources.files.MAX_RECORD_BYTES)", on_error)
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


def read_json_lines(path: Path) -> list[dict]:
    """Every JSON object of a JSON-lines file (plain, gzip or zstd, sniffed), for the small files evaluations read
    whole (HELM scenarios, multi-document QA, summaries); blank lines skipped.

    Raises:
        SourceError: a malformed line, non-UTF-8 bytes, a line that is not an object, or a truncated archive, at
            ``path:line``.
        OSError: the file cannot be read.
    """
    return [record for _, record in _json_lines(Path(path), "stop", SourceReport())]
