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
oig                   OIG jsonl ``{"text": "<human>: ...\n<bot>: ...", "metadata": {...}}``
natural_instructions  Natural Instructions v2 ``task*.json``: one prompt/answer document per instance
p3                    P3 jsonl ``{"inputs_pretokenized", "targets_pretokenized"}``
pile                  The Pile jsonl ``{"text", "meta": {"pile_set_name"}}`` (usually .jsonl.zst)
pg19                  a directory of Gutenberg ``<id>.txt`` books, or the HF rows (jsonl/parquet)
csv                   a column, or a ``str.format`` template over columns
sqlite                the rows of a SELECT (column ``text``; other columns go to ``meta``)
html                  the visible text of .html/.htm pages
prompt_completion     jsonl pairs: the prompt is conditioned on, only the completion is trained on
chat                  conversations: OpenAI ``{"messages": [{"role", "content"}]}`` or ShareGPT
                      ``{"conversations": [{"from", "value"}]}``, rendered with a chat template when
                      tokenized; trained on the assistant turns (all, or the last: ``train_on``)
long_data_collections Together's Long-Data-Collections fine-tune jsonl: each ``text`` split at its answer
                      cue; only the answer is trained (llmft/data/sources/applications.py)
booksum               BookSum chapter rows ``{"chapter", "summary_text"}``: trained on the summary only
lost_in_the_middle    the "Lost in the Middle" MDQA files: question + passages as context, the answer trained
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

from collections.abc import Iterator
from pathlib import Path

from llmft.config.sources import SourceSpec, list_files
from llmft.data.sources.base import DataError, Document, SourceError, SourceReport
from llmft.data.sources.files import read_json_lines
from llmft.data.sources.hub import _read_hub
from llmft.data.sources.records import _RECORDS as _RECORDS  # every hub format's record function (tested)
from llmft.data.sources.records import _read_json_records, _read_natural_instructions
from llmft.data.sources.tables import _read_csv, _read_pg19, _read_sqlite, _read_table
from llmft.data.sources.text import _read_html, _read_text, html_to_text, strip_gutenberg

__all__ = ["DataError", "Document", "SourceError", "SourceReport", "html_to_text", "read_json_lines", "read_source",
           "strip_gutenberg"]


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
    "chat": _read_json_records,
    "long_data_collections": _read_json_records,
    "booksum": _read_json_records,
    "lost_in_the_middle": _read_json_records,
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
