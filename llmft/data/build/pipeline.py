from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase  # (AutoTokenizer imports torch: where it is used)

from llmft.config.data import MixRecipe
from llmft.config.sources import SourceSpec, list_files
from llmft.data.build import common
from llmft.data.build.common import CHECKPOINT, _progress
from llmft.data.build.curate import _Dedup, _write_dedup_report
from llmft.data.build.output import Built, _histogram, _int_lists, _plot, _publish, _strings, load_built
from llmft.data.build.reading import (
    _decontaminator,
    _engine_docs,
    _engine_reweighted,
    _filtered,
    _prepared_examples,
    _Reading,
    _sampling,
    _start_reading,
    doc_rng,
)
from llmft.data.build.tokenizing import _Tokenize, _tokenizer_pool
from llmft.data.engine import EngineRun, Prepared
from llmft.data.filters import FilterTally, merge_reports, release_scoring_models
from llmft.data.filters import report_markdown as filters_markdown
from llmft.data.packing import Example, pack_stream
from llmft.data.reweight import ReweightStream
from llmft.data.sources import DataError, SourceError, SourceReport, read_source
from llmft.data.store import RowStore, StoreWriter
from llmft.data.transforms import ul2
from llmft.data.units import UnitSpill

log = logging.getLogger(__name__)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary and special tokens: equal hashes encode text the same way."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()[:16]


def fingerprint(mix: MixRecipe, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> str:
    """Hash of everything the build output depends on."""
    h = hashlib.sha256()
    resolved = mix.model_dump(mode="json", exclude={"num_proc", "engine"})
    h.update(json.dumps({"v": common.FORMAT_VERSION, "mix": resolved, "seq_len": seq_len,
                         "tokenizer": tokenizer_hash(tokenizer)}, sort_keys=True).encode())
    inputs = [f for spec in [*(s.source for s in mix.sources), *mix.validation_sources] for f in list_files(spec)]
    if mix.decontaminate:
        for t in mix.decontaminate.targets:
            inputs += sorted(p for p in t.rglob("*") if p.is_file()) if t.is_dir() else [t]
    for f in inputs:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


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
            elif len(batch) == common.TOKENIZE_BATCH or size >= common.TOKENIZE_BATCH_CHARS:
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
        while batch := [d for _, d in zip(range(common.TOKENIZE_BATCH), docs)]:
            yield "none", batch

    try:
        parts = [e.tokens for examples in tokenize(batches()) for e in examples]
    except SourceError as e:
        raise DataError(str(e)) from None
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def _select(lengths: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of whole passes over the units of ``lengths`` plus a random part-pass, until ``target`` tokens
    (overshoot < one unit)."""
    available = int(lengths.sum())
    full = int(target // available)
    remainder = target - full * available
    order = rng.permutation(len(lengths))
    part = 0 if remainder <= 0 else min(len(order), int(np.searchsorted(np.cumsum(lengths[order]), remainder)) + 1)
    return np.concatenate([np.tile(np.arange(len(lengths)), full), order[:part]])


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
                                                       common.PACK_WINDOW_TOKENS, weights=reweighted):
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


def build_from_recipe(mix: MixRecipe, out: Path, seq_len: int, tokenizer_name: str, force: bool = False,
                      load_rows: bool = True) -> Built:
    """Load the tokenizer by name and build."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return build(mix, out, tok, seq_len, force=force, load_rows=load_rows)
