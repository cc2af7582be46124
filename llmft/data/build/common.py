"""What the build's stages share: its tunables (read as ``common.NAME`` where used, so a test or a bench can change one
in one place) and its progress display."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from tqdm import tqdm

log = logging.getLogger(__name__)


FORMAT_VERSION = 7  # bump when the on-disk layout or the build algorithm changes


PACK_WINDOW_TOKENS = 4 * 2**20  # rows are packed and written a window at a time: ~120 MB of rows in memory


PROGRESS_LOG_SECONDS = 30  # without a terminal, progress is logged this often


TOKENIZE_BATCH = 256  # documents per tokenizing job, or fewer when they reach:


TOKENIZE_BATCH_CHARS = 1 << 20  # (a batch of 256 books would be ~100 MB of text, times the jobs in flight)


FILTER_BATCH = 256  # documents the filters score at a time while reading (or fewer, up to TOKENIZE_BATCH_CHARS)


ESTIMATE_CHARS = 1 << 20  # a deduplicated source's characters per token are measured on its first this many (or


# on 2 characters per token of its need, if fewer)
SCAN_MARGIN = 1.15  # a deduplicated, sampled source is scanned to its need plus 15% (duplicates, dropped documents)


class _LogLines:
    """A file for tqdm that logs each progress line (for a build whose output goes to a log, not a terminal)."""

    def write(self, text: str) -> None:
        if text := text.strip("\r\n "):
            log.info("%s", text)

    def flush(self) -> None:
        pass


def _progress(desc: str, total: int | None = None, unit: str = "tok", iterable: Iterable | None = None) -> tqdm:
    """Progress of a build stage (count, rate, ETA when ``total`` is known): a bar on a terminal; otherwise the same
    line logged every ``PROGRESS_LOG_SECONDS``, once a stage has run that long."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, leave=False)
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, leave=False, file=_LogLines(),
                mininterval=PROGRESS_LOG_SECONDS, delay=PROGRESS_LOG_SECONDS)


class _Checkpoint:
    """A marker between tokenizing jobs: it comes out of the tokenizer pool after every job before it."""


CHECKPOINT = _Checkpoint()
