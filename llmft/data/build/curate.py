"""Deduplication over the whole mix without holding texts (a scan computes features, the duplicates are decided over all
of them, a second reading yields the kept documents), and ``curate_recipe`` / ``dedup_recipe``: a mix read,
deduplicated, filtered and reweighted without tokenizing or packing."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase  # (AutoTokenizer imports torch: where it is used)

from llmft.config.data import Dedup, MixRecipe
from llmft.data.build import common
from llmft.data.build.common import _progress
from llmft.data.build.reading import (
    _clean,
    _decontaminator,
    _engine_scan,
    _Reading,
    _ScratchDecontamReport,
    _start_reading,
    _text,
)
from llmft.data.build.tokenizing import _encode, _Tokenize, _tokenizer_pool
from llmft.data.decontam import Decontaminator, DecontamReport
from llmft.data.dedup import DedupIndex, report_markdown
from llmft.data.engine import Prepared
from llmft.data.filters import apply_filters, release_scoring_models
from llmft.data.sources import DataError, Document, SourceError, SourceReport, read_source

log = logging.getLogger(__name__)


KEPT, REMOVED = 1, 2  # a scanned document's status after deduplication (0: never added to the index)


@dataclass
class _Scan:
    """Deduplication's first reading of one source."""

    docs: Iterator[tuple[int, Document]]  # the cleaned and filtered documents, read on where the scan stopped
    files: dict[str, tuple[int, int]]  # (size, mtime) of each file read, to check that the second reading is the same
    raw: array = field(default_factory=lambda: array("q"))  # (added,) reading position of each document added
    index: array = field(default_factory=lambda: array("q"))  # (added,) its index in the DedupIndex
    chars: int = 0
    exhausted: bool = False
    status: np.ndarray | None = None  # (last added position + 1,) uint8: 0, KEPT or REMOVED
    rest: Iterator | None = None  # the second reading's kept documents, after those handed out
    removed: list[str] = field(default_factory=list)  # removed documents met by the second reading, to count
    tokens_removed: int = 0
    dropped_min_tokens: int = 0  # dropped in the scan by the source's length filter (a plain source)
    dropped_max_tokens: int = 0


class _Dedup:
    """Deduplication in two readings of each source, holding per-document features but never the texts.

    :meth:`scan` reads a source (decontaminated and filtered), computes every document's dedup features (in the
    ``num_proc`` workers of ``work``) and adds them to a :class:`DedupIndex`: signatures and scalars in memory,
    shingles and excerpts spilled to ``workdir``. :meth:`decide` groups the duplicates among all documents scanned
    so far. :meth:`reread` reads the source again and yields the documents kept (span-mode decontamination applied
    again, counted nowhere); :meth:`drain` reads on through the scanned part, tokenizing only the removed documents,
    to count their tokens for the report.

    With a token need per source (sampling), a scan stops at a character budget: the need (plus the held-out tail)
    at the characters per token measured on the source's first ``ESTIMATE_CHARS`` characters (or 2 per token of
    the need, if fewer), plus ``SCAN_MARGIN``.
    If the documents kept then hold fewer training tokens than the need, :meth:`top_up` scans further and decides
    again (every decision is taken over all documents scanned, so the result depends only on the data).

    Raises:
        OSError: the spill files cannot be written.
    """

    def __init__(self, mix: MixRecipe, readings: dict[str, _Reading], decon: Decontaminator | None,
                 decon_report: DecontamReport, workdir: Path, work: Callable[[Iterable], Iterator],
                 tokenizer: PreTrainedTokenizerBase | None, engine=None, engine_sources: Sequence[int] = ()):
        self.mix, self.readings, self.decon, self.work, self.tokenizer = mix, readings, decon, work, tokenizer
        self.engine, self.engine_sources = engine, set(engine_sources)
        self.index = DedupIndex(mix.dedup, workdir)
        self.scans = []
        for k, src in enumerate(mix.sources):
            reading = readings[src.name]
            if k in self.engine_sources:  # the features come prepared; the second reading is of the prepared files
                self.scans.append(_Scan(_engine_scan(engine, k, reading, decon_report), {}))
                continue
            self.scans.append(_Scan(_clean(src, mix, decon, decon_report, reading),
                                    {str(f): _file_state(f) for f in reading.files}))
        self.report: dict | None = None

    def __enter__(self) -> _Dedup:
        return self

    def __exit__(self, *exc) -> None:
        self.index.remove()

    def scan(self, k: int, need: int | None = None, budget: float | None = None) -> None:
        """Scan source ``k`` on: to its end, or with ``need`` (training tokens) to the first budget, or to ``budget``
        characters read in all.

        Raises:
            DataError: a malformed record under on_error: stop, or a custom embedder that fails.
        """
        if k in self.engine_sources:
            return self._scan_prepared(k, need, budget)
        sc, src = self.scans[k], self.mix.sources[k]
        vf = self.mix.validation_fraction
        target = budget if budget is not None else math.inf
        sample: list[str] | None = [] if need is not None and budget is None else None  # texts for the estimate
        pending: deque[list[tuple[int, str, str]]] = deque()  # (position, text, where) of the batches in flight
        custom = self.mix.dedup.embedder != "hashed" and "clusters" in self.mix.dedup.methods
        lo, hi = src.filters.min_tokens, src.filters.max_tokens
        # a plain source's length filter runs in the scan: a document it drops costs no signature
        length_filter = src.transform == "none" and bool(lo or hi) and self.tokenizer is not None
        progress = _progress(f"scan {src.name} for dedup", None if math.isinf(target) else int(target), unit="char")

        def jobs():
            nonlocal sample, target
            batch, docs, size = [], [], 0
            while sc.chars < target:
                item = next(sc.docs, None)
                if item is None:
                    sc.exhausted = True
                    break
                raw, doc = item
                text = _text(doc)
                batch.append((raw, text, doc.where))
                docs.append(doc)
                size += len(text)
                sc.chars += len(text)
                if sample is not None:
                    sample.append(text)
                    # the budget: the need at the measured chars/token
                    if sc.chars >= min(common.ESTIMATE_CHARS, 2 * need):
                        tokens = sum(len(ids) + 2 for ids in _encode(self.tokenizer, sample))  # + BOS, EOS
                        target = need / (1 - vf) * sc.chars / max(1, tokens) * common.SCAN_MARGIN
                        progress.total, sample = int(target), None
                if len(batch) == common.TOKENIZE_BATCH or size >= common.TOKENIZE_BATCH_CHARS:
                    pending.append(batch)
                    yield ("dedup+tokens", docs) if length_filter else ("dedup", [t for _, t, _ in batch])
                    batch, docs, size = [], [], 0
            if batch:
                pending.append(batch)
                yield ("dedup+tokens", docs) if length_filter else ("dedup", [t for _, t, _ in batch])

        try:
            for feats in self.work(jobs()):
                batch = pending.popleft()
                if length_filter:
                    feats, lengths = feats
                    short = lengths < lo if lo else np.zeros(len(lengths), bool)
                    long = ~short & (lengths > hi) if hi else np.zeros(len(lengths), bool)
                    sc.dropped_min_tokens += int(short.sum())
                    sc.dropped_max_tokens += int(long.sum())
                    feats = feats.select(~(short | long))
                    batch = [b for b, drop in zip(batch, short | long) if not drop]
                first = len(self.index)
                self.index.add(feats, src.name, [w for _, _, w in batch], [t for _, t, _ in batch] if custom else None)
                sc.raw.extend(r for r, _, _ in batch)
                sc.index.extend(range(first, first + len(batch)))
                progress.update(sum(len(t) for _, t, _ in batch))
                progress.set_postfix_str(f"{len(sc.raw):,} docs", refresh=False)
        except SourceError as e:
            raise DataError(str(e)) from None
        finally:
            progress.close()

    def _scan_prepared(self, k: int, need: int | None, budget: float | None) -> None:
        """:meth:`scan` over the engine's prepared documents: the same steps on their records and features (the
        estimate's tokens are each document's tokens + 2, as the scan counts them)."""
        sc, src = self.scans[k], self.mix.sources[k]
        target = budget if budget is not None else math.inf
        sample = 0 if need is not None and budget is None else None  # tokens of the estimate's documents
        lo, hi = src.filters.min_tokens, src.filters.max_tokens
        length_filter = src.transform == "none" and bool(lo or hi)
        chunk, picked = None, []  # the features of the documents being read, and (index in it, position, where)

        def add() -> None:
            if not picked:
                return
            keep = np.zeros(len(chunk.n_words), bool)
            keep[[i for i, _, _ in picked]] = True
            first = len(self.index)
            self.index.add(chunk.select(keep), src.name, [w for _, _, w in picked])
            sc.raw.extend(r for _, r, _ in picked)
            sc.index.extend(range(first, first + len(picked)))
            picked.clear()

        with _progress(f"scan {src.name} for dedup (prepared)", None, unit="doc") as progress:
            while sc.chars < target:
                record = next(sc.docs, None)
                if record is None:
                    sc.exhausted = True
                    break
                raw, chars, plain, n_train, feats, i, where = record
                sc.chars += chars
                if sample is not None:
                    sample += plain + 2
                    if sc.chars >= min(common.ESTIMATE_CHARS, 2 * need):
                        target = (need / (1 - self.mix.validation_fraction) * sc.chars / max(1, sample)
                                  * common.SCAN_MARGIN)
                        sample = None
                if length_filter and lo and n_train < lo:
                    sc.dropped_min_tokens += 1
                    continue
                if length_filter and hi and n_train > hi:
                    sc.dropped_max_tokens += 1
                    continue
                if feats is not chunk:
                    add()
                    chunk = feats
                picked.append((i, raw, where))
                progress.update()
            add()

    def decide(self) -> list[int]:
        """Group the duplicates among every document scanned; returns the sources whose kept documents changed.

        Raises:
            DataError: a custom embedder fails.
        """
        result = self.index.finish(recall=False)  # recall is measured once, on the last decision (final_report)
        self.report = result.report
        changed = []
        for k, (sc, src) in enumerate(zip(self.scans, self.mix.sources)):
            raw, idx = np.array(sc.raw, dtype=np.int64), np.array(sc.index, dtype=np.int64)
            status = np.zeros(raw[-1] + 1 if len(raw) else 0, dtype=np.uint8)
            status[raw] = np.where(result.keep[idx], KEPT, REMOVED)
            if sc.status is None or not np.array_equal(status, sc.status):
                changed.append(k)
            sc.status = status
            self.readings[src.name].stats["deduplicated"] = int((status == REMOVED).sum())
        return changed

    def top_up(self, needs: list[int | None], train_tokens: list[int]) -> list[int]:
        """Scan on every source whose kept documents hold fewer than its ``needs`` training tokens and that has more to
        read, at the characters per kept training token measured so far (plus SCAN_MARGIN), and decide again.

        Returns:
            The sources whose kept documents changed (to tokenize again); [] when none is short or can read more.
        """
        short = [k for k, (need, got) in enumerate(zip(needs, train_tokens))
                 if need is not None and got < need and not self.scans[k].exhausted]
        for k in short:
            sc = self.scans[k]
            per_token = sc.chars / train_tokens[k] if train_tokens[k] else 2 * sc.chars / max(1, needs[k])
            log.info("data: %s: %s of %s training tokens kept after dedup: reading on", self.mix.sources[k].name,
                     f"{train_tokens[k]:,}", f"{needs[k]:,}")
            # at least SCAN_MARGIN more than so far: each reading on tokenizes the source again
            self.scan(k, budget=sc.chars + max((needs[k] - train_tokens[k]) * per_token * common.SCAN_MARGIN,
                                               (common.SCAN_MARGIN - 1) * sc.chars))
        return self.decide() if short else []

    def reread(self, k: int) -> Iterator[Document]:
        """The documents of source ``k`` that dedup kept, read again (in the scan's order).

        Raises:
            DataError: a file of the source changed since the scan.
        """
        if k in self.engine_sources:
            return self._reread_prepared(k)
        sc, src, reading = self.scans[k], self.mix.sources[k], self.readings[self.mix.sources[k].name]
        for f, state in sc.files.items():
            if _file_state(Path(f)) != state:
                raise DataError(f"{f}: the file changed while the build was reading it (between dedup's two "
                                "readings); build again once the files stay as they are")
        sc.tokens_removed = 0
        span = self.decon is not None and self.mix.decontaminate.mode == "span"
        scratch = _ScratchDecontamReport()

        def kept() -> Iterator[Document]:  # the scanned part's kept documents; the removed ones counted on the way
            for raw, doc in enumerate(read_source(src.source, self.mix.on_error, SourceReport(), reading.files)):
                if raw >= len(sc.status):
                    return
                if sc.status[raw] == KEPT:
                    yield doc
                elif sc.status[raw] == REMOVED:
                    self._count_removed(sc, _text(doc))

        def docs() -> Iterator[Document]:  # closing it leaves sc.rest open, for drain
            for doc in sc.rest:
                if span:  # the cut the scan made, made again
                    doc.text = self.decon.clean(doc.text, "span", src.name, doc.where, scratch)
                yield doc

        sc.rest = kept()
        return docs()

    def _reread_prepared(self, k: int) -> Iterator[Prepared]:
        """:meth:`reread` of the engine's prepared files: their kept documents, the removed ones' tokens counted."""
        sc, reading = self.scans[k], self.readings[self.mix.sources[k].name]
        sc.tokens_removed = 0

        def kept() -> Iterator[Prepared]:
            offset = 0
            for j in range(len(reading.files)):
                if offset >= len(sc.status):
                    return
                out = self.engine.output(k, j)
                for i, doc in enumerate(out.documents(remove=False)):
                    raw = offset + int(out.raw[i])
                    if raw >= len(sc.status):
                        return
                    if sc.status[raw] == KEPT:
                        yield doc
                    elif sc.status[raw] == REMOVED:
                        sc.tokens_removed += int(out.plain[i])
                offset += out.report["source"]["documents"]

        sc.rest = kept()
        return (doc for doc in sc.rest)  # closing it leaves sc.rest open, for drain

    def drain(self, k: int) -> None:
        """Read on through the scanned part of source ``k`` after :meth:`reread` stopped, counting the tokens of the
        removed documents into the report."""
        sc = self.scans[k]
        for _ in sc.rest:  # the kept documents left are skipped; the removed ones are counted
            pass
        self._count_removed(sc, None)
        sc.rest = None

    def final_report(self) -> dict:
        """The report of the last decision, with the tokens of the removed documents per source (with a tokenizer,
        once every source was drained)."""
        if self.mix.dedup.recall_sample and self.report["recall"] is None:  # the same decision, and its recall
            self.report = self.index.finish().report
        if self.tokenizer is not None:
            for sc, src in zip(self.scans, self.mix.sources):
                if src.name in self.report["by_source"]:
                    self.report["by_source"][src.name]["tokens_removed"] = sc.tokens_removed
        return self.report

    def _count_removed(self, sc: _Scan, text: str | None) -> None:
        """Queue a removed document's text for counting (None: count what is queued)."""
        if self.tokenizer is None:
            return
        if text is not None:
            sc.removed.append(text)
        if sc.removed and (text is None or len(sc.removed) == common.TOKENIZE_BATCH
                           or sum(map(len, sc.removed)) >= common.TOKENIZE_BATCH_CHARS):
            sc.tokens_removed += sum(len(ids) for ids in _encode(self.tokenizer, sc.removed))
            sc.removed.clear()


def _file_state(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_size, st.st_mtime_ns


@dataclass
class Curated:
    """One source's documents before the ``filters``, what they kept, and the kept documents' weights."""

    texts: list[str]
    keep: np.ndarray  # (n,) bool
    weights: np.ndarray | None  # (kept,) with reweight


def _curate(mix: MixRecipe, k: int, docs: Iterable[Document]) -> Curated:
    """Filter and reweight one source's documents, holding their texts (what ``llmft data report`` is about).

    Raises:
        DataError: a malformed record under on_error: stop, or a user classifier or embedder that fails.
    """
    from llmft.data.reweight import reweight

    name = mix.sources[k].name
    try:
        texts = [_text(d) for d in _progress(f"read {name} (for filters)", unit="doc", iterable=docs)]
    except SourceError as e:
        raise DataError(str(e)) from None
    res = apply_filters(texts, name, mix.filters)
    weights = reweight(texts, res.keep, mix.reweight, stream=k).weights if mix.reweight is not None else None
    log.info("data: %s: filters removed %d of %d documents", name, int((~res.keep).sum()), len(texts))
    return Curated(texts, res.keep, weights)


def _dedup_pass(mix: MixRecipe, readings: dict[str, _Reading], decon: Decontaminator | None,
                decon_report: DecontamReport, workdir: Path, work: Callable,
                tokenizer: PreTrainedTokenizerBase | None) -> _Dedup:
    """Scan every source whole and decide (``llmft data dedup`` and ``llmft data report``); the caller exits it."""
    dd = _Dedup(mix, readings, decon, decon_report, workdir, work, tokenizer)
    try:
        for k in range(len(mix.sources)):
            dd.scan(k)
        dd.decide()
    except BaseException:
        dd.index.remove()
        raise
    return dd


def curate_recipe(mix: MixRecipe) -> dict[str, Curated]:
    """Read, decontaminate, deduplicate, filter and reweight a mix's sources as the build does, without tokenizing
    (for ``llmft data report``; it holds each source's texts, which its report is about).

    Raises:
        DataError: as :func:`build`.
    """
    decon, decon_report = _decontaminator(mix)
    readings = _start_reading(mix, decon, decon_report, filters=False)
    curated = {}
    with tempfile.TemporaryDirectory(prefix="llmft-curate-") as tmp, \
            _tokenizer_pool(_Tokenize(None, 0, True, mix.dedup), 1) as work:
        dd = _dedup_pass(mix, readings, decon, decon_report, Path(tmp), work, None) if mix.dedup else None
        with dd or ExitStack():
            for k, src in enumerate(mix.sources):
                docs = dd.reread(k) if dd else readings[src.name].docs
                curated[src.name] = _curate(mix, k, docs)
    release_scoring_models()
    return curated


def dedup_recipe(mix: MixRecipe, out: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """``llmft data dedup``: read and decontaminate the sources, deduplicate, write ``dedup.json`` and
    ``dedup.md`` in ``out``; no tokenizing or packing. Uses the mix's ``dedup`` section, or the defaults.

    Raises:
        DataError: as :func:`build`.
    """
    if mix.dedup is None:
        mix = mix.model_copy(update={"dedup": Dedup()})
    decon, decon_report = _decontaminator(mix)
    readings = _start_reading(mix, decon, decon_report)
    with tempfile.TemporaryDirectory(prefix="llmft-dedup-") as tmp, \
            _tokenizer_pool(_Tokenize(tokenizer, 0, mix.add_eos, mix.dedup), mix.num_proc) as work, \
            _dedup_pass(mix, readings, decon, decon_report, Path(tmp), work, tokenizer) as dd:
        for k in range(len(mix.sources)):
            dd.reread(k)
            dd.drain(k)
        report = dd.final_report()
    _write_dedup_report(report, Path(out))
    return report


def _write_dedup_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "dedup.json").write_text(json.dumps(report, indent=1))
    (out / "dedup.md").write_text(report_markdown(report))
