"""``llmft data build | dedup | report | inspect | validate``: data-mix recipes (``data_recipes/*.yaml``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from llmft.config import RecipeError


def register(sub) -> None:
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
        RecipeError: --keywords is empty.
    """
    from llmft.data.keyword_shift import keyword_report

    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
    if not keywords:
        raise RecipeError([f"--keywords: got {args.keywords!r}; expected comma-separated words, e.g. woman,man"])
    report, out = keyword_report(Path(args.target), keywords, None if args.out is None else Path(args.out),
                                 args.overrides)
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
    from transformers import AutoTokenizer

    from llmft.data.build import load_built
    from llmft.data.store import describe_rows

    built = load_built(Path(args.dir))
    s = built.stats
    print(json.dumps({k: v for k, v in s.items() if k != "length_histogram"}, indent=1))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or s["tokenizer"])
    for block in describe_rows(built.rows, tokenizer, args.rows, args.chars):
        print("\n" + block)
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from llmft.config.data import load_mix

    mix = load_mix(args.recipe, args.overrides, check_paths=not args.schema_only)
    print(f"# {args.recipe}: valid" + (" (schema only: paths not checked)" if args.schema_only else ""))
    print(yaml.safe_dump(mix.model_dump(mode="json"), sort_keys=False))
    return 0
