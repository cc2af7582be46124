"""What a run is: the schemas of every YAML file llmft reads, their loading, and the numbers derived from them.

- ``loading``: YAML + ``key=value`` overrides -> a schema, every error at once with file:line (one strict base).
- ``recipe``: the training recipe (model, method, data, train, deepspeed, parallel, checkpoint, logging, eval) with its
  derived numbers (tokens per step, total steps, adapters, ZeRO stage, attention kernel) and cross-checks.
- ``adapters``: the LoRA and QLoRA sections of a recipe.
- ``sources``: one data source (format + path or hub) and the files it names.
- ``data``: the data mix (shares, filters, decontamination, dedup, reweighting, transforms, engine).
- ``eval``: the recipe's eval section (perplexity, passkey, RULER during training) and a HELM suite.

This package imports nothing else from llmft, so every other module may import it.
"""

from llmft.config.adapters import LORA_TARGET_PRESETS, LoraConfig, QLoraConfig
from llmft.config.data import MixRecipe, MixSource, inline_mix, load_mix, resolve_lengths
from llmft.config.eval import RULER_TASKS, EvalConfig, HelmSuite, PasskeyEval, RulerEval, ScenarioSpec
from llmft.config.loading import RecipeError, Strict, apply_overrides, hint, load_validated
from llmft.config.recipe import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    Recipe,
    RopeConfig,
    TrainConfig,
    WandbConfig,
    cross_check,
    heads_problems,
    is_local_path,
    load_recipe,
    recipe_to_yaml,
)
from llmft.config.sources import SourceSpec, list_files

__all__ = [
    "LORA_TARGET_PRESETS", "RULER_TASKS", "CheckpointConfig", "DataConfig", "DeepSpeedConfig", "EvalConfig",
    "HelmSuite", "LoggingConfig", "LoraConfig", "MixRecipe", "MixSource", "ModelConfig", "ParallelConfig",
    "PasskeyEval", "QLoraConfig", "Recipe", "RecipeError", "RopeConfig", "RulerEval", "ScenarioSpec", "SourceSpec",
    "Strict", "TrainConfig", "WandbConfig", "apply_overrides", "cross_check", "heads_problems", "hint", "inline_mix",
    "is_local_path", "list_files", "load_mix", "load_recipe", "load_validated", "recipe_to_yaml", "resolve_lengths",
]
