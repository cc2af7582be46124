"""Reading a source as the build does: documents read, cleaned (Gutenberg), decontaminated, filtered a batch at a time
and transformed (UL2, NI few-shot), in one process or from the data engine's prepared files in the same order."""

from __future__ import annotations

import logging
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmft.config.data import MixRecipe, MixSource
from llmft.config.sources import list_files
from llmft.data.build import common
from llmft.data.build.common import CHECKPOINT
from llmft.data.decontam import Decontaminator, DecontamReport
from llmft.data.engine import Prepared
from llmft.data.filters import FilterTally, apply_filters
from llmft.data.reweight import ReweightStream
from llmft.data.sources import DataError, Document, SourceReport, read_source

log = logging.getLogger(__name__)


def _decontaminator(mix: MixRecipe) -> tuple[Decontaminator | None, DecontamReport]:
    """The index of the mix's decontamination targets (None without a ``decontaminate`` section) and the report
    the reading fills in; what each target indexed is logged and goes into ``stats.json``.

    Raises:
        DataError: a target is missing, malformed, or yields no n-gram.
    """
    report = DecontamReport()
    if not mix.decontaminate:
        return None, report
    decon = Decontaminator(n=mix.decontaminate.n)
    report.targets = decon.entries  # the same objects: the hits each target causes are counted into them
    for target in mix.decontaminate.targets:
        try:
            entry = decon.add_target_path(target)
        except (OSError, ValueError) as e:
            raise DataError(str(e)) from None
        log.info("decontaminate: %s", entry.describe())
    return decon, report


@dataclass
class _Reading:
    """One source being read: its cleaned documents (a lazy generator), with the reader's report, the per-source
    stats the reading fills in, and the filters' tally when the reading filters."""

    docs: Iterable[Document] | None
    report: SourceReport
    stats: dict
    files: list[Path]  # the local files it reads, in reading order ([] for a hub source)
    tally: FilterTally | None = None  # with filters applied while reading
    unit_docs: array | None = None  # with reweight: (units,) each unit's document, as its index among the kept ones


def _text(doc: Document) -> str:
    """What dedup and filters see of a document: its prompt and text together."""
    return f"{doc.prompt}\n{doc.text}" if doc.prompt else doc.text


def _clean(src: MixSource, mix: MixRecipe, decon: Decontaminator | None, decon_report: DecontamReport,
           reading: _Reading) -> Iterator[tuple[int, Document]]:
    """Read one source, decontaminate it and (with ``reading.tally``) filter it, counting into the reading's report,
    stats and tally. Yields (the document's position among the documents the source's reader yields, the document).

    The filters score a batch at a time (:func:`_filtered`).

    Raises:
        SourceError: a malformed record under on_error: stop.
        DataError: a user classifier that fails.
    """

    def cleaned() -> Iterator[tuple[int, Document]]:
        for raw, doc in enumerate(read_source(src.source, mix.on_error, reading.report, reading.files)):
            if decon is not None:
                mode = mix.decontaminate.mode
                text = decon.clean(doc.text, mode, src.name, doc.where, decon_report)
                prompt_hit = bool(doc.prompt) and decon.find(doc.prompt)
                if text is None or (prompt_hit and mode == "document"):
                    reading.stats["decontaminated"] += 1
                    continue
                doc.text = text
            yield raw, doc

    return cleaned() if reading.tally is None else _filtered(cleaned(), src, mix, reading)


def _filtered(docs: Iterable[tuple[int, Document]], src: MixSource, mix: MixRecipe, reading: _Reading,
              rw: ReweightStream | None = None) -> Iterator[tuple[int, Document]]:
    """The documents the ``filters`` keep, of (position, document) pairs, scored a batch of up to ``FILTER_BATCH``
    documents or ``TOKENIZE_BATCH_CHARS`` characters at a time (the perplexity filter's LM scores a batch at a
    time), so reading runs at most one such batch ahead; counted into ``reading.tally`` and its stats.

    With ``rw`` (``reweight``), every document of a batch, kept or not, goes to the reweighting, and each kept
    document gets ``meta["reweight_index"]``, its index among the kept ones (where its weight will be).

    Raises:
        DataError: a user classifier or reweight embedder that fails.
    """
    batch: list[tuple[int, Document]] = []
    size = 0

    def filtered() -> list[tuple[int, Document]]:
        texts = [_text(d) for _, d in batch]
        result = apply_filters(texts, src.name, mix.filters, [d.where for _, d in batch])
        reading.tally.add(result)
        reading.stats["filtered"] += int((~result.keep).sum())
        kept = [b for b, k in zip(batch, result.keep) if k]
        if rw is not None:
            first = rw.kept
            rw.add(texts, result.keep)
            for i, (_, d) in enumerate(kept):
                d.meta["reweight_index"] = first + i
        return kept

    for raw, doc in docs:
        batch.append((raw, doc))
        size += len(doc.text) + len(doc.prompt)
        if len(batch) >= common.FILTER_BATCH or size >= common.TOKENIZE_BATCH_CHARS:
            kept, batch, size = filtered(), [], 0
            yield from kept
    if batch:
        yield from filtered()


def doc_rng(seed: int, k: int, where: str) -> np.random.Generator:
    """The random stream of one document of source ``k`` (UL2's draws): seeded by the document's location, so that
    a document is transformed the same whoever reads it, whatever was read before."""
    return np.random.default_rng([seed, k, zlib.crc32(where.encode())])


def _engine_docs(run, k: int, reading: _Reading, decon_report: DecontamReport) -> Iterator[Prepared]:
    """Source ``k``'s documents as the data engine prepared them, file by file in reading order, with each file's
    counts added to the reading's report, stats and tally and to the decontamination report as it is entered.

    Raises:
        DataError: a job met a malformed record under on_error: stop.
    """
    for j in range(len(reading.files)):
        yield from _entered(run, k, j, reading, decon_report).documents()


def _entered(run, k: int, j: int, reading: _Reading, decon_report: DecontamReport):
    """File ``j`` of source ``k`` as the engine prepared it (:class:`llmft.data.engine.FileOutput`), its counts
    added to the reading's report, stats and tally and to the decontamination report."""
    out = run.output(k, j)
    reading.report.merge(out.report["source"])
    for key in ("decontaminated", "filtered"):
        reading.stats[key] += out.report["stats"][key]
    if out.report["tally"] is not None:
        reading.tally.merge(**out.report["tally"])
    decon_report.merge(out.report["decontam"])
    reading.stats["bytes_prepared"] = run.bytes_prepared[k]
    return out


def _engine_reweighted(run, k: int, reading: _Reading, decon_report: DecontamReport, rw: ReweightStream
                       ) -> Iterator[Prepared]:
    """Source ``k``'s documents kept by the filters as the data engine prepared them, with their reweighting: the
    batches of :func:`_filtered` replayed over every document the jobs read (the filters' decisions and the
    embeddings the jobs recorded), so that ``rw`` gets the same documents as when this process reads, filters and
    embeds them, in the same batches, and each kept document its ``meta["reweight_index"]``.

    Raises:
        DataError: a job met a malformed record under on_error: stop.
    """
    batch: list[tuple] = []  # (file output, its document index, kept document or None) per document
    size = 0

    def flush() -> list[Prepared]:
        keep = np.array([d is not None for _, _, d in batch])
        pieces, i = [], 0
        while i < len(batch):  # the batch's documents of each file: a contiguous range of them
            out, first = batch[i][0], batch[i][1]
            end = i
            while end < len(batch) and batch[end][0] is out:
                end += 1
            offsets = out.offsets  # (set when the file was entered)
            pieces.append((*out.embedding(int(offsets[first]), int(offsets[first + end - i])),
                           np.diff(offsets[first : first + end - i + 1])))
            i = end
        indices, values, counts = (np.concatenate(x) for x in zip(*pieces))
        first = rw.kept
        rw.add_embedded(indices, values, counts, keep)
        kept = [d for _, _, d in batch if d is not None]
        for i, d in enumerate(kept):
            d.meta["reweight_index"] = first + i
        return kept

    for j in range(len(reading.files)):
        out = _entered(run, k, j, reading, decon_report)
        keep, chars, out.offsets = out.reweighting()
        docs = out.documents()
        for i in range(len(keep)):
            batch.append((out, i, next(docs) if keep[i] else None))
            size += int(chars[i])
            if len(batch) >= common.FILTER_BATCH or size >= common.TOKENIZE_BATCH_CHARS:
                kept, batch, size = flush(), [], 0
                yield from kept
        docs.close()
    if batch:
        yield from flush()


def _engine_scan(run, k: int, reading: _Reading, decon_report: DecontamReport) -> Iterator[tuple]:
    """Dedup's first reading of source ``k`` from the engine's prepared files: per document (its position among
    the documents the source's reader yields, its characters, its tokens without special tokens, its training
    example's length, its chunk's features and where it is in the chunk, its location), in reading order."""
    offset = 0
    for j in range(len(reading.files)):
        out = _entered(run, k, j, reading, decon_report)
        lengths = np.frombuffer(out.spill.lengths, np.int32)
        first = 0
        for c in range(out.chunks):
            feats, where = out.features(c)
            for i in range(len(feats.n_words)):
                d = first + i
                yield (offset + int(out.raw[d]), int(out.scan_chars[d]), int(out.plain[d]), int(lengths[d]),
                       feats, i, where[i])
            first += len(feats.n_words)
        out.spill.release()
        offset += out.report["source"]["documents"]


def _prepared_examples(jobs: Iterable) -> Iterator:
    """``tokenize`` for documents the engine prepared: their examples, in order (CHECKPOINTs passed through)."""
    return (job if job is CHECKPOINT else [d.example for d in job[1]] for job in jobs)


def _start_reading(mix: MixRecipe, decon: Decontaminator | None, decon_report: DecontamReport,
                   filters: bool = True) -> dict[str, _Reading]:
    """Every source's reading, not started; with ``filters`` (and a ``filters`` section) they filter as they read."""
    readings = {}
    for k, src in enumerate(mix.sources):
        stats = {"dropped_min_tokens": 0, "dropped_max_tokens": 0, "decontaminated": 0, "deduplicated": 0,
                 "filtered": 0, "doc_lengths": []}
        r = _Reading(None, SourceReport(), stats, _reading_order(mix, k),
                     FilterTally(mix.filters) if filters and mix.filters else None)
        r.docs = (d for _, d in _clean(src, mix, decon, decon_report, r))
        readings[src.name] = r
    return readings


class _ScratchDecontamReport(DecontamReport):
    """The report of a second reading of documents already checked: it counts nothing into the targets."""

    def _count(self, source: str, entry, k: int = 1) -> None:
        super()._count(source, None, k)


def _sampling(mix: MixRecipe) -> bool:
    """Whether each source's token need is known before reading it, so its reading can stop at the need: a
    ``total_tokens`` with weighted shares."""
    return mix.total_tokens is not None and mix.shares == "weights"


def _reading_order(mix: MixRecipe, k: int) -> list[Path]:
    """The local files of source ``k`` in reading order: a seeded random order when its reading may stop early (a
    sample of whole shards, not the first ones), else :func:`list_files` order; [] for a hub source."""
    spec = mix.sources[k].source
    if spec.hub is not None:
        return []
    files = list_files(spec)
    if not _sampling(mix):
        return files
    return [files[i] for i in np.random.default_rng([mix.seed, k, 1]).permutation(len(files))]
