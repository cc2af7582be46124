"""``llmft`` command line: validate, plan, train, merge, eval, report, data (build / dedup / inspect / validate),
quickstart.

User errors (bad recipe, missing model or data, impossible backend) print one message per problem and exit
with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import yaml

from llmft.config import Recipe, RecipeError, load_recipe, recipe_to_yaml

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[Exception], ...]:
    from llmft.data.sources import DataError
    from llmft.model.build import ModelLoadError
    from llmft.train.checkpoint import CheckpointError

    return RecipeError, ModelLoadError, DataError, CheckpointError


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[llmft] %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft imports bitsandbytes, which warns on CPU about an optional 4-bit kernel LoRA never uses
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # DeepSpeed's ZeRO collectives still call torch APIs that torch marks deprecated; nothing for users to do
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")


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


def cmd_validate(args: argparse.Namespace) -> int:
    from llmft.train.engine import deepspeed_config

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.model.produced_by is not None:
        load_recipe(recipe.model.produced_by)
    if recipe.data.recipe is not None:
        from llmft.config.data import load_mix

        load_mix(recipe.data.recipe)
    deepspeed_config(recipe, args.world_size)
    print(f"# {args.recipe}: valid\n" + recipe_to_yaml(recipe))
    print("\n".join("# " + line for line in derived_numbers(recipe, args.world_size)))
    return 0


def run_training(recipe_path: str, overrides: list[str], resume: bool):
    """Train a recipe, first training the recipe named by ``model.produced_by`` when its output is missing.

    Raises:
        RecipeError: the recipe is invalid, or its producer did not write ``model.name``.
    """
    from llmft.train.loop import train

    recipe = load_recipe(recipe_path, overrides)
    m = recipe.model
    if m.produced_by is not None and not Path(m.name).is_dir():
        logging.getLogger("llmft").info("%s does not exist yet: training %s first", m.name, m.produced_by)
        producer = load_recipe(m.produced_by)
        result = train(producer, resume=True)
        if not Path(m.name).is_dir():
            raise RecipeError([f"{recipe_path}: model.name: {m.produced_by} wrote {result.final_dir}, not "
                               f"{m.name}. Fix: set model.name: {result.final_dir}"])
    return train(recipe, resume=resume)


def cmd_train(args: argparse.Namespace) -> int:
    run_training(args.recipe, args.overrides, resume=not args.no_resume)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from llmft.quickstart import quickstart

    quickstart(Path(args.out), steps_scale=args.steps_scale)
    return 0


def cmd_repro_pi(args: argparse.Namespace) -> int:
    from llmft.repro import main_pi

    return main_pi(args)


def cmd_data_build(args: argparse.Namespace) -> int:
    from llmft.config.data import load_mix, resolve_lengths
    from llmft.data.build import build_from_recipe

    overrides = args.overrides + ([f"num_proc={args.num_proc}"] if args.num_proc is not None else [])
    mix = load_mix(args.recipe, overrides)
    seq_len, tokenizer = resolve_lengths(mix, None, None, args.recipe)
    built = build_from_recipe(mix, Path(args.out), seq_len, tokenizer, force=args.force, load_rows=False)
    s = built.stats
    print(f"[llmft] {'cache hit: ' if built.cached else ''}{args.out}: {s['packing']['rows']} rows of {seq_len} "
          f"({s['packing']['mode']}, {s['packing']['efficiency']:.2%} full), {s['total_tokens']:,} tokens")
    for name, src in s["sources"].items():
        print(f"[llmft]   {name:<16} {100 * src['realized_share']:6.2f}% (target {100 * src['target_share']:.2f}%), "
              f"{src['documents']} docs, {src['epochs']:.2f} epochs, dropped: {src['dropped_min_tokens']} short, "
              f"{src['dropped_max_tokens']} long, {src['decontaminated']} contaminated, "
              f"{src.get('deduplicated', 0)} duplicates, {src.get('filtered', 0)} filtered, {src['bad_records']} bad"
              + ("" if src.get("read_whole", True) else "; stopped reading at its share's need"
                 + (f" ({src['files_read']} of {src['files_total']} files, {src['read_fraction']:.1%} of the bytes)"
                    if src.get("read_fraction") is not None else "")))
    return 0


def cmd_data_dedup(args: argparse.Namespace) -> int:
    from llmft.config.data import load_mix
    from llmft.data.build import dedup_recipe

    mix = load_mix(args.recipe, args.overrides)
    tokenizer = None
    if mix.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(mix.tokenizer)
    r = dedup_recipe(mix, Path(args.out), tokenizer)
    print(f"[llmft] {args.out}/dedup.md, dedup.json: {r['documents']:,} documents, {r['removed']:,} removed "
          f"({r['exact_duplicates']:,} exact copies) in {r['groups']:,} groups")
    for name, st in r["by_source"].items():
        tokens = f", {st['tokens_removed']:,} tokens" if "tokens_removed" in st else ""
        print(f"[llmft]   {name:<16} {st['removed']:,} of {st['documents']:,} removed ({st['words_removed']:,} words"
              f"{tokens})")
    if r["recall"] and r["recall"]["recall"] is not None:
        print(f"[llmft]   recall vs exact all-pairs on {r['recall']['sampled_documents']:,} sampled documents: "
              f"{r['recall']['recall']:.2%} of {r['recall']['true_pairs']:,} pairs")
    return 0


def cmd_data_report(args: argparse.Namespace) -> int:
    """``llmft data report``: the keyword-shift report of a built mix (or of a recipe, building it first).

    Raises:
        RecipeError: --keywords is empty, or --out is missing for a recipe.
        DataError: the build has no filter statistics, or the mix has no filters.
    """
    import numpy as np

    from llmft.config.data import MixRecipe, load_mix
    from llmft.data.build import curate_recipe
    from llmft.data.keyword_shift import keyword_shift, write_shift_report
    from llmft.data.sources import DataError

    target = Path(args.target)
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
    if not keywords:
        raise RecipeError([f"--keywords: got {args.keywords!r}; expected comma-separated words, e.g. woman,man"])
    if target.is_dir():  # a build: its stats.json holds the resolved recipe; the sources are read again
        stats_file = target / "stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        if "mix" not in stats:
            raise DataError(f"{target}: no stats.json with the recipe (built before filters existed?); rebuild it or "
                            "pass the data recipe")
        mix, out = MixRecipe.model_validate(stats["mix"]), Path(args.out or target)
    else:
        if args.out is None:
            raise RecipeError([f"{target}: --out is required when reporting on a recipe (where to write the report)"])
        mix, out = load_mix(target, args.overrides), Path(args.out)
    if not mix.filters:
        raise DataError(f"{target}: the mix has no filters, so nothing shifted; add a filters section")
    curated = curate_recipe(mix)
    texts = [t for c in curated.values() for t in c.texts]
    keep = np.concatenate([c.keep for c in curated.values()])
    weights = None if mix.reweight is None else np.concatenate([c.weights for c in curated.values()])
    report = keyword_shift(texts, keep, weights, keywords)
    report["by_source"] = {n: keyword_shift(c.texts, c.keep, c.weights, keywords)["keywords"]
                           for n, c in curated.items()}
    write_shift_report(report, out)
    print(f"[llmft] {out}/keyword_shift.md, .json, .png: {report['documents']['filtered']:,} of "
          f"{report['documents']['unfiltered']:,} documents kept")
    for k, e in report["keywords"].items():
        line = f"[llmft]   {k:<16} {e['unfiltered']:10.1f} -> {e['filtered']:10.1f} per 1M words"
        if e["shift_filtered"] is not None:
            line += f" ({100 * e['shift_filtered']:+.1f}%)"
        if e["reweighted"] is not None:
            line += f", reweighted {e['reweighted']:.1f}"
            if e["shift_reweighted"] is not None:
                line += f" ({100 * e['shift_reweighted']:+.1f}%)"
        print(line)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from llmft.data.build import load_built

    built = load_built(Path(args.dir))
    s = built.stats
    print(json.dumps({k: v for k, v in s.items() if k != "length_histogram"}, indent=1))
    tok = AutoTokenizer.from_pretrained(args.tokenizer or s["tokenizer"])
    rows = built.rows
    for r in range(min(args.rows, len(rows))):
        row = rows.batch([r])
        pos, ids_row, labels_row = row["position_ids"][0], row["input_ids"][0], row["labels"][0]
        # a segment starts where position ids restart (isolated) or at a BOS token (a document, in concat rows)
        is_start = (pos == 0) | (ids_row == tok.bos_token_id if tok.bos_token_id is not None else False)
        starts = torch.nonzero(is_start).flatten().tolist() + [len(pos)]
        pieces = []
        for a, b in zip(starts[:-1], starts[1:]):
            ids, labels = ids_row[a:b], labels_row[a:b]
            trained = tok.decode(ids[labels != -100])
            pieces.append(f"<<segment {a}:{b}, {int((labels != -100).sum())} tokens trained>> " + tok.decode(ids)[: args.chars]
                          + ("" if len(trained) else " <<context only>>"))
        print(f"\n===== row {r} ({rows.mode}) =====\n" + "\n".join(pieces))
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from llmft.config.data import load_mix

    mix = load_mix(args.recipe, args.overrides, check_paths=not args.schema_only)
    print(f"# {args.recipe}: valid" + (" (schema only: paths not checked)" if args.schema_only else ""))
    print(yaml.safe_dump(mix.model_dump(mode="json"), sort_keys=False))
    return 0


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError([f"--lengths: got {text!r}; expected comma-separated token counts, e.g. 2048,4096"]) from None
    if not lengths or min(lengths) < 2:
        raise RecipeError([f"--lengths: got {text!r}; every length must be at least 2 tokens"])
    return lengths


def cmd_eval(args: argparse.Namespace) -> int:
    """``llmft eval``: the requested evaluations of every --model, or --compare of earlier reports.

    Raises:
        RecipeError: no evaluation or no model was given, or an option is out of range.
    """
    from llmft.eval import run as ev

    out = Path(args.out)
    if args.compare:
        from llmft.eval.report import compare_reports

        try:
            paths = compare_reports([Path(p) for p in args.compare], out)
        except (FileNotFoundError, ValueError) as e:
            raise RecipeError([f"--compare: {e}"]) from None
        print(paths["table"])
        print(f"[llmft] comparison written to {paths['markdown']} and {paths['plot']}")
        return 0
    if args.ppl is None and args.helm is None and not args.passkey:
        raise RecipeError(["llmft eval: choose an evaluation (--ppl pg19, --passkey, --helm SCENARIOS) or --compare "
                           "REPORT..."])
    if not args.model:
        raise RecipeError(["llmft eval: give at least one --model (a checkpoint directory, hub id or adapter)"])
    from llmft.model.build import resolve_attention

    # flash-attn computes only in bf16/fp16: the kernel follows --dtype (auto: sdpa in float32)
    args.attention, reason = resolve_attention(args.attention, {"float32": "fp32", "bfloat16": "bf16",
                                                                "float16": "fp16"}[args.dtype])
    logging.getLogger("llmft").info("attention: %s (%s)", args.attention, reason)
    if args.passkey:
        _eval_passkey(args, out)
    if args.helm is not None:
        _eval_helm(args, out)
    if args.ppl is None:
        return 0
    from llmft.data.sources import SourceError

    lengths = _lengths(args.lengths)
    if args.mode == "sliding" and min(lengths) <= args.stride:
        raise RecipeError([f"--stride {args.stride} must be below every length (got {min(lengths)}): each window "
                           "keeps length - stride tokens of context. Fix: lower --stride or drop that length"])
    try:
        result = ev.run_ppl(args.model, args.data, lengths, args.mode, args.stride, args.max_docs,
                            out, args.dtype, args.device or ev.device_default(), args.wandb_project, args.wandb_mode,
                            attention=args.attention)
    except (SourceError, ValueError) as e:
        raise RecipeError([f"llmft eval: {e}"]) from None
    from llmft.eval.report import format_ppl_table

    print(format_ppl_table(result["results"]))
    print(f"[llmft] report written to {result['paths']['markdown']}, {result['paths']['json']} and "
          f"{result['paths']['plot']}")
    return 0


def _eval_passkey(args: argparse.Namespace, out: Path) -> None:
    """Passkey retrieval for every --model: passkey.json/md/png under OUT (OUT/passkey-<i> for several).

    Raises:
        RecipeError: --depths or --lengths are not what they must be.
    """
    from llmft.eval import run as ev
    from llmft.eval.passkey import format_passkey_table, run_passkey, write_passkey_report

    lengths = _lengths(args.lengths)
    try:
        depths = [float(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise RecipeError([f"--depths: got {args.depths!r}; expected fractions in [0, 1], e.g. 0,0.5,1"]) from None
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise RecipeError([f"--depths: got {args.depths!r}; every depth must be in [0, 1]"])
    for i, name in enumerate(args.model):
        device = args.device or ev.device_default()
        model, tokenizer = ev.load_eval_model(name, args.dtype, device, args.attention)
        results = run_passkey(model, tokenizer, lengths, depths, args.trials, args.seed, device, model_name=name)
        paths = write_passkey_report(results, out if len(args.model) == 1 else out / f"passkey-{i}")
        print(f"# passkey retrieval: {name}\n" + format_passkey_table(results))
        print(f"[llmft] passkey report written to {', '.join(str(p) for p in paths.values())}")


def _eval_helm(args: argparse.Namespace, out: Path) -> None:
    """HELM core scenarios for every --model: helm.json and helm.md under OUT (OUT/helm-<i> for several).

    Raises:
        RecipeError: --helm-trials is below 1, a scenario is unknown or its data is missing.
    """
    from llmft.eval import run as ev
    from llmft.eval.helm import format_helm_table, run_helm, write_helm_report

    names = [n.strip() for n in args.helm.split(",") if n.strip()]
    if args.helm_trials < 1:
        raise RecipeError([f"--helm-trials: got {args.helm_trials}; expected at least 1 (HELM v1.0 ran 3)"])
    for i, name in enumerate(args.model):
        model, tokenizer = ev.load_eval_model(name, args.dtype, args.device or ev.device_default(), args.attention)
        try:
            results = run_helm(model, tokenizer, names, Path(args.helm_data), args.max_instances, args.seed,
                               trials=args.helm_trials)
        except (FileNotFoundError, ValueError) as e:  # unknown scenario, missing data file: what to fix
            raise RecipeError([f"--helm: {e}"]) from None
        where = out if len(args.model) == 1 else out / f"helm-{i}"
        json_path, md_path = write_helm_report(results, where)
        print(f"# HELM core: {name}\n" + format_helm_table(results))
        print(f"[llmft] HELM report written to {md_path} and {json_path}")


def cmd_report(args: argparse.Namespace) -> int:
    """``llmft report``: learning curves and a fit diagnosis of a run directory.

    Raises:
        RecipeError: the run directory has no metrics to plot.
    """
    from llmft.eval.curves import write_report

    try:
        r = write_report(Path(args.run_dir), args.window, args.tol)
    except FileNotFoundError as e:
        raise RecipeError([str(e)]) from None
    print(f"[llmft] {args.run_dir}: {r['verdict']}\n[llmft]   rule: {r['rule']}\n[llmft]   suggestion: "
          f"{r['suggestion']}\n[llmft] report written to {r['markdown']} and {r['plot']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory estimate per device; exit 1 when --gpu-mem is given and it does not fit.

    Raises:
        RecipeError: --gpus or --gpu-mem is invalid, or the recipe is.
    """
    from llmft.plan import estimate_memory, parse_bytes

    if args.gpus < 1:
        raise RecipeError([f"--gpus: got {args.gpus}; expected the number of data-parallel ranks, at least 1"])
    mem = parse_bytes(args.gpu_mem) if args.gpu_mem is not None else None
    recipe = load_recipe(args.recipe, args.overrides)
    plan = estimate_memory(recipe, args.gpus, mem, device=args.device, recipe_name=args.recipe)
    print(plan.report())
    return 1 if plan.fits is False else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from llmft.model.adapters import merge_adapters, parse_adapter_spec
    from llmft.model.build import DTYPES

    adapters = [parse_adapter_spec(spec) for spec in args.adapter]
    out = merge_adapters(args.base, adapters, Path(args.out), DTYPES[args.dtype])
    print(f"[llmft] merged {' + '.join(args.adapter)} into {args.base}: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmft", description="Long-context fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check a recipe; print it resolved with the derived numbers")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-5")
    v.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="data-parallel ranks to assume (default: $WORLD_SIZE or 1)")
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plan", help="estimate peak memory per device (weights, gradients, optimizer states, "
                        "activations, logits) and, with --gpu-mem, whether it fits and what to change")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.gradient_checkpointing=true")
    pl.add_argument("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                    help="data-parallel ranks; more than 1 plans a DeepSpeed run (default: $WORLD_SIZE or 1)")
    pl.add_argument("--gpu-mem", default=None, metavar="SIZE",
                    help="memory per device, e.g. 80GB or 24GiB: say whether it fits (exit 1 if not) and what to "
                    "change")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="plan a GPU run (default) or a CPU run (everything in host memory)")
    pl.set_defaults(func=cmd_plan)

    t = sub.add_parser("train", help="train a recipe (same as python launch/train.py)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="build, deduplicate, inspect and validate data-mix recipes (data_recipes/*.yaml)")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    b = dsub.add_parser("build", help="build a mix into packed training rows (cached by fingerprint)")
    b.add_argument("recipe")
    b.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seq_len=2048")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    b.add_argument("--num-proc", type=int, default=None,
                   help="tokenize in this many processes (default: the recipe's num_proc, else 1)")
    b.set_defaults(func=cmd_data_build)
    dd = dsub.add_parser("dedup", help="only deduplicate a mix (its dedup section, or the defaults): write "
                         "dedup.json and dedup.md, no tokenizing or packing")
    dd.add_argument("recipe")
    dd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. dedup.threshold=0.7")
    dd.add_argument("--out", required=True, help="output directory for the report")
    dd.set_defaults(func=cmd_data_dedup)
    rk = dsub.add_parser("report", help="keyword shift of the filters (and reweighting): frequency per 1M words "
                         "unfiltered / filtered / reweighted, as keyword_shift.md, .json, .png")
    rk.add_argument("target", help="a built directory (its recipe is read from stats.json and the sources read again, "
                    "relative paths from the current directory) or a data recipe")
    rk.add_argument("overrides", nargs="*", help="key=value overrides (with a recipe)")
    rk.add_argument("--keywords", required=True, help="comma-separated keywords (whole word, case-insensitive)")
    rk.add_argument("--out", default=None, help="output directory (default: the built directory)")
    rk.set_defaults(func=cmd_data_report)
    i = dsub.add_parser("inspect", help="print a build's stats and decode a few rows with boundaries marked")
    i.add_argument("dir")
    i.add_argument("--rows", type=int, default=2, help="rows to decode")
    i.add_argument("--chars", type=int, default=300, help="characters shown per segment")
    i.add_argument("--tokenizer", default=None, help="tokenizer to decode with (default: the one built with)")
    i.set_defaults(func=cmd_data_inspect)
    dv = dsub.add_parser("validate", help="check a data-mix recipe")
    dv.add_argument("recipe")
    dv.add_argument("overrides", nargs="*")
    dv.add_argument("--schema-only", action="store_true", help="do not check that paths exist")
    dv.set_defaults(func=cmd_data_validate)

    mg = sub.add_parser("merge", help="fold LoRA adapters (method: lora or qlora output) into their base: a "
                        "plain HF checkpoint (QLoRA: into the unquantized base); repeat --adapter to stack "
                        "adapters with weights")
    mg.add_argument("--base", required=True, help="the base model (hub id or directory) the adapter was trained on")
    mg.add_argument("--adapter", required=True, action="append", metavar="PATH[:WEIGHT]",
                    help="an adapter directory (RUN/final or RUN/checkpoints/step-N/model) or its "
                    "adapter_model.safetensors, with an optional weight (default 1; negative subtracts). Repeat to "
                    "stack: --adapter a:0.7 --adapter b:0.3 gives W0 + 0.7 delta_a + 0.3 delta_b exactly (warns "
                    "where two adapters change the same modules); stacked adapters need the same RoPE settings")
    mg.add_argument("--out", required=True, help="output directory")
    mg.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="dtype of the merged weights")
    mg.set_defaults(func=cmd_merge)

    ev = sub.add_parser("eval", help="evaluate models: PG-19 perplexity per byte by context length, passkey "
                        "retrieval, HELM core scenarios; compare earlier reports")
    ev.add_argument("--model", action="append", default=[], metavar="MODEL",
                    help="a checkpoint directory, hub id or llmft adapter directory; repeat to compare models")
    ev.add_argument("--ppl", choices=["pg19"], default=None, help="perplexity per byte (and token perplexity)")
    ev.add_argument("--data", default="deepmind/pg19",
                    help="PG-19 books: a directory of <id>.txt, HF-layout jsonl/parquet, or a datasets id (test "
                    "split); default deepmind/pg19")
    ev.add_argument("--lengths", default="2048,4096,8192,16384,32768", help="comma-separated context lengths")
    ev.add_argument("--mode", choices=["windows", "sliding"], default="windows",
                    help="non-overlapping windows, or sliding windows scoring only the new tokens (PI/YaRN)")
    ev.add_argument("--stride", type=int, default=256, help="sliding-window stride in tokens")
    ev.add_argument("--max-docs", type=int, default=None, help="at most this many books")
    ev.add_argument("--passkey", action="store_true", help="passkey retrieval over --lengths x --depths")
    ev.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: comma-separated key depths in [0, 1]")
    ev.add_argument("--trials", type=int, default=10, help="passkey: random keys per (length, depth) cell")
    ev.add_argument("--helm", default=None, metavar="SCENARIOS",
                    help="HELM v1.0 core scenarios, comma-separated (e.g. boolq,mmlu,narrative_qa) or 'all'; "
                    "suite in llmft/eval/helm_core.yaml")
    ev.add_argument("--helm-data", default="data/helm", help="directory with the scenarios' files (see docs/eval.md)")
    ev.add_argument("--max-instances", type=int, default=None, help="HELM: at most this many eval instances each")
    ev.add_argument("--helm-trials", type=int, default=3, metavar="N",
                    help="HELM: in-context example draws per scenario (train trials; trial t draws with seed + t), "
                    "scores averaged over them; 3 as in HELM v1.0, zero-shot scenarios run 1")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed for passkey keys, the HELM instance sample and in-context examples (HELM trial t: "
                    "seed + t)")
    ev.add_argument("--compare", nargs="+", default=None, metavar="REPORT",
                    help="compare earlier reports (directories holding ppl.json, e.g. RUN/eval); first = baseline")
    ev.add_argument("--out", default="runs/eval", help="output directory for the reports")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ev.add_argument("--attention", choices=["auto", "flash_attention_2", "sdpa", "eager"], default="auto",
                    help="attention kernel; auto: flash_attention_2 on CUDA with flash-attn and a 16-bit --dtype, "
                    "else sdpa (flash_attention_2 with --dtype float32 is refused: flash-attn takes only bf16/fp16)")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--wandb-project", default=None, help="also log to this wandb project")
    ev.add_argument("--wandb-mode", choices=["online", "offline"], default="offline")
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="plot a run's training and validation loss and diagnose it (underfitting, "
                        "overfitting or well fit)")
    rp.add_argument("run_dir", help="the run directory (checkpoint.dir of the recipe)")
    rp.add_argument("--window", type=int, default=3, help="evaluations the rules look back over")
    rp.add_argument("--tol", type=float, default=0.01, help="relative change of the validation loss that counts")
    rp.set_defaults(func=cmd_report)

    q = sub.add_parser("quickstart", help="offline CPU demo: pre-train a tiny base, extend it x8 with PI, "
                       "print perplexity by context length before and after")
    q.add_argument("--out", default="runs/quickstart", help="output directory")
    q.add_argument("--steps-scale", type=float, default=1.0, help="scale the number of training steps")
    q.set_defaults(func=cmd_quickstart)

    rp = sub.add_parser("repro", help="reproduce a published result at tiny scale (offline, CPU)")
    rpsub = rp.add_subparsers(dest="repro_command", required=True, metavar="EXPERIMENT")
    pi = rpsub.add_parser("pi", help="Position Interpolation: pre-train at C, extend x8 with PI / none / YaRN / "
                          "dynamic NTK, perplexity at C..8C and passkey; writes a PI-paper-shaped table and plots")
    pi.add_argument("--out", default="runs/repro-pi", help="output directory (default: runs/repro-pi)")
    pi.add_argument("--fast", action="store_true", help="the ~2-minute CI-sized version")
    pi.add_argument("--seed", type=int, default=0, help="seed of every training run and of the passkey data")
    pi.add_argument("--books", type=Path, default=None,
                    help="a PG-19-shaped directory (train/ and test/) or a directory of books to split "
                    "(default: the two bundled books)")
    pi.add_argument("--fresh", action="store_true", help="start over instead of resuming an interrupted run")
    pi.add_argument("--doc", type=Path, default=None,
                    help="also write the markdown and PNGs here (e.g. docs/results/pi_tiny.md)")
    pi.set_defaults(func=cmd_repro_pi)
    return p


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-5 model.rope.factor=4")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints and start at step 0")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(func, args: argparse.Namespace) -> int:
    """Run a command; user errors become messages and exit code 2; a run stopped on purpose (preempted: 75,
    diverged: 3) one message and its own code."""
    from llmft.train.stop import TrainingStopped

    try:
        return func(args)
    except TrainingStopped as e:
        print(f"llmft: {type(e).__name__.lower()}: {e}", file=sys.stderr)
        return e.exit_code
    except _user_errors() as e:
        messages = e.messages if isinstance(e, RecipeError) else [str(e)]
        for line in messages:
            print(f"llmft: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides appear anywhere (also after flags such as --no-resume)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging()
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
