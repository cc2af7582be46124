"""A source's documents, its errors and its report: what every reader yields and counts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


_MAX_EXAMPLES = 20


@dataclass
class Document:
    """One training document and where it came from."""

    text: str  # the text trained on (for prompt/completion pairs: the completion)
    where: str  # "path:line" (1-based), "path" for whole files, "path#row" (0-based) for table rows,
    # "hub[config]/split:row" (0-based) for hub rows
    meta: dict = field(default_factory=dict)  # e.g. {"red_pajama_subset": "book"}, {"task": "task085"}
    prompt: str = ""  # conditioned on but not trained on (loss masked); "" for plain text
    # a conversation (format chat): [{"role", "content"}], rendered with a chat template when tokenized (``text``
    # then holds the contents, for filters, deduplication and decontamination), and how to render and train it
    messages: list | None = None
    chat: dict | None = None  # {"template": name or None, "train_on": "all" | "last"}


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
