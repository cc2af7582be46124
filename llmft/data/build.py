"""``llmft data build``: a data-mix recipe -> packed, shuffled training rows on disk, with stats and plots.

Pipeline, per source: read documents (:mod:`llmft.data.sources`), decontaminate, filter (``filters``, batch by
batch as they are read), deduplicate (``dedup``: two readings, see below), tokenize (prompt masked; in
``num_proc`` worker processes when the mix asks, with the same output as one process),
filter by token count, cut every document into units of at most ``seq_len`` tokens, written to a per-source spill
in the staging directory (:mod:`llmft.data.units`: 3 bytes per token on disk, 16 bytes per unit in memory), and
hold out the tail ``validation_fraction`` of the units for validation (``validation_sources`` are held out whole).

Dedup (:class:`_Dedup`) never holds the texts: a first reading of every source (the scan) computes each kept
document's features in the workers (exact hash, MinHash signature, shingles) into a
:class:`llmft.data.dedup.DedupIndex` (in memory: ``num_perm * 4`` bytes per document while deciding, under 100
bytes otherwise; the shingles and excerpts spill to the staging directory); the duplicates are decided over all of
them; a second reading yields only the documents kept (by their position in the reading order; a file changed in
between is an error) and counts the tokens of the removed ones for the report. A plain source's ``min_tokens`` /
``max_tokens`` run in the scan (its workers count each document's tokens), so a document they drop takes no place
in the index: a web source where most documents are under Together's 2K tokens costs signatures only for the rest.

When a source's need is known before it is read (``total_tokens`` with weighted shares), its files are read in a
seeded random order and reading stops once its units hold the ``weight * total`` training tokens it needs (character
budgets, see :func:`_source_units`): a source 20x larger than its share is read about 1/20 (plus 2% and the rest of
the last file started), in whole files, so a sharded corpus is sampled by shard. Filtered documents simply take more
reading. With dedup the scan stops at the need at the source's measured characters per token plus ``SCAN_MARGIN``;
if the kept documents then hold too few tokens, the scan reads on and the decision is taken again over everything
scanned (the sources whose kept documents changed are tokenized again), so the result depends only on the data and
the seed. Duplicates are then found among what was read, which is what the rows are made of. ``stats.json`` records
per source the files and bytes read of the total (``read_fraction``) and whether it was read whole. Otherwise every
source is read whole.

Then, over the mix: each source contributes ``weight * total`` tokens (``shares: natural``: in proportion to its
size), made of whole passes over its units plus a seeded random part-pass (at most ``max_epochs`` passes). The
units of all sources are shuffled together (an index per unit), read back from the spills in that order, packed
(``concat`` or ``isolated``) and written a window of ``PACK_WINDOW_TOKENS`` at a time
(:func:`llmft.data.packing.pack_stream`). The build's memory therefore does not grow with the corpus or the
mix beyond per-unit and per-document numbers: a window of rows, the jobs in flight, 16 bytes per unit, dedup's
features, the reweighting's per-document numbers and samples, and the validation tokens.

Output directory (written in ``OUT/.staging-<pid>/`` and published into ``OUT`` only once complete, ``stats.json``
last: a build that fails or is interrupted leaves the previous build as it was, or no loadable one, never a mix)::

    OUT/
      rows/                     the packed rows, read a batch at a time by training (:mod:`llmft.data.store`): token ids
                                (uint16 when the vocabulary allows, else int32), trained-token and segment-start
                                bits, per-token weights with ``reweight``; 2.25 bytes per token with a 16-bit vocabulary
      validation.parquet        the held-out tokens, one row per source
      stats.json                everything measured (see below) + the build fingerprint
      length_histogram.png, mix.png
      dedup.json, dedup.md      the deduplication report (with ``dedup``; also under "dedup" in stats.json)
      filters.md                what each filter removed, and the reweighting (with ``filters``; also under
                                "filters" and "reweight" in stats.json)

With ``filters`` (:mod:`llmft.data.filters`) documents are filtered as they are read, before deduplication. With
``reweight`` (:mod:`llmft.data.reweight`, :class:`~llmft.data.reweight.ReweightStream`) they are filtered after
deduplication, as the source is read and tokenized, and every document read, kept or not, is embedded into a spill
in the staging directory (17 bytes per document in memory); once the source is read (to its need, when sampled),
the probe is fitted on a sample of those embeddings and scores the kept ones, and each unit gets its document's
weight, carried through selection and packing into ``rows/weight.bin`` (float32 per token, 0 on padding). Training
on the build weighs each token's loss by the weight of the predicted token: a step's loss is Σ w·nll / Σ w over
its trained tokens, so a weight of 2 counts exactly as two copies of the document (:mod:`llmft.train.loss`).

The fingerprint hashes the resolved mix recipe (the ``dedup`` settings included, but not the code of a custom
embedder; except ``num_proc`` and ``engine``: the output does not depend on them), the tokenizer's vocabulary,
seq_len and every input file's path, size and modification time. Rebuilding with the same fingerprint reads
stats.json and does no work.

With an ``engine`` section (:mod:`llmft.data.engine`), the per-file stages (read, clean, decontaminate, filter,
UL2, tokenize, dedup features) run as datatrove tasks, locally or on a cluster, and the per-source loop below takes
their prepared documents in the same order (dedup's scan replays over their features, its second reading takes the
kept documents from the prepared files): the same rows. UL2 draws each document's randomness from its own seeded stream
(:func:`doc_rng`), so a document is transformed the same whichever process reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase  # (AutoTokenizer imports torch: where it is used)

from llmft.config.data import Dedup, MixRecipe, MixSource
from llmft.config.sources import SourceSpec, list_files
from llmft.data.decontam import Decontaminator, DecontamReport
from llmft.data.dedup import DedupIndex, Features, Shingler, report_markdown
from llmft.data.dedup import features as dedup_features
from llmft.data.engine import EngineRun, Prepared
from llmft.data.filters import FilterTally, apply_filters, merge_reports, release_scoring_models
from llmft.data.filters import report_markdown as filters_markdown
from llmft.data.packing import Example, pack_stream, special_ids
from llmft.data.reweight import ReweightStream
from llmft.data.sources import DataError, Document, SourceError, SourceReport, read_source
from llmft.data.store import RowStore, StoreError, StoreWriter
from llmft.data.transforms import ni_fewshot, ul2
from llmft.data.units import UnitSpill

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


@dataclass
class Built:
    """A built data directory, loaded."""

    rows: RowStore | None  # on disk, read per batch (with per-token weights after reweight); None: load_rows=False
    validation_tokens: np.ndarray | None
    stats: dict
    cached: bool


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary and special tokens: equal hashes encode text the same way."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()[:16]


def fingerprint(mix: MixRecipe, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> str:
    """Hash of everything the build output depends on."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "mix": mix.model_dump(mode="json", exclude={"num_proc", "engine"}), "seq_len": seq_len,
                         "tokenizer": tokenizer_hash(tokenizer)}, sort_keys=True).encode())
    inputs = [f for spec in [*(s.source for s in mix.sources), *mix.validation_sources] for f in list_files(spec)]
    if mix.decontaminate:
        for t in mix.decontaminate.targets:
            inputs += sorted(p for p in t.rglob("*") if p.is_file()) if t.is_dir() else [t]
    for f in inputs:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


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
        if len(batch) >= FILTER_BATCH or size >= TOKENIZE_BATCH_CHARS:
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
            if len(batch) >= FILTER_BATCH or size >= TOKENIZE_BATCH_CHARS:
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
                    if sc.chars >= min(ESTIMATE_CHARS, 2 * need):  # the budget: the need at the measured chars/token
                        tokens = sum(len(ids) + 2 for ids in _encode(self.tokenizer, sample))  # + BOS, EOS
                        target = need / (1 - vf) * sc.chars / max(1, tokens) * SCAN_MARGIN
                        progress.total, sample = int(target), None
                if len(batch) == TOKENIZE_BATCH or size >= TOKENIZE_BATCH_CHARS:
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
                    if sc.chars >= min(ESTIMATE_CHARS, 2 * need):
                        target = need / (1 - self.mix.validation_fraction) * sc.chars / max(1, sample) * SCAN_MARGIN
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
            self.scan(k, budget=sc.chars + max((needs[k] - train_tokens[k]) * per_token * SCAN_MARGIN,
                                               (SCAN_MARGIN - 1) * sc.chars))
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
        if sc.removed and (text is None or len(sc.removed) == TOKENIZE_BATCH
                           or sum(map(len, sc.removed)) >= TOKENIZE_BATCH_CHARS):
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


class _Checkpoint:
    """A marker between tokenizing jobs: it comes out of the tokenizer pool after every job before it."""


CHECKPOINT = _Checkpoint()


def _source_units(k: int, mix: MixRecipe, tokenize: Callable[[Iterable], Iterator], seq_len: int,
                  reading: _Reading, spill: UnitSpill, need: int | None) -> int:
    """Transform, tokenize, filter and chunk one source's cleaned documents into ``spill``; fill ``reading.stats``.

    Reading (when ``reading.docs`` is still a generator), the UL2 transform (each document's draws from
    :func:`doc_rng`) and batching run here, in order; ``tokenize`` maps the batches of documents to examples, in this
    process or in ``num_proc`` workers, keeping the order. Documents the data engine prepared
    (:class:`llmft.data.engine.Prepared`, with ``tokenize`` :func:`_prepared_examples`) come transformed and
    tokenized: they are only counted, batched and kept here.

    With ``need`` (the training tokens the source's share takes), reading stops once the units hold ``need``
    training tokens after the validation split. The reader works to a budget of characters: it stops at the
    budget, every batch read so far is tokenized, and the budget grows by the characters the missing tokens take at
    the measured characters per kept token (plus 2%), until enough tokens are kept or the source ends. What is
    read therefore depends on the data alone, not on ``num_proc`` or timing. The first budget assumes 2
    characters per token, below what BPE vocabularies give on natural-language text, so that it stays under the
    need there.

    Returns:
        The number of training units: the units from that index on are the validation tail.

    Raises:
        DataError: a malformed record under on_error: stop.
        OSError: the spill cannot be written.
    """
    src = mix.sources[k]
    report, stats = reading.report, reading.stats
    # one example per document unless ni_fewshot (which reweight rejects): with reweight, each document's index
    # among the kept ones (where its weight will be) queues up in reading order, for its units (reading.unit_docs)
    pending_docs: deque[int] = deque()
    track = reading.unit_docs is not None
    vf = mix.validation_fraction
    chars, budget, stop = 0, math.inf if need is None else need * 2.0, False
    cut_prompts = 0
    progress = _progress(f"read and tokenize {src.name}" + (f" (to its need of {need:,} tokens)" if need else ""),
                         None if need is None else math.ceil(need / (1 - vf)))  # the held-out tail read too

    def train_tokens(total: int) -> int:
        return total - int(total * vf)

    def keep(example: Example) -> None:
        nonlocal cut_prompts
        n = len(example)
        doc = pending_docs.popleft() if track else -1
        if src.filters.min_tokens and n < src.filters.min_tokens:
            stats["dropped_min_tokens"] += 1
        elif src.filters.max_tokens and n > src.filters.max_tokens:
            stats["dropped_max_tokens"] += 1
        else:
            stats["doc_lengths"].append(n)
            cut_prompts += n > seq_len and not example.loss_mask[1:].all()
            for i in range(0, n, seq_len):
                spill.append(example.tokens[i : i + seq_len], example.loss_mask[i : i + seq_len])
                if track:
                    reading.unit_docs.append(doc)
            progress.update(n)

    def batches():
        nonlocal chars
        batch, size = [], 0
        for doc in reading.docs:
            if isinstance(doc, Prepared):
                n = doc.chars
            else:
                if src.transform == "ul2":
                    doc = ul2(doc, doc_rng(mix.seed, k, doc.where), src.ul2)
                n = len(doc.text) + len(doc.prompt)
            if src.transform == "ni_fewshot":  # one task's instances together: flush when the task changes
                if batch and doc.meta.get("task") != batch[-1].meta.get("task"):
                    yield src.transform, batch
                    batch, size = [], 0
            elif len(batch) == TOKENIZE_BATCH or size >= TOKENIZE_BATCH_CHARS:
                yield src.transform, batch
                batch, size = [], 0
            batch.append(doc)
            size += n
            chars += n
            if track:
                pending_docs.append(doc.meta["reweight_index"])
            if chars >= budget:  # every batch so far is tokenized before reading on
                yield src.transform, batch
                batch, size = [], 0
                yield CHECKPOINT
                if stop:
                    return
        if batch:
            yield src.transform, batch

    jobs = tokenize(batches())
    try:
        for out in jobs:
            if out is CHECKPOINT:
                if train_tokens(spill.tokens) >= need:
                    stop = True
                    break
                per_char = spill.tokens / chars
                missing = need - train_tokens(spill.tokens)
                budget = chars + (missing / (1 - vf) / per_char * 1.02 if per_char > 0 else chars)
                continue
            for e in out:
                keep(e)
            progress.set_postfix_str(f"{report.documents:,} docs", refresh=False)
    except SourceError as e:
        raise DataError(str(e)) from None
    finally:
        progress.close()
        for gen in (jobs, reading.docs):  # stop reading: close the generators (and the file being read)
            if hasattr(gen, "close"):
                gen.close()
    bytes_total = sum(f.stat().st_size for f in reading.files)
    stats.update(documents=report.documents, bad_records=report.bad_records, bad_examples=report.examples,
                 filtered_by_subset=report.filtered, cut_prompts=cut_prompts, read_whole=not stop,
                 files_read=report.files_read, files_total=len(reading.files), bytes_read=report.bytes_read,
                 bytes_total=bytes_total, read_fraction=report.bytes_read / bytes_total if bytes_total else None)
    if cut_prompts:
        log.warning("%s: %d prompt/completion examples are longer than seq_len=%d: their later chunks are trained "
                    "without the whole prompt. Raise the row length (model.max_seq_len) to keep them whole.",
                    src.name, cut_prompts, seq_len)
    spill.close()
    starts = np.frombuffer(spill.starts, np.int64)
    return int(np.searchsorted(starts, train_tokens(spill.tokens), side="left"))  # whole units: the tail starts at one


def _validation_source(spec: SourceSpec, mix: MixRecipe, tokenize: Callable[[Iterable], Iterator[list[Example]]]
                       ) -> np.ndarray:
    """Every token of a held-out source (``validation_sources``), documents in reading order.

    Raises:
        DataError: a malformed record under on_error: stop.
    """
    report = SourceReport()

    def batches():
        docs = iter(read_source(spec, mix.on_error, report))
        while batch := [d for _, d in zip(range(TOKENIZE_BATCH), docs)]:
            yield "none", batch

    try:
        parts = [e.tokens for examples in tokenize(batches()) for e in examples]
    except SourceError as e:
        raise DataError(str(e)) from None
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def encode_documents(docs: list[Document], tokenizer: PreTrainedTokenizerBase, add_eos: bool = True) -> list[Example]:
    """Each document as an :class:`Example` ``[BOS] prompt text [EOS]``, trained on ``text [EOS]`` (plain text has
    no prompt, so every token is trained): how every build turns documents into tokens."""
    bos, eos = special_ids(tokenizer, add_eos)
    prompts = _encode(tokenizer, [d.prompt for d in docs]) if any(d.prompt for d in docs) \
        else [[] for _ in docs]  # plain text: no prompts to encode
    texts = _encode(tokenizer, [d.text for d in docs])
    return [Example.from_parts(bos, p, t, eos) for p, t in zip(prompts, texts)]


class _Tokenize:
    """The build's per-batch work: (transform, documents) -> examples (:func:`encode_documents`, or NI few-shot
    sequences), or ("dedup", texts) -> their :class:`llmft.data.dedup.Features`. Picklable, so the same object runs
    in the worker processes of ``num_proc``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, seq_len: int, add_eos: bool,
                 dedup: Dedup | None = None):
        self.tokenizer, self.seq_len, self.add_eos, self.dedup = tokenizer, seq_len, add_eos, dedup
        self._shingler: Shingler | None = None  # made in the process that uses it (its word cache is not sent)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shingler": None}

    def __call__(self, job: tuple[str, list]) -> list[Example] | Features:
        transform, docs = job
        if transform == "dedup":  # texts
            self._shingler = self._shingler or Shingler(self.dedup.shingle_size)
            return dedup_features(docs, self.dedup, self._shingler)
        if transform == "dedup+tokens":  # documents: their features and each one's tokens as encode_documents makes them
            self._shingler = self._shingler or Shingler(self.dedup.shingle_size)
            lengths = np.array([len(e) for e in encode_documents(docs, self.tokenizer, self.add_eos)], np.int64)
            return dedup_features([_text(d) for d in docs], self.dedup, self._shingler), lengths
        if transform == "ni_fewshot":  # many instances of a task per sequence, after one header
            return ni_fewshot(docs, self.tokenizer, self.seq_len, self.add_eos)
        return encode_documents(docs, self.tokenizer, self.add_eos)


_WORKER: _Tokenize | None = None


def _worker_init(tokenize: _Tokenize) -> None:
    global _WORKER
    _WORKER = tokenize


def _worker_run(job: tuple[str, list[Document]]) -> list[Example]:
    return _WORKER(job)


@contextmanager
def _tokenizer_pool(tokenize: _Tokenize, num_proc: int) -> Iterator[Callable[[Iterable], Iterator[list[Example]]]]:
    """A function mapping batches to examples in order: in this process (``num_proc`` 1) or in ``num_proc``
    spawned workers, with at most ``4 * num_proc`` batches in flight so memory stays bounded while this
    process keeps reading. A :data:`CHECKPOINT` among the batches comes out after every batch before it, before
    any batch after it is read."""
    if num_proc == 1:
        yield lambda jobs: (job if job is CHECKPOINT else tokenize(job) for job in jobs)
        return
    # spawn, not fork: the Rust tokenizer's thread pool does not survive a fork. One Rust thread per worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with mp.get_context("spawn").Pool(num_proc, initializer=_worker_init, initargs=(tokenize,)) as pool:

        def ordered(jobs: Iterable) -> Iterator[list[Example]]:
            pending: deque = deque()
            for job in jobs:
                if job is CHECKPOINT:
                    while pending:
                        yield pending.popleft().get()
                    yield job
                    continue
                pending.append(pool.apply_async(_worker_run, (job,)))
                if len(pending) >= 4 * num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield ordered


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of a batch of texts, no special tokens: the fast tokenizer's own batch encoder (parallel in
    Rust) when there is one, skipping the per-encoding Python conversion of the transformers wrapper.
    ``encode_batch_fast`` (tokenizers >= 0.20) also skips the character offsets, which nothing here uses:
    the same ids (tested), about 25% less time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _select(lengths: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of whole passes over the units of ``lengths`` plus a random part-pass, until ``target`` tokens
    (overshoot < one unit)."""
    available = int(lengths.sum())
    full = int(target // available)
    remainder = target - full * available
    order = rng.permutation(len(lengths))
    part = 0 if remainder <= 0 else min(len(order), int(np.searchsorted(np.cumsum(lengths[order]), remainder)) + 1)
    return np.concatenate([np.tile(np.arange(len(lengths)), full), order[:part]])


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


def build(mix: MixRecipe, out: Path, tokenizer: PreTrainedTokenizerBase, seq_len: int, force: bool = False,
          load_rows: bool = True) -> Built:
    """Build (or reuse) the mix in ``out``.

    ``load_rows=False`` skips opening the rows on a cache hit (the CLI needs only the stats).

    Raises:
        DataError: malformed data under on_error: stop, an empty source, a share a source cannot supply
            within its max_epochs, a file removed while it is read, or the output cannot be written (e.g. a
            full disk; the previous build is kept).
    """
    out = Path(out)
    fp = fingerprint(mix, tokenizer, seq_len)
    if not force and (out / "stats.json").is_file():
        stats = json.loads((out / "stats.json").read_text())
        if stats.get("fingerprint") == fp:
            log.info("data: %s is up to date (fingerprint %s): nothing to build", out, fp)
            return load_built(out, cached=True) if load_rows else Built(None, None, stats, cached=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".staging-*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    stage = out / f".staging-{os.getpid()}"
    stage.mkdir()
    try:
        stats, val_tokens = _build(mix, stage, tokenizer, seq_len, fp)
    except BaseException as e:  # an error or an interrupt: no partial build is left
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            raise DataError(f"reading the sources or writing the build to {stage} failed ({e}); the previous build "
                            f"in {out} is untouched. If the disk is full, free space (the rows take 2.25 bytes per "
                            "token with a 16-bit vocabulary, the staging files 3 per token read) and build again"
                            ) from None
        raise
    _publish(stage, out)
    return Built(RowStore(out / "rows"), val_tokens, stats, cached=False)


def _build(mix: MixRecipe, stage: Path, tokenizer: PreTrainedTokenizerBase, seq_len: int, fp: str
           ) -> tuple[dict, np.ndarray]:
    """Build the mix into the empty directory ``stage``: read, tokenize into per-source spills, select, pack,
    write rows, validation tokens, reports and ``stats.json`` (last).

    Returns:
        (the stats, the validation tokens written)

    Raises:
        DataError: as :func:`build`.
        OSError: a source cannot be read or the output cannot be written.
    """
    t0 = time.perf_counter()
    decon, decon_report = _decontaminator(mix)
    reweighting = mix.reweight is not None  # its probe sees the documents the filters remove: filtered after dedup
    readings = _start_reading(mix, decon, decon_report, filters=not reweighting)
    filter_tallies, reweight_report = {}, {"by_source": {}} if reweighting else None

    weights = np.array([s.weight for s in mix.sources], dtype=np.float64)
    weights /= weights.sum()
    needs = [round(w * mix.total_tokens) if _sampling(mix) else None for w in weights]
    (stage / "units").mkdir()
    with ExitStack() as cleanup:  # the spills and dedup's files are closed and removed on errors too
        spills = [cleanup.enter_context(UnitSpill(stage / "units" / str(k), len(tokenizer)))
                  for k in range(len(mix.sources))]
        n_train, per_source = [0] * len(mix.sources), {}
        with _tokenizer_pool(_Tokenize(tokenizer, seq_len, mix.add_eos, mix.dedup), mix.num_proc) as tokenize:
            dd, engine_sources, run = None, [], None
            if mix.engine is not None:  # the per-file stages as datatrove tasks
                engine_sources = [k for k, s in enumerate(mix.sources)
                                  if s.source.hub is None and s.transform != "ni_fewshot"]
                run = EngineRun(mix, tokenizer, seq_len, stage / "engine", stage.parent / "engine-logs",
                                {k: readings[mix.sources[k].name].files for k in engine_sources}, needs)
                cleanup.callback(run.close, quiet=True)  # on an error: the wave's processes end before staging goes
                for k in engine_sources if not mix.dedup else ():  # (with dedup: its second reading)
                    readings[mix.sources[k].name].docs = _engine_docs(run, k, readings[mix.sources[k].name],
                                                                      decon_report)
                for k in set(range(len(mix.sources))) - set(engine_sources):
                    log.info("data engine: source %r is read in this process (%s)", mix.sources[k].name,
                             "a hub dataset" if mix.sources[k].source.hub else "ni_fewshot spans files")
            if mix.dedup:  # first reading: every document's features; then the decision
                dd = cleanup.enter_context(_Dedup(mix, readings, decon, decon_report, stage / "dedup", tokenize,
                                                  tokenizer, run, engine_sources))
                for k in range(len(mix.sources)):
                    dd.scan(k, needs[k])
                dd.decide()
            todo = list(range(len(mix.sources)))
            while todo:  # more than once only when dedup leaves a sampled source short
                for k in todo:
                    src, reading = mix.sources[k], readings[mix.sources[k].name]
                    if len(spills[k]):  # tokenized before, with other documents kept: again from scratch
                        spills[k].remove()
                        spills[k] = cleanup.enter_context(UnitSpill(stage / "units" / str(k), len(tokenizer)))
                    # what tokenizing counts (again, on a top-up, even of a source that kept no unit before)
                    reading.stats.update(dropped_min_tokens=0, dropped_max_tokens=0, doc_lengths=[])
                    if dd is not None:
                        reading.docs = dd.reread(k)
                    if reweighting:  # filtered as it is read; every document embedded for the probe
                        (stage / "reweight" / str(k)).mkdir(parents=True, exist_ok=True)
                        rw = cleanup.enter_context(ReweightStream(mix.reweight, stage / "reweight" / str(k), k))
                        reading.tally, reading.stats["filtered"] = FilterTally(mix.filters), 0
                        reading.unit_docs = array("q")
                        if k in engine_sources:  # filtered and embedded by the engine's jobs
                            reading.docs = _engine_reweighted(run, k, reading, decon_report, rw)
                        else:
                            reading.docs = (d for _, d in _filtered(enumerate(reading.docs), src, mix, reading, rw))
                    t1 = time.perf_counter()
                    n_train[k] = _source_units(k, mix, _prepared_examples if k in engine_sources else tokenize,
                                               seq_len, reading, spills[k], needs[k])
                    if reweighting:  # the probe, fitted on what was read; each unit gets its document's weight
                        res = rw.finish()
                        rw.remove()
                        reweight_report["by_source"][src.name] = res.report
                        spills[k].set_weights(res.weights[np.frombuffer(reading.unit_docs, np.int64)])
                        log.info("data: %s: filters removed %d of %d documents; reweighted (probe accuracy %.3f)",
                                 src.name, reading.tally.removed, len(rw), res.report.get("probe_accuracy", 0.5))
                    seconds = time.perf_counter() - t1
                    st = per_source[src.name] = reading.stats
                    if dd is not None:
                        dd.drain(k)
                        st["read_whole"] = dd.scans[k].exhausted
                        st["dropped_min_tokens"] += dd.scans[k].dropped_min_tokens
                        st["dropped_max_tokens"] += dd.scans[k].dropped_max_tokens
                    log.info("data: %s: %s tokens from %d documents in %.1f s (%s tokens/s)%s", src.name,
                             f"{spills[k].tokens:,}", st["documents"], seconds,
                             f"{spills[k].tokens / max(1e-9, seconds):,.0f}",
                             "" if st["read_whole"] else f"; stopped at its need: {st['bytes_read']:,} of "
                             f"{st['bytes_total']:,} bytes read ({st['files_read']} of {st['files_total']} files)")
                trained = [int(np.frombuffer(sp.lengths, np.int32)[:n].sum()) for sp, n in zip(spills, n_train)]
                todo = dd.top_up(needs, trained) if dd is not None else []
            if run is not None:
                run.close()  # the files the last wave prepared past what the build took
            held_out = {f"validation:{spec.path or spec.hub}": _validation_source(spec, mix, tokenize)
                        for spec in mix.validation_sources}
        if mix.filters:
            release_scoring_models()  # the perplexity filter's LM, loaded once for all sources: not kept for training
            filter_tallies = {s.name: readings[s.name].tally for s in mix.sources}
        dedup_report = dd.final_report() if dd is not None else None
        filters_report = merge_reports(filter_tallies, mix.filters) if mix.filters else None
        for k, src in enumerate(mix.sources):
            if n_train[k] == 0:
                raise DataError(f"source {src.name!r} has no documents left after reading and filtering "
                                f"({per_source[src.name]['documents']} read)")
        lengths = [np.frombuffer(sp.lengths, np.int32)[:n] for sp, n in zip(spills, n_train)]
        available = {s.name: int(ls.sum()) for s, ls in zip(mix.sources, lengths)}
        if mix.shares == "natural":  # every source in proportion to its size: all of each, once
            weights = np.array([available[s.name] for s in mix.sources], dtype=np.float64)
            weights /= weights.sum()
        caps = [available[s.name] * s.max_epochs / w for s, w in zip(mix.sources, weights)]
        total = mix.total_tokens or int(min(caps))
        for s, w in zip(mix.sources, weights):
            need = w * total / available[s.name]
            if need > s.max_epochs * (1 + 1e-9):
                raise DataError(
                    f"source {s.name!r} has {available[s.name]:,} tokens; a {w:.1%} share of {total:,} tokens needs "
                    f"{need:.2f} passes > max_epochs {s.max_epochs:g}. Lower total_tokens or its weight, or raise "
                    "its max_epochs"
                )

        rng = np.random.default_rng(mix.seed)
        chosen = []
        for k, (s, w) in enumerate(zip(mix.sources, weights)):
            chosen.append(_select(lengths[k], round(w * total), rng))
            took = int(lengths[k][chosen[k]].sum())
            per_source[s.name].update(available_tokens=available[s.name], target_share=float(w),
                                      target_tokens=round(w * total), selected_tokens=took, units=len(chosen[k]),
                                      epochs=took / available[s.name])
        # (units,) which source and which of its units, in the order they are packed
        which = np.concatenate([np.full(len(c), k, np.int32) for k, c in enumerate(chosen)])
        unit = np.concatenate(chosen)
        order = rng.permutation(len(which))
        which, unit = which[order], unit[order]
        del chosen, order
        selected = sum(st["selected_tokens"] for st in per_source.values())
        for st in per_source.values():
            st["realized_share"] = st["selected_tokens"] / selected

        val_parts = {s.name: sp.tokens_of(n, len(sp)) for s, sp, n in zip(mix.sources, spills, n_train)} | held_out
        reweighted = mix.reweight is not None
        # packed and written a window at a time; each unit is read back from its spill when it is packed
        with StoreWriter(stage / "rows", seq_len, len(tokenizer), mix.packing, weights=reweighted) as writer:
            units = (spills[k][i] for k, i in zip(which.tolist(), unit.tolist()))
            with _progress(f"pack ({mix.packing}) and write", selected) as progress:
                for rows, token_weights in pack_stream(units, seq_len, mix.packing, tokenizer.pad_token_id,
                                                       PACK_WINDOW_TOKENS, weights=reweighted):
                    writer.append(rows, token_weights)
                    progress.update(rows.real_tokens)
    (stage / "units").rmdir()
    shutil.rmtree(stage / "dedup", ignore_errors=True)  # dedup's spill directory, emptied
    shutil.rmtree(stage / "engine", ignore_errors=True)  # the engine's jobs' outputs and logs
    shutil.rmtree(stage / "reweight", ignore_errors=True)  # the reweighting's spill directories, emptied
    index = writer.index
    histograms = {name: st.pop("doc_lengths") for name, st in per_source.items()}
    stats = {
        "fingerprint": fp,
        "seq_len": seq_len,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "packing": {"mode": mix.packing, "rows": index["rows"],
                    "efficiency": index["real_tokens"] / max(1, index["rows"] * seq_len),
                    "dropped_tokens": index["dropped_tokens"], "split_examples": index["split_examples"],
                    "store_bytes": index["bytes"]},
        "total_tokens": selected,
        "validation_tokens": {n: len(t) for n, t in val_parts.items()},
        "sources": per_source,
        "length_histogram": {n: _histogram(lengths) for n, lengths in histograms.items()},
        "decontamination": decon_report.to_dict() if decon else None,
        "dedup": dedup_report,
        "filters": filters_report,
        "reweight": reweight_report,
        # the recipe as written, for llmft data report (not num_proc or engine: the output does not depend on them)
        "mix": mix.model_dump(mode="json", exclude_unset=True, exclude={"num_proc", "engine"}),
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    pq.write_table(pa.table({"source": _strings(list(val_parts)), "tokens": _int_lists(list(val_parts.values()))}),
                   stage / "validation.parquet")
    if dedup_report is not None:
        _write_dedup_report(dedup_report, stage)
    if filters_report is not None:
        (stage / "filters.md").write_text(filters_markdown(filters_report, reweight_report))
    _plot(stats, stage)
    (stage / "stats.json").write_text(json.dumps(stats, indent=1))
    val_tokens = np.concatenate([np.asarray(t, np.int32) for t in val_parts.values()])  # what validation.parquet holds
    return stats, val_tokens


def _publish(stage: Path, out: Path) -> None:
    """Move a complete build from ``stage`` into ``out``, replacing the previous one.

    ``stats.json``, which marks a build complete, is removed first and put back last, and everything else moves by
    rename on the same file system: an interruption here leaves no loadable build (the next run rebuilds), never old
    rows with new stats.
    """
    (out / "stats.json").unlink(missing_ok=True)
    trash = out / f".old-{os.getpid()}"
    trash.mkdir(exist_ok=True)
    old = [out / "rows", out / "validation.parquet", out / "filters.md", *out.glob("dedup.*"), *out.glob("*.png"),
           *out.glob("train-*.parquet")]  # train-*.parquet: the rows of builds before the row store
    for path in old:
        if path.exists():
            os.replace(path, trash / path.name)
    for path in stage.iterdir():
        if path.name != "stats.json":
            os.replace(path, out / path.name)
    os.replace(stage / "stats.json", out / "stats.json")
    stage.rmdir()
    shutil.rmtree(trash, ignore_errors=True)


def _histogram(lengths: list[int]) -> dict:
    """Document-length counts in power-of-two bins: {"<=64": n, "<=128": n, ...}."""
    if not lengths:
        return {}
    edges = [2**k for k in range(4, max(5, math.ceil(math.log2(max(lengths)))) + 1)]
    counts = np.histogram(lengths, bins=[0, *edges])[0]
    return {f"<={e}": int(c) for e, c in zip(edges, counts)}


# Arrow columns from numpy buffers with ``pa.Array.from_buffers``: ``pa.array`` imports pandas (half a second of
# every build) to check its input's type.


def _values(flat: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A flat numpy array as an arrow array of ``dtype`` over the same buffer."""
    flat = np.ascontiguousarray(flat)
    return pa.Array.from_buffers(dtype, len(flat), [None, pa.py_buffer(flat)])


def _offsets(lengths: list[int]) -> pa.Buffer:
    """int32 list/string offsets: 0, then the running sum of ``lengths``."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.py_buffer(offsets)


def _int_lists(parts: list[np.ndarray]) -> pa.ListArray:
    """Variable-length int32 lists."""
    flat = np.concatenate([np.asarray(x, np.int32) for x in parts]) if parts else np.zeros(0, np.int32)
    return pa.Array.from_buffers(pa.list_(pa.int32()), len(parts), [None, _offsets([len(x) for x in parts])],
                                 children=[_values(flat, pa.int32())])


def _strings(items: list[str]) -> pa.StringArray:
    data = [x.encode() for x in items]
    return pa.Array.from_buffers(pa.string(), len(data), [None, _offsets([len(b) for b in data]),
                                                          pa.py_buffer(b"".join(data))])


def _flat_column(path: Path, name: str, dtype: type) -> np.ndarray:
    """The values of a list column of a parquet file, concatenated (no nulls), read without pandas (see above)."""
    values = pq.ParquetFile(path).read(columns=[name]).column(name).combine_chunks().flatten()
    return np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * np.dtype(dtype).itemsize)


def _validation_tokens(out: Path) -> np.ndarray:
    return _flat_column(out / "validation.parquet", "tokens", np.int32).copy()


def load_built(out: Path, cached: bool = False) -> Built:
    """Open a built directory: its row store (nothing read until a batch asks) and its validation tokens.

    Raises:
        DataError: the directory is not a complete build of this llmft's format.
    """
    out = Path(out)
    if not (out / "stats.json").is_file():
        raise DataError(f"{out} is not a built data directory (no stats.json); build it with `llmft data build`")
    stats = json.loads((out / "stats.json").read_text())
    if not (out / "rows").is_dir() and any(out.glob("train-*.parquet")):
        raise DataError(f"{out} was built by an older llmft (parquet rows, not a row store); rebuild it with "
                        "`llmft data build --force`")
    try:
        rows = RowStore(out / "rows")
    except StoreError as e:
        raise DataError(str(e)) from None
    p = stats["packing"]
    if (len(rows), rows.seq_len) != (p["rows"], stats["seq_len"]):
        raise DataError(f"{out}: stats.json lists {p['rows']} rows of {stats['seq_len']} but rows/ holds {len(rows)} "
                        f"of {rows.seq_len}; rebuild it with `llmft data build --force`")
    return Built(rows, _validation_tokens(out), stats, cached)


def _plot(stats: dict, out: Path) -> None:
    """length_histogram.png (documents per length bin, per source) and mix.png (target vs realized shares)."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, and half the import time

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    names = list(stats["length_histogram"])
    bins = sorted({b for h in stats["length_histogram"].values() for b in h}, key=lambda b: int(b[2:]))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        h = stats["length_histogram"][name]
        ax.bar([i + k * width for i in range(len(bins))], [h.get(b, 0) for b in bins], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bins))], bins, rotation=45, fontsize=7)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title("Document lengths by source")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "length_histogram.png")

    fig = Figure(figsize=(6, 3.6), dpi=110)
    ax = fig.add_subplot()
    src = stats["sources"]
    xs = np.arange(len(src))
    ax.bar(xs - 0.2, [100 * s["target_share"] for s in src.values()], 0.4, label="target")
    ax.bar(xs + 0.2, [100 * s["realized_share"] for s in src.values()], 0.4, label="realized")
    ax.set_xticks(xs, list(src), fontsize=8)
    ax.set_ylabel("% of training tokens")
    ax.set_title(f"Mix: {stats['total_tokens']:,} tokens, {stats['packing']['mode']} packing "
                 f"({stats['packing']['efficiency']:.1%} full)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mix.png")


def build_from_recipe(mix: MixRecipe, out: Path, seq_len: int, tokenizer_name: str, force: bool = False,
                      load_rows: bool = True) -> Built:
    """Load the tokenizer by name and build."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return build(mix, out, tok, seq_len, force=force, load_rows=load_rows)
