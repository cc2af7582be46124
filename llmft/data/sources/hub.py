"""Hub sources: a ``datasets`` dataset (hub id, or a packaged builder over local ``data_files``) streamed row by row
through its format's record function."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

from llmft.config.sources import TEXT_FIELD_FORMATS, SourceSpec, hub_local_root
from llmft.data.sources.base import Document, SourceError, SourceReport
from llmft.data.sources.records import _RECORDS, _redpajama_subset_from_path, _Rows

log = logging.getLogger(__name__)


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
