"""The numbers a person checks before launching a recipe (``llmft validate`` prints them): ranks, batch, tokens,
steps, RoPE and parameters. Every number is read from the recipe's own derived numbers (``llmft.config.Recipe``)
or from the model's config, so this printout, ``llmft plan`` and the training loop agree by construction."""

from __future__ import annotations

from llmft.config import Recipe, RecipeError


def derived_numbers(recipe: Recipe, world_size: int) -> list[str]:
    """The numbers a person checks before launching: batch, tokens, RoPE, parameters.

    Raises:
        RecipeError: the model's config cannot be found (offline, not shipped) to count its parameters.
    """
    from llmft.model.build import ModelLoadError, architecture_config, parameter_count_from_config
    m = recipe.model
    per_step = recipe.tokens_per_step(world_size)
    steps = recipe.total_steps(world_size)
    lines = [
        f"data-parallel ranks     {world_size}",
        f"effective batch         {recipe.sequences_per_step(world_size)} sequences of {m.max_seq_len} tokens",
        f"tokens per step         {per_step:,}",
        f"steps                   {steps} ({steps * per_step:,} tokens)",
    ]
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
        from llmft.model.build import DTYPES

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
