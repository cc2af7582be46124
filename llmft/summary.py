"""What a run will do, in the lines a person reads: before launching (``llmft validate``: ranks, batch, tokens, steps,
RoPE and parameters) and once a training run is set up (:func:`run_summary`). Every number is read from the recipe's own
derived numbers (``llmft.config.Recipe``) or from the model's config, so this printout, ``llmft plan`` and the training
loop agree by construction."""

from __future__ import annotations

from llmft.config import Recipe, RecipeError


def derived_numbers(recipe: Recipe, world_size: int) -> list[str]:
    """The numbers a person checks before launching: batch, tokens, RoPE, parameters.

    Raises:
        RecipeError: the model's config cannot be found (offline, not shipped) to count its parameters.
    """
    from llmft.model.load import ModelLoadError, architecture_config, parameter_count_from_config
    m = recipe.model
    per_step = recipe.tokens_per_step(world_size)
    steps = recipe.total_steps(world_size)
    lines = [
        f"data-parallel ranks     {recipe.data_parallel_size(world_size)}"
        + (f" (x {recipe.parallel.sequence} sequence-parallel, {world_size} processes in all)"
           if recipe.parallel.sequence > 1 else ""),
        f"effective batch         {recipe.sequences_per_step(world_size)} sequences of {m.max_seq_len} tokens",
        f"tokens per step         {per_step:,}",
        f"steps                   {steps} ({steps * per_step:,} tokens)",
    ]
    sp = recipe.parallel.sequence
    if world_size % sp:
        lines.append(f"note                    parallel.sequence {sp} needs a multiple of {sp} ranks; these numbers "
                     f"are for {world_size} (give --world-size)")
    try:
        n = parameter_count_from_config(m)
        config = architecture_config(m) if m.rope is not None else None
    except ModelLoadError as e:
        raise RecipeError([str(e)]) from None
    if m.rope is not None:
        orig = m.rope.original_max_position_embeddings or "the base config's max_position_embeddings"
        lines.append(f"RoPE                    {m.rope.type} x{m.rope.factor:g} from {orig}")
        if config is not None:  # what is written, composed with the base's own scaling (llmft/model/rope.py)
            lines.append(f"  -> config             max_position_embeddings {config.max_position_embeddings}, "
                         f"rope_parameters {config.rope_parameters}")
    if n and recipe.uses_adapters:
        from llmft.model.adapters import adapter_size_bytes, lora_parameter_count
        from llmft.model.load import DTYPES

        try:
            config = architecture_config(m)
            k = lora_parameter_count(config, recipe.lora)
            lines.append(f"parameters              {n:,} ({k:,} trainable = {100 * k / n:.2f}%: "
                         f"method {recipe.method})")
            size = adapter_size_bytes(config, recipe.lora, DTYPES[m.dtype])
            short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[m.dtype]
            lines.append(f"adapter on disk         ~{size / 1e6:.1f} MB ({short}, model.dtype)")
        except ValueError:  # explicit targets without a closed form: counted at launch
            lines.append(f"parameters              {n:,} (trainable: counted at launch)")
    else:
        lines.append(f"parameters              {n:,} (all trainable: method full)" if n else
                     "parameters              (model not local: counted at launch)")
    return lines


def run_summary(recipe: Recipe, run_dir, world: int, distributed: bool, engine, built, base_params: int, data,
                resumed_from) -> list[str]:
    """The lines a training run prints once it is set up: processes, model, data, packing, batch and steps, resume.

    Args:
        recipe: the recipe being trained.
        run_dir: its ``checkpoint.dir``.
        world: processes (data-parallel ranks).
        distributed: launched by deepspeed (the engine is DeepSpeed's).
        engine: the training engine (its model, and ZeRO stage under DeepSpeed).
        built: the built model (attention kernel, RoPE change).
        base_params: the base model's parameter count, before adapters.
        data: the built training data (rows, validation tokens, stats).
        resumed_from: the checkpoint resumed from, or None.
    """
    from llmft.model.load import DTYPES, count_parameters

    lora, t, seq_len, sp = recipe.adapter, recipe.train, recipe.model.max_seq_len, recipe.parallel.sequence
    rows, stats = data.rows, data.stats
    trainable, total_params = count_parameters(engine.model)
    tokens_per_step, total_steps = recipe.tokens_per_step(world), recipe.total_steps(world)
    documents = sum(s["documents"] for s in stats["sources"].values())
    bad_records = sum(s["bad_records"] for s in stats["sources"].values())
    adapter_line = []
    if lora is not None:
        from llmft.model.adapters import trained_adapter_size_bytes

        size = trained_adapter_size_bytes(engine.model, DTYPES[recipe.model.dtype])
        adapter_line = [f"adapter on disk    ~{size / 1e6:.1f} MB per export in {recipe.model.dtype} (final/ and "
                        "each checkpoint's model/)"]
    lines = [
        f"run dir            {run_dir}",
        f"processes          {world} ({'DeepSpeed ZeRO-' + str(engine.stage) if distributed else 'plain PyTorch'})",
        f"attention          {built.attention}" + (
            f", sequence parallel over {sp} ranks (DeepSpeed Ulysses): {seq_len // sp} tokens of each sequence per "
            "rank" if sp > 1 else ""),
        f"RoPE               {built.rope.describe() if built.rope else 'unchanged'}",
        f"max_position_emb.  {built.model.config.max_position_embeddings}",
        f"parameters         {total_params:,} ({trainable:,} trainable)" if lora is None else
        f"parameters         {base_params:,} base, frozen; {trainable:,} trainable "
        f"({100 * trainable / base_params:.2f}% of base{' (4-bit packed)' if recipe.qlora else ''}: "
        f"{'QLoRA ' + recipe.qlora.quant_type if recipe.qlora else 'LoRA'} r={lora.rank} alpha={lora.alpha:g} on "
        f"{', '.join(lora.targets)}" + (f" + {', '.join(lora.trainable_extra)}" if lora.trainable_extra else "")
        + ")",
        *adapter_line,
        f"data               {documents} documents, {stats['total_tokens']:,} train tokens, "
        f"{len(data.validation_tokens):,} validation tokens, {bad_records} bad records skipped",
        f"packing            {rows.mode}: {len(rows)} rows of {seq_len}, efficiency {rows.efficiency:.2%}"
        + (f", {rows.dropped_tokens} tokens in a short final piece unused" if rows.dropped_tokens else "")
        + (f", {rows.split_examples} long documents split into chunks" if rows.split_examples else ""),
        f"tokens per step    {tokens_per_step:,} = {t.micro_batch_size} micro x {t.gradient_accumulation_steps} "
        f"accum x {recipe.data_parallel_size(world)} data-parallel ranks x {seq_len} tokens (effective batch "
        f"{tokens_per_step // seq_len} sequences)",
        f"steps              {total_steps} ({total_steps * tokens_per_step:,} tokens, "
        f"{total_steps * tokens_per_step / max(1, len(rows) * seq_len):.2f} epochs)",
        f"resume             {'from ' + str(resumed_from) if resumed_from else 'fresh start'}",
    ]
    if rows.has_weights:  # a reweighted build; after the packing line
        lines.insert(-3, f"loss weights       per token, from the data reweight: mean "
                     f"{rows.index['weight_mean']:.3f} over trained tokens; step loss = Σ w·nll / Σ w")
    return lines
