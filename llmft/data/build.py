"""``llmft data build``: a data-mix recipe -> packed, shuffled training rows on disk, with stats and plots.

Pipeline, per source: read documents (:mod:`llmft.data.sources`), decontaminate, deduplicate (when the mix
has a ``dedup`` section: every source is read first, see :mod:`llmft.data.dedup`), tokenize (prompt masked; in
``num_proc`` worker processes when the mix asks, with the same output as one process),
filter by token count, cut every document into units of at most ``seq_len`` tokens, written to a per-source spill
in the staging directory (:mod:`llmft.data.units`: 3 bytes per token on disk, 16 bytes per unit in memory), and
hold out the tail ``validation_fraction`` of the units for validation (``validation_sources`` are held out whole).

When a source's need is known before it is read (``total_tokens`` with weighted shares, and no ``dedup`` or
``filters``, which read every source first), its files are read in a seeded random order and reading stops once
its units hold the ``weight * total`` training tokens it needs (character budgets, see :func:`_source_units`):
a source 20x larger than its share is read about 1/20 (plus 2% and the rest of the last file started), in whole
files, so a sharded corpus is sampled by shard. ``stats.json`` records per source the files and bytes read of
the total (``read_fraction``) and whether it was read whole. Otherwise every source is read whole.

Then, over the mix: each source contributes ``weight * total`` tokens (``shares: natural``: in proportion to its
size), made of whole passes over its units plus a seeded random part-pass (at most ``max_epochs`` passes). The
units of all sources are shuffled together (an index per unit), read back from the spills in that order, packed
(``concat`` or ``isolated``) and written a window of ``PACK_WINDOW_TOKENS`` at a time
(:func:`llmft.data.packing.pack_stream`). Without dedup and filters the build's memory therefore does not grow
with the corpus or the mix: a window of rows, the tokenizing jobs in flight, per-unit and per-document scalars,
and the validation tokens. Dedup and filters still hold every document's text (to come: signatures only).

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

With ``filters`` (:mod:`llmft.data.filters`), every source is read first and filtered after deduplication; with
``reweight`` (:mod:`llmft.data.reweight`) each kept document gets a weight, carried through tokenizing, chunking,
selection and packing into ``rows/weight.bin`` (float32 per token, 0 on padding). Training
on the build weighs each token's loss by the weight of the predicted token: a step's loss is Σ w·nll / Σ w over
its trained tokens, so a weight of 2 counts exactly as two copies of the document (:mod:`llmft.train.loss`).

The fingerprint hashes the resolved mix recipe (the ``dedup`` settings included, but not the code of a custom
embedder; except ``num_proc``: the output does not depend on it), the
tokenizer's vocabulary, seq_len and every input file's path, size and modification time. Rebuilding with the same fingerprint reads stats.json and does no work.
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
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmft.data.decontam import Decontaminator, DecontamReport
from llmft.data.dedup import deduplicate, report_markdown
from llmft.data.filters import apply_filters, merge_reports, release_scoring_models
from llmft.data.filters import report_markdown as filters_markdown
from llmft.data.mix import Dedup, MixRecipe, MixSource
from llmft.data.packing import Example, pack_stream, special_ids
from llmft.data.sources import DataError, Document, SourceError, SourceReport, SourceSpec, list_files, read_source
from llmft.data.store import RowStore, StoreError, StoreWriter
from llmft.data.units import UnitSpill
from llmft.data.transforms import ni_fewshot, ul2

log = logging.getLogger(__name__)
FORMAT_VERSION = 4  # bump when the on-disk layout or the build algorithm changes
PACK_WINDOW_TOKENS = 4 * 2**20  # rows are packed and written a window at a time: ~120 MB of rows in memory
PROGRESS_LOG_SECONDS = 30  # without a terminal, progress is logged this often
TOKENIZE_BATCH = 256  # documents per tokenizing job, or fewer when they reach:
TOKENIZE_BATCH_CHARS = 1 << 20  # (a batch of 256 books would be ~100 MB of text, times the jobs in flight)


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
    h.update(json.dumps({"v": FORMAT_VERSION, "mix": mix.model_dump(mode="json", exclude={"num_proc"}), "seq_len": seq_len,
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
    """One source being read: its cleaned documents (a lazy generator, or a list once deduplicated), with the
    reader's report and the per-source stats the reading fills in."""

    docs: Iterable[Document]
    report: SourceReport
    stats: dict
    files: list[Path]  # the local files it reads, in reading order ([] for a hub source)


def _read_clean(src: MixSource, mix: MixRecipe, decon: Decontaminator | None, decon_report: DecontamReport,
                report: SourceReport, stats: dict, files: list[Path]) -> Iterator[Document]:
    """Read one source and decontaminate it, counting into ``report`` and ``stats``.

    Raises:
        SourceError: a malformed record under on_error: stop.
    """
    for doc in read_source(src.source, mix.on_error, report, files):
        if decon is not None:
            mode = mix.decontaminate.mode
            text = decon.clean(doc.text, mode, src.name, doc.where, decon_report)
            prompt_hit = bool(doc.prompt) and decon.find(doc.prompt)
            if text is None or (prompt_hit and mode == "document"):
                stats["decontaminated"] += 1
                continue
            doc.text = text
        yield doc


def _start_reading(mix: MixRecipe, decon: Decontaminator | None, decon_report: DecontamReport) -> dict[str, _Reading]:
    readings = {}
    for k, src in enumerate(mix.sources):
        report = SourceReport()
        stats = {"dropped_min_tokens": 0, "dropped_max_tokens": 0, "decontaminated": 0, "deduplicated": 0,
                 "filtered": 0, "doc_lengths": []}
        files = _reading_order(mix, k)
        readings[src.name] = _Reading(_read_clean(src, mix, decon, decon_report, report, stats, files), report, stats,
                                      files)
    return readings


def _dedup(mix: MixRecipe, readings: dict[str, _Reading], tokenizer: PreTrainedTokenizerBase | None) -> dict:
    """Read every source, deduplicate (``mix.dedup``), and leave only the kept documents in ``readings``.

    A document is compared by its prompt and text together. With a tokenizer, the report also counts the tokens
    of the removed documents (prompt and text, no special tokens).

    Returns:
        The report of :func:`llmft.data.dedup.deduplicate`.

    Raises:
        DataError: a malformed record under on_error: stop, or a custom embedder that fails.
    """
    docs: list[Document] = []
    names: list[str] = []
    for name, r in readings.items():
        try:
            listed = list(_progress(f"read {name} (for dedup)", unit="doc", iterable=r.docs))
        except SourceError as e:
            raise DataError(str(e)) from None
        docs += listed
        names += [name] * len(listed)
    log.info("data: deduplicating %d documents (%s)", len(docs), ", ".join(mix.dedup.methods))
    texts = [f"{d.prompt}\n{d.text}" if d.prompt else d.text for d in docs]
    result = deduplicate(texts, names, mix.dedup, where=[d.where for d in docs])
    report = result.report
    for name, r in readings.items():
        r.docs = [d for d, n, k in zip(docs, names, result.keep) if n == name and k]
        r.stats["deduplicated"] = report["by_source"].get(name, {}).get("removed", 0)
    if tokenizer is not None:
        for name, st in report["by_source"].items():
            removed = [t for t, n, k in zip(texts, names, result.keep) if n == name and not k]
            st["tokens_removed"] = sum(len(ids) for i in range(0, len(removed), TOKENIZE_BATCH)
                                       for ids in _encode(tokenizer, removed[i : i + TOKENIZE_BATCH]))
    return report


@dataclass
class Curated:
    """One source's documents before the ``filters``, what they kept, and the kept documents' weights."""

    texts: list[str]
    keep: np.ndarray  # (n,) bool
    weights: np.ndarray | None  # (kept,) with reweight


def _filter(mix: MixRecipe, readings: dict[str, _Reading]) -> tuple[dict, dict | None, dict[str, Curated]]:
    """Read every source, apply ``mix.filters`` and (with ``mix.reweight``) weigh the kept documents; leave only
    the kept documents in ``readings``, each with ``meta["weight"]``.

    Returns:
        (the filters report, the reweight report or None, per source: texts, kept mask, weights)

    Raises:
        DataError: a malformed record under on_error: stop, or a user classifier or embedder that fails.
    """
    from llmft.data.reweight import reweight

    results, curated, rw_report = {}, {}, {"by_source": {}} if mix.reweight else None
    for k, (name, r) in enumerate(readings.items()):
        try:
            docs = list(_progress(f"read {name} (for filters)", unit="doc", iterable=r.docs))
        except SourceError as e:
            raise DataError(str(e)) from None
        texts = [f"{d.prompt}\n{d.text}" if d.prompt else d.text for d in docs]
        res = apply_filters(texts, name, mix.filters, [d.where for d in docs])
        results[name] = res
        weights = None
        if mix.reweight is not None:
            rw = reweight(texts, res.keep, mix.reweight, stream=k)
            weights, rw_report["by_source"][name] = rw.weights, rw.report
        kept = [d for d, keep in zip(docs, res.keep) if keep]
        for i, d in enumerate(kept):
            d.meta["weight"] = float(weights[i]) if weights is not None else 1.0
        r.docs = kept
        r.stats["filtered"] = int((~res.keep).sum())
        curated[name] = Curated(texts, res.keep, weights)
        log.info("data: %s: filters removed %d of %d documents", name, r.stats["filtered"], len(docs))
    release_scoring_models()  # the perplexity filter's LM, loaded once for all sources: not kept for training
    return merge_reports(results, mix.filters), rw_report, curated


def curate_recipe(mix: MixRecipe) -> dict[str, Curated]:
    """Read, decontaminate, deduplicate, filter and reweight a mix's sources as the build does, without tokenizing
    (for ``llmft data report``).

    Raises:
        DataError: as :func:`build`.
    """
    decon, decon_report = _decontaminator(mix)
    readings = _start_reading(mix, decon, decon_report)
    if mix.dedup:
        _dedup(mix, readings, None)
    return _filter(mix, readings)[2]


def dedup_recipe(mix: MixRecipe, out: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """``llmft data dedup``: read and decontaminate the sources, deduplicate, write ``dedup.json`` and
    ``dedup.md`` in ``out``; no tokenizing or packing. Uses the mix's ``dedup`` section, or the defaults.

    Raises:
        DataError: as :func:`build`.
    """
    if mix.dedup is None:
        mix = mix.model_copy(update={"dedup": Dedup()})
    decon, decon_report = _decontaminator(mix)
    report = _dedup(mix, _start_reading(mix, decon, decon_report), tokenizer)
    _write_dedup_report(report, Path(out))
    return report


def _write_dedup_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "dedup.json").write_text(json.dumps(report, indent=1))
    (out / "dedup.md").write_text(report_markdown(report))


class _Checkpoint:
    """A marker between tokenizing jobs: it comes out of the tokenizer pool after every job before it."""


CHECKPOINT = _Checkpoint()


def _source_units(src: MixSource, mix: MixRecipe, tokenize: Callable[[Iterable], Iterator], seq_len: int,
                  reading: _Reading, rng: np.random.Generator, spill: UnitSpill, need: int | None) -> int:
    """Transform, tokenize, filter and chunk one source's cleaned documents into ``spill``; fill ``reading.stats``.

    Reading (when ``reading.docs`` is still a generator), the UL2 transform and batching run here, in order (UL2
    draws from ``rng``); ``tokenize`` maps the batches of documents to examples, in this process or in
    ``num_proc`` workers, keeping the order.

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
    report, stats = reading.report, reading.stats
    # one example per document unless ni_fewshot (which reweight rejects): the weights queue up in reading order
    pending_weights: deque[float] = deque()
    track = mix.reweight is not None
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
        w = pending_weights.popleft() if track else 1.0
        if src.filters.min_tokens and n < src.filters.min_tokens:
            stats["dropped_min_tokens"] += 1
        elif src.filters.max_tokens and n > src.filters.max_tokens:
            stats["dropped_max_tokens"] += 1
        else:
            stats["doc_lengths"].append(n)
            cut_prompts += n > seq_len and not example.loss_mask[1:].all()
            for i in range(0, n, seq_len):
                spill.append(example.tokens[i : i + seq_len], example.loss_mask[i : i + seq_len], w)
            progress.update(n)

    def batches():
        nonlocal chars
        batch, size = [], 0
        for doc in reading.docs:
            if src.transform == "ul2":
                doc = ul2(doc, rng, src.ul2)
            if src.transform == "ni_fewshot":  # one task's instances together: flush when the task changes
                if batch and doc.meta.get("task") != batch[-1].meta.get("task"):
                    yield src.transform, batch
                    batch, size = [], 0
            elif len(batch) == TOKENIZE_BATCH or size >= TOKENIZE_BATCH_CHARS:
                yield src.transform, batch
                batch, size = [], 0
            batch.append(doc)
            n = len(doc.text) + len(doc.prompt)
            size += n
            chars += n
            if track:
                pending_weights.append(doc.meta.get("weight", 1.0))
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
    """(transform, documents) -> examples: :func:`encode_documents`, or NI few-shot sequences. Picklable, so
    the same object runs in the worker processes of ``num_proc``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, seq_len: int, add_eos: bool):
        self.tokenizer, self.seq_len, self.add_eos = tokenizer, seq_len, add_eos

    def __call__(self, job: tuple[str, list[Document]]) -> list[Example]:
        transform, docs = job
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
    ``total_tokens`` with weighted shares, and no dedup or filters (which read every source first)."""
    return mix.total_tokens is not None and mix.shares == "weights" and not mix.dedup and not mix.filters


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
    readings = _start_reading(mix, decon, decon_report)
    dedup_report = _dedup(mix, readings, tokenizer) if mix.dedup else None
    filters_report, reweight_report = _filter(mix, readings)[:2] if mix.filters else (None, None)

    weights = np.array([s.weight for s in mix.sources], dtype=np.float64)
    weights /= weights.sum()
    (stage / "units").mkdir()
    with ExitStack() as cleanup:  # the spills are closed and removed on errors too
        spills = [cleanup.enter_context(UnitSpill(stage / "units" / str(k), len(tokenizer)))
                  for k in range(len(mix.sources))]
        n_train, per_source = [], {}
        with _tokenizer_pool(_Tokenize(tokenizer, seq_len, mix.add_eos), mix.num_proc) as tokenize:
            for k, src in enumerate(mix.sources):
                need = round(weights[k] * mix.total_tokens) if _sampling(mix) else None
                t1 = time.perf_counter()
                n_train.append(_source_units(src, mix, tokenize, seq_len, readings[src.name],
                                             np.random.default_rng([mix.seed, k]), spills[k], need))
                seconds = time.perf_counter() - t1
                st = per_source[src.name] = readings[src.name].stats
                log.info("data: %s: %s tokens from %d documents in %.1f s (%s tokens/s)%s", src.name,
                         f"{spills[k].tokens:,}", st["documents"], seconds,
                         f"{spills[k].tokens / max(1e-9, seconds):,.0f}",
                         "" if st["read_whole"] else f"; stopped at its need: {st['bytes_read']:,} of "
                         f"{st['bytes_total']:,} bytes read ({st['files_read']} of {st['files_total']} files)")
            held_out = {f"validation:{spec.path or spec.hub}": _validation_source(spec, mix, tokenize)
                        for spec in mix.validation_sources}
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
        # the recipe as written, for llmft data report (not num_proc: the output does not depend on it)
        "mix": mix.model_dump(mode="json", exclude_unset=True, exclude={"num_proc"}),
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
    tok = AutoTokenizer.from_pretrained(tokenizer_name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return build(mix, out, tok, seq_len, force=force, load_rows=load_rows)
