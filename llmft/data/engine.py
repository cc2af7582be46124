"""The build's per-file stages as independent tasks on a datatrove executor (the mix's ``engine`` section).

Without an engine, :mod:`llmft.data.build` reads every source in its own process and tokenizes in ``num_proc``
workers. With one, each local file of a source becomes a job: read it, decontaminate and filter its documents, apply
UL2, tokenize, and with ``dedup`` compute each document's dedup features (exact hash, shingles, MinHash signature,
hashed embedding; on the text before UL2, as the build's scan does). Jobs run as datatrove tasks
(``files_per_task`` files each; locally by default ``TASKS_PER_WORKER`` tasks per worker, since each task costs
datatrove's setup) on a ``LocalPipelineExecutor`` (worker
processes on this machine, the default), a ``SlurmPipelineExecutor`` (an sbatch job array) or a
``RayPipelineExecutor``: the same recipe, with ``engine.executor`` and its ``options`` changed. A job writes its
file's documents into ``<root>/<source>/<file>/`` in the build's staging directory, which a cluster's nodes must
see: the tokens of each kept document (a :class:`llmft.data.units.UnitSpill`, one unit per document), the
characters of each, and what reading, decontamination and the filters counted; with dedup also each document's
position among the file's documents, its characters and tokens as the scan counts them, and its features in chunks
(``features-<i>.npz``). It writes into a temporary folder
renamed when complete, so a task that is killed and run again (Slurm requeues) never leaves half a file's output.

The build then hands the prepared documents to the same per-source loop as without an engine, in the same reading
order, so it stops at the same document, selects the same units and writes the same rows (tested). With dedup, the
build's scan replays over the prepared records and features (the same budget, estimate, length filter and top-up),
and its second reading takes the kept documents' tokens from the prepared files instead of reading the sources
again. Only what is
counted differs when a source is sampled: the engine prepares whole files, so the documents, bytes and filter counts
of ``stats.json`` cover every file the loop entered, and ``bytes_prepared`` what the engine read.

Which files are prepared: a source read whole gets all its files in one wave. A sampled source (its need known)
first gets the files that hold its need at 2 bytes per token (as the in-process reader's first budget: on natural
text and BPE vocabularies a file holds fewer tokens than that, so this wave stays under the need), then, when the
loop reads past them, a wave sized by the bytes per kept token measured on its prepared files plus ``WAVE_MARGIN``:
a source 20x larger than its need is prepared in two waves, about a file past what it needs. The first waves of
all sources run together, and so do the second waves of every source still short of its need (each wave starts
the executor's worker processes anew, a few seconds).

With ``reweight`` (and no dedup), a job also records every document it read, kept by the filters or not: its sparse
embedding (``embedding.idx`` / ``embedding.val``), the filters' decision and its characters (``reweight.npz``); the
build replays the filters' batches over these records (:func:`llmft.data.build.reading._engine_reweighted`), so its
reweighting sees the same documents in the same batches as when it reads them itself.

A malformed record under ``on_error: stop`` makes its job write an error, which the build raises (a
:class:`llmft.data.sources.DataError` naming the file and line) once the wave ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from transformers import PreTrainedTokenizerBase

from llmft.config.data import MixRecipe, executor_class
from llmft.data.decontam import DecontamReport, TargetReport
from llmft.data.dedup import Features
from llmft.data.filters import FilterTally
from llmft.data.packing import Example
from llmft.data.sources import DataError, SourceError, SourceReport
from llmft.data.units import UnitSpill

log = logging.getLogger(__name__)

WAVE_MARGIN = 1.1  # a later wave of a sampled source covers its missing tokens at the measured bytes per token + 10%
FIRST_WAVE_BYTES_PER_TOKEN = 2.0  # the first wave's guess, below what BPE vocabularies give on text
POLL_SECONDS = 5  # how often the build looks for a cluster's finished jobs
LOCAL_POLL_SECONDS = 0.02  # and for a local wave's
TASKS_PER_WORKER = 4  # a local wave's files are split into this many tasks per worker (files_per_task unset)
WAIT_LOG_SECONDS = 300  # and how often it logs what it is waiting for


@dataclass(frozen=True)
class FileJob:
    """One file of one source: source ``k``'s ``j``-th file in its reading order."""

    k: int
    j: int
    path: str


@dataclass
class Prepared:
    """A document the engine has cleaned, transformed and tokenized: its tokens and its characters (after UL2)."""

    example: Example
    chars: int
    meta: dict = field(default_factory=dict)  # with reweight: the build's index of it among the kept documents


class _FileDecontamReport(DecontamReport):
    """A job's decontamination counts: hits per target kept by the target's position, to add to the build's."""

    def __init__(self, targets: list[TargetReport]):
        super().__init__()
        self._positions = {id(t): i for i, t in enumerate(targets)}
        self.target_hits: dict[int, dict[str, int]] = {}

    def _count(self, source: str, entry: TargetReport | None, k: int = 1) -> None:
        super()._count(source, None, k)
        if entry is not None:
            hits = self.target_hits.setdefault(self._positions[id(entry)], {})
            hits[source] = hits.get(source, 0) + k


_DECONTAMINATORS: dict[str, tuple] = {}  # one index per process (the tasks a worker runs share it)


def _decontaminator(mix: MixRecipe) -> tuple:
    from llmft.data.build.reading import _decontaminator as make

    key = json.dumps(mix.decontaminate.model_dump(mode="json") if mix.decontaminate else None)
    if key not in _DECONTAMINATORS:
        _DECONTAMINATORS.clear()
        _DECONTAMINATORS[key] = make(mix)
    return _DECONTAMINATORS[key]


def prepare_file(mix: MixRecipe, job: FileJob, tokenizer: PreTrainedTokenizerBase, seq_len: int, root: Path) -> None:
    """Read, clean, filter, transform and tokenize one file into ``root/<k>/<j>/`` (nothing if already there); with
    dedup also its documents' scan records and features. A malformed record under on_error: stop ends the file
    there, its message in the report (the build raises it).

    Raises:
        OSError: the output cannot be written.
    """
    from llmft.data.build import common
    from llmft.data.build.reading import _clean, _filtered, _Reading, _text, doc_rng
    from llmft.data.build.tokenizing import _encode, _Tokenize
    from llmft.data.dedup import Shingler
    from llmft.data.dedup import features as dedup_features
    from llmft.data.packing import special_ids
    from llmft.data.transforms import ul2

    final = root / str(job.k) / str(job.j)
    if (final / "report.json").is_file():  # an earlier attempt of this task finished it
        return
    tmp = root / str(job.k) / f".{job.j}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = mix.sources[job.k]
    decon, build_report = _decontaminator(mix)
    decon_report = _FileDecontamReport(build_report.targets)
    reading = _Reading(None, SourceReport(), {"decontaminated": 0, "filtered": 0}, [Path(job.path)],
                       FilterTally(mix.filters) if mix.filters and mix.reweight is None else None)
    docs = _clean(src, mix, decon, decon_report, reading)
    embedded = None
    if mix.reweight is not None:  # filtered here too, every document embedded for the build's probe
        reading.tally = FilterTally(mix.filters)
        embedded = _Embedded(mix, tmp)
        docs = _filtered(embedded.counting(docs), src, mix, reading, embedded)
    tokenize = _Tokenize(tokenizer, seq_len, mix.add_eos)
    spill = UnitSpill(tmp / "docs", len(tokenizer))
    chars = array("q")
    # with dedup, per document as the scan sees it (before UL2): its position among the file's documents, its
    # characters, its tokens without special tokens (the report's tokens removed), and its features in chunks
    scan = {"raw": array("q"), "chars": array("q"), "plain": array("q")}
    shingler = Shingler(mix.dedup.shingle_size) if mix.dedup else None
    specials = sum(map(len, special_ids(tokenizer, mix.add_eos)))
    batch, seen, size, chunks = [], [], 0, 0
    error = None

    def flush() -> None:
        nonlocal chunks
        examples = tokenize((src.transform, batch))
        for e in examples:
            spill.append(e.tokens, e.loss_mask)
        if shingler is None:
            return
        texts = [_text(d) for _, d in seen]
        if src.transform == "none" and not any(d.prompt or d.messages is not None for _, d in seen):  # BOS text EOS
            scan["plain"].extend(len(e) - specials for e in examples)
        else:
            scan["plain"].extend(len(ids) for ids in _encode(tokenizer, texts))
        feats = dedup_features(texts, mix.dedup, shingler)
        np.savez(tmp / f"features-{chunks}.npz", **{k: v for k, v in vars(feats).items()
                                                    if isinstance(v, np.ndarray)})
        (tmp / f"features-{chunks}.json").write_text(json.dumps({"excerpts": feats.excerpts,
                                                                 "where": [d.where for _, d in seen]}))
        chunks += 1

    try:
        for raw, doc in docs:
            if shingler is not None:
                seen.append((raw, doc))
                scan["raw"].append(raw)
                scan["chars"].append(len(_text(doc)))
            if src.transform == "ul2":
                doc = ul2(doc, doc_rng(mix.seed, job.k, doc.where), src.ul2)
            batch.append(doc)
            chars.append(len(doc.text) + len(doc.prompt))
            size += chars[-1]
            if len(batch) == common.TOKENIZE_BATCH or size >= common.TOKENIZE_BATCH_CHARS:
                flush()
                batch, seen, size = [], [], 0
        if batch:
            flush()
    except (SourceError, DataError) as e:
        error = str(e)
    spill.seal()
    if embedded is not None:
        embedded.seal()
    np.save(tmp / "chars.npy", np.frombuffer(chars, np.int64))
    if shingler is not None:
        np.savez(tmp / "scan.npz", chunks=np.int64(chunks), **{k: np.frombuffer(v, np.int64) for k, v in scan.items()})
    tally = reading.tally
    report = {"error": error, "source": asdict(reading.report), "stats": reading.stats,
              "tally": None if tally is None else {"documents": tally.documents, "removed": tally.removed,
                                                   "report": tally.report},
              "decontam": {k: v for k, v in asdict(decon_report).items() if k != "targets"}
              | {"target_hits": decon_report.target_hits}}
    (tmp / "report.json").write_text(json.dumps(report))
    try:
        tmp.rename(final)
    except OSError:  # another attempt finished first
        if not (final / "report.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


class _Embedded:
    """A job's record for the build's reweighting (the ``filters``' :func:`llmft.data.build.reading._filtered` calls
    :meth:`add` as a :class:`llmft.data.reweight.ReweightStream`): every document's sparse embedding, appended to
    ``embedding.idx`` / ``embedding.val``, and in ``reweight.npz`` its entries, the filters' decision and its
    characters as the filters' batching counts them, so that the build can replay the batches."""

    def __init__(self, mix: MixRecipe, folder: Path):
        from llmft.data.dedup import Shingler

        self.cfg, self.folder = mix.reweight, folder
        self.kept = 0
        self.keep, self.counts, self.chars = array("b"), array("q"), array("q")
        self._shingler = Shingler(self.cfg.shingle_size) if self.cfg.embedder == "hashed" else None
        self._idx = open(folder / "embedding.idx", "wb")  # noqa: SIM115 (closed by seal)
        self._val = open(folder / "embedding.val", "wb")  # noqa: SIM115

    def counting(self, docs: Iterator[tuple]) -> Iterator[tuple]:
        """``docs`` passed through, each document's characters recorded as the filters' batching counts them."""
        for raw, doc in docs:
            self.chars.append(len(doc.text) + len(doc.prompt))
            yield raw, doc

    def add(self, texts: list[str], keep: np.ndarray) -> None:
        from llmft.data.reweight import sparse_embedding

        indices, values, counts = sparse_embedding(texts, self.cfg, self._shingler)
        self._idx.write(memoryview(np.ascontiguousarray(indices, np.int32)).cast("B"))
        self._val.write(memoryview(np.ascontiguousarray(values, np.float32)).cast("B"))
        self.counts.extend(counts.tolist())
        self.keep.extend(np.asarray(keep, np.int8).tolist())
        self.kept += int(np.count_nonzero(keep))

    def seal(self) -> None:
        self._idx.close()
        self._val.close()
        n = len(self.keep)  # (a malformed record under stop ends the file: the documents before it)
        np.savez(self.folder / "reweight.npz", keep=np.frombuffer(self.keep, np.int8),
                 counts=np.frombuffer(self.counts, np.int64), chars=np.frombuffer(self.chars, np.int64)[:n])


class PrepareFiles(PipelineStep):
    """The datatrove step: task ``rank`` prepares jobs ``rank * files_per_task`` to the next ``files_per_task``."""

    name = "llmft: read, clean, filter, tokenize"
    type = "🔢 - TOKENIZER"

    def __init__(self, mix: MixRecipe, tokenizer: PreTrainedTokenizerBase, seq_len: int, root: str,
                 jobs: list[FileJob], files_per_task: int):
        super().__init__()
        self.mix, self.tokenizer, self.seq_len, self.root = mix, tokenizer, seq_len, root
        self.jobs, self.files_per_task = jobs, files_per_task

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for job in self.jobs[rank * self.files_per_task: (rank + 1) * self.files_per_task]:
            try:
                with self.track_time():
                    prepare_file(self.mix, job, self.tokenizer, self.seq_len, Path(self.root))
            except Exception as e:  # the build, waiting for this file's output, stops with this message
                failed = Path(self.root) / str(job.k) / f"{job.j}.failed"
                failed.write_text(f"{job.path}: {type(e).__name__}: {e}")
                raise
            self.stat_update("files")
        yield from ()


class FileOutput:
    """One prepared file: its documents (read back one at a time), its counts, and with dedup each document's scan
    record (``raw``: position among the file's documents, ``scan_chars``, ``plain``: tokens without special tokens)
    and dedup features, in chunks."""

    def __init__(self, folder: Path, vocab_size: int):
        self.folder = folder
        self.report = json.loads((folder / "report.json").read_text())
        self.chars = np.load(folder / "chars.npy")
        self.spill = UnitSpill.load(folder / "docs", vocab_size)
        if (folder / "scan.npz").is_file():
            with np.load(folder / "scan.npz") as scan:
                self.raw, self.scan_chars, self.plain = scan["raw"], scan["chars"], scan["plain"]
                self.chunks = int(scan["chunks"])

    def documents(self, remove: bool = True) -> Iterator[Prepared]:
        """The documents in order; ``remove``: delete the file's tokens once read (when nothing reads them again)."""
        try:
            for i in range(len(self.spill)):
                yield Prepared(self.spill[i], int(self.chars[i]))
        finally:
            if remove:
                self.spill.remove()
            else:
                self.spill.release()

    def reweighting(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """With reweight, every document the job read (kept by the filters or not), in order: (the filters'
        decision (n,) bool, its characters as the filters' batching counts them (n,), its embedding's offsets
        (n + 1,) into :meth:`embedding`)."""
        with np.load(self.folder / "reweight.npz") as r:
            offsets = np.zeros(len(r["counts"]) + 1, np.int64)
            np.cumsum(r["counts"], out=offsets[1:])
            return r["keep"].astype(bool), r["chars"], offsets

    def embedding(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Entries ``start`` to ``end`` of the documents' embeddings: (indices int32, values float32)."""
        return (np.fromfile(self.folder / "embedding.idx", np.int32, end - start, offset=4 * start),
                np.fromfile(self.folder / "embedding.val", np.float32, end - start, offset=4 * start))

    def features(self, chunk: int) -> tuple[Features, list[str]]:
        """Chunk ``chunk``'s dedup features and its documents' locations."""
        notes = json.loads((self.folder / f"features-{chunk}.json").read_text())
        with np.load(self.folder / f"features-{chunk}.npz") as f:
            arrays = {k: f[k] for k in f.files}
        return Features(**{"signatures": None, "embeddings": None} | arrays, excerpts=notes["excerpts"]), \
            notes["where"]


class EngineRun:
    """The engine's jobs for one build: runs waves of them and hands out each file's output in reading order.

    Args:
        mix: the recipe (its ``engine`` section set).
        tokenizer, seq_len: as the build's.
        root: the folder for the jobs' outputs (in the build's staging directory).
        logs: datatrove's logging folder (a ``wave-N`` folder per wave: each task's log and stats), emptied first;
            kept after the build, so that a failed task's log can be read.
        files: per source index the engine prepares, its local files in reading order.
        needs: per source index, the training tokens its share needs (None: read whole).
    """

    def __init__(self, mix: MixRecipe, tokenizer: PreTrainedTokenizerBase, seq_len: int, root: Path, logs: Path,
                 files: dict[int, list[Path]], needs: list[int | None]):
        self.mix, self.tokenizer, self.seq_len, self.root, self.logs = mix, tokenizer, seq_len, root, logs
        shutil.rmtree(logs, ignore_errors=True)
        self.files, self.needs = files, needs
        self.started: dict[int, int] = {k: 0 for k in files}  # files of each source given to a wave so far
        self.bytes_prepared = {k: 0 for k in files}
        self.tokens_prepared = {k: 0 for k in files}  # tokens of the documents its prepared files kept
        self.waves = 0
        self._jobs: list[FileJob] = []  # the wave in flight
        self._counted: set[tuple[int, int]] = set()  # files complete, their tokens in tokens_prepared
        self._thread: threading.Thread | None = None  # running a local wave
        self._error: str | None = None
        self._logs, self._t0 = logs, 0.0
        root.mkdir(parents=True, exist_ok=True)
        self._run([job for k in files for job in self._wave(k)])

    def _short(self, k: int) -> bool:
        """Whether sampled source ``k`` has more files and its prepared ones hold fewer tokens than it needs."""
        return (self.needs[k] is not None and self.started[k] < len(self.files[k])
                and self.tokens_prepared[k] < self.needs[k] / (1 - self.mix.validation_fraction))

    def _wave(self, k: int) -> list[FileJob]:
        """The next files of source ``k`` to prepare (see the module docstring): at least one."""
        files, start = self.files[k], self.started[k]
        if self.needs[k] is None:
            end = len(files)
        else:
            missing = max(1.0, self.needs[k] / (1 - self.mix.validation_fraction) - self.tokens_prepared[k])
            per_token = (self.bytes_prepared[k] / self.tokens_prepared[k] * WAVE_MARGIN if self.tokens_prepared[k]
                         else FIRST_WAVE_BYTES_PER_TOKEN)
            budget, end = missing * per_token, start
            while end < len(files) and budget > 0:
                budget -= files[end].stat().st_size
                end += 1
        self.started[k] = min(len(files), max(end, start + 1))
        return [FileJob(k, j, str(files[j])) for j in range(start, self.started[k])]

    def _run(self, jobs: list[FileJob]) -> None:
        """Start one wave of jobs on the executor, after the previous wave has ended. A local wave runs in a thread,
        so the build takes each file as soon as it is prepared; a cluster executor returns once it has submitted.

        Raises:
            DataError: the previous wave failed.
        """
        self.close()
        if not jobs:
            return
        engine = self.mix.engine
        self.waves += 1
        workers = engine.workers or (self.mix.num_proc if engine.executor == "local" else -1)
        per = engine.files_per_task or (math.ceil(len(jobs) / (TASKS_PER_WORKER * workers))
                                        if engine.executor == "local" else 1)
        tasks = math.ceil(len(jobs) / per)
        log.info("data engine: wave %d: %d files of %d sources in %d %s tasks", self.waves, len(jobs),
                 len({j.k for j in jobs}), tasks, engine.executor)
        step = PrepareFiles(self.mix, self.tokenizer, self.seq_len, str(self.root), jobs, per)
        kwargs = dict(engine.options)
        if engine.executor == "local":
            kwargs.setdefault("start_method", "spawn")  # the Rust tokenizer's threads do not survive a fork
        self._logs = self.logs / f"wave-{self.waves}"
        executor = executor_class(engine.executor)(pipeline=[step], tasks=tasks, workers=workers,
                                                   logging_dir=str(self._logs), **kwargs)
        for job in jobs:
            (self.root / str(job.k)).mkdir(exist_ok=True)
            self.bytes_prepared[job.k] += Path(job.path).stat().st_size
        self._jobs, self._t0, self._error = jobs, time.perf_counter(), None
        if engine.executor != "local":
            self._submit(executor)
            return
        self._thread = threading.Thread(target=self._submit, args=(executor,), name=f"engine-wave-{self.waves}",
                                        daemon=True)
        self._thread.start()

    def _submit(self, executor) -> None:
        try:
            executor.run()
        except Exception as e:  # a local task's error, raised again here: the build raises it where it waits
            self._error = f"the data engine's wave failed ({type(e).__name__}: {e}); see the task logs in {self._logs}"

    def _wait(self, job: FileJob) -> None:
        """Wait until ``job``'s output is complete.

        Raises:
            DataError: its task failed, or a local wave ended without it.
        """
        said = time.perf_counter()
        if (job.k, job.j) in self._counted:
            return
        while not (self._folder(job) / "report.json").is_file():
            failed = self.root / str(job.k) / f"{job.j}.failed"
            if failed.is_file():
                raise DataError(f"the data engine's task failed: {failed.read_text()} (its log is in "
                                f"{self._logs}/logs)")
            if self._thread is not None and not self._thread.is_alive() \
                    and not (self._folder(job) / "report.json").is_file():
                raise DataError(self._error or f"the data engine's task for {job.path} ended without its output; "
                                f"see the task logs in {self._logs}")
            if self._thread is None and time.perf_counter() - said > WAIT_LOG_SECONDS:
                said = time.perf_counter()
                log.info("data engine: waiting for %s (wave %d); if its task failed before it started, its "
                         "scheduler log is under %s", job.path, self.waves, self._logs)
            time.sleep(LOCAL_POLL_SECONDS if self._thread is not None else POLL_SECONDS)
        with np.load(self._folder(job) / "docs.index.npz") as index:  # (before the build reads and removes it)
            self.tokens_prepared[job.k] += int(index["lengths"].sum())
        self._counted.add((job.k, job.j))

    def close(self, quiet: bool = False) -> None:
        """Wait for the wave in flight to end (every file it was given), and count its files' tokens; ``quiet``:
        only wait for a local wave's thread (the build is ending on another error).

        Raises:
            DataError: one of its tasks failed.
        """
        if quiet:
            if self._thread is not None:
                self._thread.join()
            return
        if not self._jobs:
            return
        from llmft.data.build.common import _progress

        jobs, self._jobs = self._jobs, []
        with _progress(f"data engine: wave {self.waves}", len(jobs), unit="file") as progress:
            for job in jobs:
                self._wait(job)
                progress.update()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        log.info("data engine: wave %d done in %.1f s", self.waves, time.perf_counter() - self._t0)

    def _folder(self, job: FileJob) -> Path:
        return self.root / str(job.k) / str(job.j)

    def output(self, k: int, j: int) -> FileOutput:
        """File ``j`` of source ``k``, prepared (by a new wave if it is not yet).

        Raises:
            DataError: as :meth:`_run`, or the job's malformed record under on_error: stop.
        """
        if j >= self.started[k]:  # with the next files of every other source that will need more
            self.close()  # (its counts size the next wave)
            while j >= self.started[k]:
                self._run(self._wave(k) + [job for i in self.files if i != k and self._short(i)
                                           for job in self._wave(i)])
        self._wait(FileJob(k, j, str(self.files[k][j])))
        out = FileOutput(self.root / str(k) / str(j), len(self.tokenizer))
        if out.report["error"]:
            raise DataError(out.report["error"])
        return out
