"""The training loop. Read it top to bottom: setup, resume, then one ``for step`` loop that owns forward,
backward, accumulation, clipping, logging, evaluation and checkpoints.

The same function runs as one plain process (``python launch/train.py recipe.yaml``) and as every rank of a
DeepSpeed job (``deepspeed launch/train.py recipe.yaml``).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

from llmft.atomic import publish_dir
from llmft.config import Recipe, RecipeError, load_recipe, recipe_to_yaml
from llmft.data.loader import PackedLoader
from llmft.data.sources import DataError
from llmft.eval.ppl import perplexity_by_length
from llmft.model.load import DTYPES, build_model, count_parameters
from llmft.summary import run_summary
from llmft.train import checkpoint as ckpt
from llmft.train import sequence_parallel
from llmft.train.engine import DeepSpeedEngine, PlainEngine, deepspeed_config, join_process_group, launched_by_deepspeed
from llmft.train.loss import step_divisor
from llmft.train.metrics import MetricsLogger
from llmft.train.spikes import SpikeDetector
from llmft.train.stop import Diverged, Preempted, StopSignals

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    resumed_from: int
    losses: list[float]  # per optimizer step of this process's run (after resume: only the new steps)
    model: torch.nn.Module  # the trained in-memory model (fp32 master weights)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(recipe: Recipe, resume: bool = True) -> TrainResult:
    """Train as the recipe says; resume from the newest complete checkpoint in ``checkpoint.dir`` if any.

    Raises:
        ModelLoadError: the model cannot be loaded (the launcher prints it as one line, exit 2).
        DataError: the data cannot be read or built, or a resume changes the number of ranks (exit 2).
        RecipeError: a built data directory or mix does not match the model, or ``parallel.sequence`` does not fit
            the launch or the model (exit 2).
        Preempted: a stop signal arrived; a checkpoint was written (exit 143, resumable).
        Diverged: too many non-finite steps in a row (exit 3, last good state saved).
    """
    procs = _setup_processes(recipe)
    rank, world, distributed, run_dir = procs.rank, procs.world, procs.distributed, procs.run_dir
    ds_config = deepspeed_config(recipe, world) if distributed else None
    built, model, base_params, sp = _setup_model(recipe, ds_config)
    tokenizer, lora = built.tokenizer, recipe.adapter
    seq_len, t = recipe.model.max_seq_len, recipe.train
    built_data = _training_data(recipe, tokenizer, run_dir / "data", rank, distributed)
    rows, val_tokens = built_data.rows, built_data.validation_tokens
    # the ranks of a sequence-parallel group read the same rows: data-parallel shard rank // parallel.sequence
    dp_world = recipe.data_parallel_size(world)
    data = PackedLoader(rows, t.micro_batch_size, seed=t.seed, rank=rank // recipe.parallel.sequence,
                        world_size=dp_world)
    total_steps = recipe.total_steps(world)
    tokens_per_step = recipe.tokens_per_step(world)
    engine = _setup_engine(recipe, model, built, total_steps, ds_config, rows.mode == "isolated", sp)

    # ---- resume -----------------------------------------------------------------------------------------
    start_step, tokens_seen, wandb_id = 0, 0, None
    spikes = SpikeDetector(recipe.train.spike_factor, recipe.train.spike_window)
    latest = ckpt.latest_complete(run_dir) if resume else None
    if latest is not None:
        engine.load(latest / "state")
        trainer = ckpt.load_trainer_state(latest / "state", rank)
        if str(rank) not in trainer["data"] or len(trainer["data"]) != world:
            raise DataError(f"{latest} was written by {len(trainer['data'])} ranks; resume with the same number "
                            "of processes, or start fresh with --no-resume")
        data.load_state_dict(trainer["data"][str(rank)])
        start_step, tokens_seen, wandb_id = trainer["step"], trainer["tokens_seen"], trainer.get("wandb_id")
        spikes.load_state_dict(trainer.get("spike_window", []))
    elif not resume and rank == 0 and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")

    if rank == 0:
        lines = run_summary(recipe, run_dir, world, distributed, engine, built, base_params, built_data, latest)
        print("\n".join("[llmft] " + line for line in lines), flush=True)
    metrics = MetricsLogger(run_dir, recipe, rank, start_step, wandb_id)

    # ---- the loop ---------------------------------------------------------------------------------------
    losses: list[float] = []
    # a live bar on a terminal; plain log lines (one per logging step) in files and CI logs
    interactive = rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=start_step, disable=not interactive, desc="train", unit="step",
               dynamic_ncols=True)
    signals = StopSignals().install()  # SIGTERM/SIGINT: finish the step, checkpoint, exit 75
    bad_steps, saved_at = 0, time.monotonic()
    try:
        engine.model.train()
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            micro_batches = [data.next_batch() for _ in range(t.gradient_accumulation_steps)]
            # token-weighted mean over the whole step: each token counts once, whatever micro-batch it is in
            # (with per-token loss weights: Σ w·nll / Σ w, a weight of 2 counts exactly as two copies of the example)
            num_tokens = step_divisor(micro_batches)
            if distributed:  # over the tokens of all ranks: DeepSpeed sums the ranks' gradients and divides by the
                # data-parallel size, so each rank divides by (global count / data-parallel size) and the step is
                # Σ_all w·nll / Σ_all w, not a mean of ratios. Under sequence parallelism the N ranks of a group
                # count the same (whole) rows: the sum over the world is N x the count, and world / N = dp size.
                total = torch.tensor([float(num_tokens)], dtype=torch.float64, device=engine.device)
                dist.all_reduce(total)
                num_tokens = float(total) / world
            if num_tokens == 0:  # only prompts/padding: the loss is 0 and so is the gradient (no 0/0)
                log.warning("step %d has no trained tokens (only prompts or padding)", step + 1)
                num_tokens = 1
            lr = engine.lr  # the lr this step's update uses
            loss_sum = torch.zeros(())
            for batch in micro_batches:
                loss = engine.forward(batch, num_tokens)
                engine.backward(loss)
                loss_sum += loss.detach().float().cpu()
            grad_norm = engine.step()  # plain engine: skips the update when the gradient is not finite
            step_loss = float(loss_sum)
            if distributed:  # Σ over ranks / dp size (= Σ_all w·nll / Σ_all w, as divided above), for the log only
                reduced = torch.tensor([step_loss], device=engine.device)
                dist.all_reduce(reduced)
                step_loss = float(reduced) / dp_world
            losses.append(step_loss)
            tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - t0
            done = step + 1
            spike_median = spikes.update(step_loss)  # a warning only (non-finite losses are the NaN guard's)
            if spike_median is not None and rank == 0:
                log.warning("step %d: loss spike, %.4f is %.1fx the median %.4f of the previous %d steps", done,
                            step_loss, step_loss / spike_median, spike_median, recipe.train.spike_window)
            progress = {"step": done, "tokens_seen": tokens_seen, "wandb_id": metrics.wandb_id,
                        "spike_window": spikes.state_dict()}  # what a checkpoint of this step records
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            bad_steps = 0 if finite else bad_steps + 1
            if not finite:
                _non_finite_step(engine, built, recipe, run_dir, progress, data, metrics, rank, bad_steps,
                                 distributed)

            if done % recipe.logging.every_steps == 0 or done == total_steps:
                row = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                       "tokens_per_second": tokens_per_step / elapsed, "epoch": data.epoch,
                       **({} if finite else {"skipped": True}), **({} if spike_median is None else {"spike": True})}
                metrics.log(done, row)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
                if rank == 0 and not interactive:
                    print(f"[llmft] step {done}/{total_steps} loss {step_loss:.4f} lr {lr:.2e} grad_norm "
                          f"{grad_norm:.3f} tok/s {tokens_per_step / elapsed:,.0f}", flush=True)
            bar.update(1)

            ev = recipe.eval
            if ev.every_steps and (done % ev.every_steps == 0 or (ev.at_end and done == total_steps)):
                # every rank runs the same windows (ZeRO-3 needs all ranks in each forward), split over the ranks
                # of a sequence-parallel group as in training; rank 0 logs
                with engine.autocast():  # the precision training runs in (flash-attn takes only bf16/fp16)
                    results = perplexity_by_length(engine.model, val_tokens, ev.lengths or [seq_len],
                                                   ev.max_windows, device=engine.device,
                                                   window_nll=sp.window_nll if sp is not None else None)
                    metrics.log(done, {f"eval/ppl@{n}": r["ppl"] for n, r in results.items()})
                    if ev.passkey is not None:
                        passkey = _passkey_metrics(engine, tokenizer, ev.passkey, seq_len, recipe.train.seed + done)
                        metrics.log(done, passkey)
                    if ev.ruler is not None:
                        metrics.log(done, _ruler_metrics(engine, tokenizer, ev.ruler, seq_len, recipe.train.seed))
                engine.model.train()

            every, minutes = recipe.checkpoint.every_steps, recipe.checkpoint.every_minutes
            timed = bool(minutes) and time.monotonic() - saved_at > 60 * minutes
            due = torch.tensor([float(signals.requested), float(timed)], device=engine.device)
            if distributed:  # every rank stops (and checkpoints) at the same step
                dist.all_reduce(due, op=dist.ReduceOp.MAX)
            preempt, timed = bool(due[0]), bool(due[1])
            if done < total_steps and ((every and done % every == 0) or timed or preempt):
                _save_checkpoint(engine, built, recipe, run_dir, progress, data, rank)
                saved_at = time.monotonic()
            if preempt and done < total_steps:
                metrics.close()
                where = run_dir / "checkpoints" / ckpt.step_dir_name(done)
                raise Preempted(f"stopped by a signal after step {done}/{total_steps}; checkpoint {where} written. "
                                "Re-run the same command to resume")
        bar.close()
    finally:
        signals.restore()

    # ---- final export -----------------------------------------------------------------------------------
    final_dir = run_dir / "final"
    state = engine.full_state_dict() if lora is None else engine.trainable_state_dict()
    if rank == 0:
        with publish_dir(final_dir) as tmp:  # a reader sees the old final model or the new one, never half of one
            _export(tmp, engine, state, tokenizer, recipe)
        print(f"[llmft] final model written to {final_dir}", flush=True)
    engine.close()
    metrics.close()
    return TrainResult(run_dir, final_dir, total_steps, start_step, losses, engine.model)


@dataclass
class _Processes:
    distributed: bool  # launched by deepspeed: one rank of a process group
    rank: int
    world: int
    run_dir: Path


def _setup_processes(recipe: Recipe) -> _Processes:
    """Join the process group (under the deepspeed launcher), seed this rank, and create the run directory with
    the resolved recipe in it (rank 0).

    Raises:
        RecipeError: ``parallel.sequence`` cannot run on this launch (plain python, or a world it does not divide).
    """
    distributed = launched_by_deepspeed()
    if distributed:
        join_process_group()
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    sequence_parallel.check_launch(recipe, world, distributed)
    seed_everything(recipe.train.seed + rank)
    run_dir = Path(recipe.checkpoint.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    return _Processes(distributed, rank, world, run_dir)


def _setup_model(recipe: Recipe, ds_config: dict | None):
    """(the built model, the model to train, the base's parameter count, the sequence-parallel setup or None):
    the ``model`` section's model, 4-bit for QLoRA, with LoRA adapters for ``method: lora | qlora``, its attention
    wrapped in DeepSpeed's Ulysses attention for ``parallel.sequence`` > 1. Under ZeRO-3 the weights are
    partitioned as they load (``zero.Init``), and only while this runs.

    Raises:
        ModelLoadError: the model cannot be loaded.
        RecipeError: the model's heads or attention kernel do not allow ``parallel.sequence``.
    """
    zero3_init = None
    if ds_config is not None and recipe.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_init = HfDeepSpeedConfig(ds_config)  # from_pretrained partitions weights as it loads (zero.Init)
    built = build_model(recipe.model, seed=recipe.train.seed, dtype=torch.float32, qlora=recipe.qlora,
                        precision=recipe.train.precision)
    model = built.model
    base_params = count_parameters(model)[1]
    if recipe.adapter is not None:
        from llmft.model.adapters import apply_lora, prepare_quantized  # imports peft: only for LoRA runs

        if recipe.method == "qlora":  # norms etc. to fp32, input grads on, checkpointing as the recipe says
            model = prepare_quantized(model, recipe.model)
        model = apply_lora(model, recipe.adapter)  # freezes the base; adapters (+ trainable_extra copies) train
    if zero3_init is not None:  # later from_pretrained calls (e.g. on rank 0 only) must not enter zero.Init
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    sp = sequence_parallel.setup(model, recipe, built.attention)
    return built, model, base_params, sp


def _setup_engine(recipe: Recipe, model, built, total_steps: int, ds_config: dict | None, isolated: bool, sp):
    """The engine that runs forward, backward and the optimizer step: DeepSpeed (ZeRO, from the ``deepspeed``
    section; sequence parallelism with ``sp``) under the deepspeed launcher, else plain PyTorch on CUDA when there
    is one, else on the CPU."""
    if ds_config is not None:
        return DeepSpeedEngine(model, recipe, total_steps, ds_config, built.attention, isolated, sp)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return PlainEngine(model, recipe, total_steps, device, built.attention, isolated)


def _non_finite_step(engine, built, recipe: Recipe, run_dir: Path, progress: dict, data, metrics: MetricsLogger,
                     rank: int, bad_steps: int, distributed: bool) -> None:
    """A step whose loss or gradient is not finite: warn; stop once ``train.max_bad_steps`` happened in a row.

    The plain engine skipped the update, so the weights are still the last good ones: they are checkpointed before
    stopping. DeepSpeed has already applied it (bf16/fp32 ZeRO has no overflow check): stop at once; the newest
    checkpoint is the last good state.

    Raises:
        Diverged: too many non-finite steps in a row, or one under DeepSpeed.
    """
    step = progress["step"]
    if rank == 0:
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row; the run stops at %d)", step,
                    bad_steps, recipe.train.max_bad_steps)
    if distributed:
        metrics.close()
        raise Diverged(f"step {step}: non-finite loss or gradient under DeepSpeed, which has applied it; resume "
                       "from the newest checkpoint with a lower train.lr, or check the data around this step")
    if bad_steps >= recipe.train.max_bad_steps:
        _save_checkpoint(engine, built, recipe, run_dir, progress, data, rank)
        metrics.close()
        raise Diverged(f"{bad_steps} steps in a row (to step {step}) had a non-finite loss or gradient and were "
                       f"skipped; the last good weights are in {run_dir / 'checkpoints' / ckpt.step_dir_name(step)}. "
                       "Fix: lower train.lr, set train.grad_clip, or check the data around these steps")


def _passkey_metrics(engine, tokenizer, cfg, seq_len: int, seed: int) -> dict[str, float]:
    """Passkey accuracy per length (every rank runs the same prompts: ZeRO-3 needs all ranks in each forward)."""
    from llmft.eval.passkey import run_passkey

    res = run_passkey(engine.model, tokenizer, cfg.lengths or [seq_len], cfg.depths, cfg.trials, seed=seed,
                      device=engine.device, progress=False)
    out = {}
    for length in res["lengths"]:
        cells = [c for c in res["cells"] if c["length"] == length and c["accuracy"] is not None]
        if cells:
            out[f"eval/passkey@{length}"] = sum(c["correct"] for c in cells) / sum(c["trials"] for c in cells)
    for reason in sorted({c["reason"] for c in res["cells"] if c["reason"]}):
        log.warning("eval.passkey: %s", reason)
    return out


def _ruler_metrics(engine, tokenizer, cfg, seq_len: int, seed: int) -> dict[str, float]:
    """RULER scores per task and length and their average (the same prompts at every evaluation, so the numbers
    compare across steps; every rank runs them: ZeRO-3 needs all ranks in each forward)."""
    from llmft.eval.ruler import run_ruler

    res = run_ruler(engine.model, tokenizer, cfg.tasks, cfg.lengths or [seq_len], cfg.samples, seed,
                    haystack=cfg.haystack, qa_dir=cfg.qa_data, max_new_tokens=cfg.max_new_tokens, progress=False)
    out = {f"eval/ruler@{n}": v for n, v in res["average"].items() if v is not None}
    out.update({f"eval/ruler/{t}@{n}": v for t, row in res["scores"].items() for n, v in row.items() if v is not None})
    return out


def _training_data(recipe: Recipe, tokenizer, out: Path, rank: int, distributed: bool):
    """The training rows and validation tokens: the recipe's data mix (``data.recipe``, or ``data.sources`` as an
    inline mix) built into ``out`` on rank 0 (a no-op when cached), then opened on every rank; or the directory
    ``data.built``.

    Raises:
        RecipeError: the mix or the built directory does not match the model's tokenizer or max_seq_len.
    """
    from llmft.config.data import inline_mix, load_mix
    from llmft.data.build import build, load_built, tokenizer_hash

    if recipe.data.built is not None:
        built = load_built(recipe.data.built)
        where = f"{recipe.data.built}/stats.json"
        if built.stats["seq_len"] != recipe.model.max_seq_len:
            raise RecipeError([f"{where}: built for seq_len {built.stats['seq_len']}, but model.max_seq_len is "
                               f"{recipe.model.max_seq_len}; rebuild with seq_len={recipe.model.max_seq_len}"])
        if built.stats["tokenizer_hash"] != tokenizer_hash(tokenizer):
            raise RecipeError([f"{where}: built with tokenizer {built.stats['tokenizer']!r}, which is not the "
                               "model's; rebuild it with the model's tokenizer"])
        return built

    if recipe.data.sources:
        mix, where = inline_mix(recipe.data), "data.sources"
    else:
        where = str(recipe.data.recipe)
        mix = load_mix(where)
    if mix.seq_len is not None and mix.seq_len != recipe.model.max_seq_len:
        raise RecipeError([f"{where}: seq_len is {mix.seq_len} but model.max_seq_len is {recipe.model.max_seq_len}; "
                           "remove seq_len from the data recipe or make them equal"])
    if mix.tokenizer is not None:
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(mix.tokenizer).get_vocab() != tokenizer.get_vocab():
            raise RecipeError([f"{where}: tokenizer {mix.tokenizer!r} is not the model's tokenizer; remove it from "
                               "the data recipe (training builds with the model's tokenizer)"])
    if rank == 0:
        build(mix, out, tokenizer, recipe.model.max_seq_len)
    if distributed:
        dist.barrier()
    return load_built(out)


def _export(out: Path, engine, state: dict | None, tokenizer, recipe: Recipe) -> None:
    """The HF export of a checkpoint: the full model, or for LoRA the adapter + RoPE-scaled base config.
    ``state``: every parameter (full) or the trainable ones (LoRA), whole, from the engine."""
    if recipe.uses_adapters:
        from llmft.model.adapters import export_adapter

        export_adapter(out, engine.model, tokenizer, DTYPES[recipe.model.dtype], state)
    else:
        ckpt.export_hf(out, engine.model, state, tokenizer, DTYPES[recipe.model.dtype])


def _save_checkpoint(engine, built, recipe: Recipe, run_dir: Path, progress: dict, data: PackedLoader,
                     rank: int) -> None:
    """Write ``checkpoints/step-N`` atomically (all ranks take part; rank 0 publishes). ``progress``: step,
    tokens_seen, wandb_id and the loss-spike window, saved in trainer.json with every rank's data position.

    Raises:
        CheckpointError: a write failed (e.g. no space left); the staging directory is removed and the earlier
            checkpoints are untouched.
        RuntimeError: a failure that is not an I/O error (re-raised as is).
    """  # noqa: DOC501 (a re-raise names what the except clause catches)
    step = progress["step"]
    tmp = run_dir / "checkpoints" / f".tmp-{ckpt.step_dir_name(step)}"
    try:
        _write_checkpoint(engine, built, recipe, run_dir, progress, data, rank, tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap the OS error
        if isinstance(e, RuntimeError) and not isinstance(e, OSError) and "writ" not in str(e).lower():
            raise  # not an I/O failure
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = ckpt.latest_complete(run_dir)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise ckpt.CheckpointError(
            f"could not write checkpoint {ckpt.step_dir_name(step)} in {run_dir / 'checkpoints'}: {why}. The "
            f"newest complete checkpoint ({newest or 'none yet'}) is intact; free space or fix the directory, then "
            "re-run the same command to resume from it") from None


def _write_checkpoint(engine, built, recipe: Recipe, run_dir: Path, progress: dict, data: PackedLoader,
                      rank: int, tmp: Path) -> None:
    step = progress["step"]
    if rank == 0:
        tmp = ckpt.staging_dir(run_dir, step)
    engine.barrier()
    state = engine.full_state_dict() if recipe.method == "full" else engine.trainable_state_dict()
    if rank == 0:
        _export(tmp / "model", engine, state, built.tokenizer, recipe)
    engine.save(tmp / "state")
    data_states = [data.state_dict()]
    if engine.world_size > 1:
        data_states = [None] * engine.world_size
        dist.all_gather_object(data_states, data.state_dict())
    trainer = {**progress, "data": {str(r): s for r, s in enumerate(data_states)}}
    ckpt.save_trainer_state(tmp / "state", trainer, rank)
    engine.barrier()
    if rank == 0:
        ckpt.publish(tmp, step, recipe.checkpoint.keep_last)
    engine.barrier()


def train_recipe(recipe_path: str | Path, overrides: list[str] | None = None, resume: bool = True) -> TrainResult:
    """Train the recipe file, first training the recipe named by ``model.produced_by`` when its output is missing.

    Raises:
        RecipeError: the recipe is invalid, or its producer did not write ``model.name``.
    """
    recipe = load_recipe(recipe_path, overrides or [])
    m = recipe.model
    if m.produced_by is not None and not Path(m.name).is_dir():
        log.info("%s does not exist yet: training %s first", m.name, m.produced_by)
        result = train(load_recipe(m.produced_by), resume=True)
        if not Path(m.name).is_dir():
            raise RecipeError([f"{recipe_path}: model.name: {m.produced_by} wrote {result.final_dir}, not "
                               f"{m.name}. Fix: set model.name: {result.final_dir}"])
    return train(recipe, resume=resume)


def train_for(recipe: Recipe, steps: int, fresh: bool = False) -> tuple[Path, list[float]]:
    """Train ``recipe`` for ``steps`` steps, its warm-up and checkpoint interval cut to fit, as the stages of a
    multi-stage driver do; returns the final model and the loss of each step this process ran. With ``fresh`` the run
    directory is removed first; otherwise a run of this very recipe that finished (``checkpoint.finished``) is kept,
    no step run again, and an unfinished one resumes from its last checkpoint.

    Raises:
        RecipeError: as :func:`train`.
    """
    recipe.train.max_steps = steps
    recipe.train.warmup_steps = min(recipe.train.warmup_steps, max(1, steps // 10))
    recipe.checkpoint.every_steps = min(recipe.checkpoint.every_steps, steps)
    run_dir = Path(recipe.checkpoint.dir)
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif ckpt.finished(recipe):
        log.info("%s was finished by an earlier run of this recipe: kept", run_dir / "final")
        return run_dir / "final", []
    return run_dir / "final", train(recipe, resume=True).losses
