"""``llmft eval`` (perplexity per byte, passkey, HELM core, comparing reports) and ``llmft report`` (a run's
learning curves and fit diagnosis)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmft.config import RecipeError
from llmft.config.eval import RULER_THRESHOLD


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate models: PG-19 perplexity per byte by context length, passkey "
                        "retrieval, RULER, HELM core scenarios; compare earlier reports")
    ev.add_argument("--model", action="append", default=[], metavar="MODEL",
                    help="a checkpoint directory, hub id or llmft adapter directory; repeat to compare models")
    ev.add_argument("--ppl", choices=["pg19"], default=None, help="perplexity per byte (and token perplexity)")
    ev.add_argument("--data", default="deepmind/pg19",
                    help="PG-19 books: a directory of <id>.txt, HF-layout jsonl/parquet, or a datasets id (test "
                    "split); default deepmind/pg19")
    ev.add_argument("--lengths", default=None,
                    help="comma-separated context lengths (default: 2048,...,32768; with --ruler RULER's "
                    "4096,...,131072, lengths beyond the model's positions skipped)")
    ev.add_argument("--mode", choices=["windows", "sliding"], default="windows",
                    help="non-overlapping windows, or sliding windows scoring only the new tokens (PI/YaRN)")
    ev.add_argument("--stride", type=int, default=256, help="sliding-window stride in tokens")
    ev.add_argument("--max-docs", type=int, default=None, help="at most this many books")
    ev.add_argument("--passkey", action="store_true", help="passkey retrieval over --lengths x --depths")
    ev.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: comma-separated key depths in [0, 1]")
    ev.add_argument("--trials", type=int, default=10, help="passkey: random keys per (length, depth) cell")
    ev.add_argument("--ruler", nargs="?", const="all", default=None, metavar="TASKS",
                    help="RULER's 13 synthetic tasks (or a comma-separated subset, e.g. niah_single_1,vt) at "
                    "--lengths; per-task scores, the average and the effective length (llmft/eval/ruler.py)")
    ev.add_argument("--samples", type=int, default=100, help="RULER: prompts per task and length (RULER ran 500)")
    ev.add_argument("--ruler-threshold", type=float, default=RULER_THRESHOLD,
                    help="RULER: the average a length must reach to count as effective "
                         "(default: Llama-2-7B's 4K average, %(default)s)")
    ev.add_argument("--haystack", default=None,
                    help="RULER: books (.txt/.txt.gz file or directory) for the essay haystack; default the shipped "
                    "public-domain books")
    ev.add_argument("--ruler-qa-data", default=None, metavar="DIR",
                    help="RULER: directory with squad.json (SQuAD v2.0 dev) and hotpotqa.json (HotpotQA dev "
                    "distractor); without them qa_1/qa_2 are skipped with a note")
    ev.add_argument("--strict", action="store_true",
                    help="RULER: a length beyond the model's positions is an error (default: skipped with a warning)")
    ev.add_argument("--beyond-context", action="store_true",
                    help="RULER: run lengths beyond the model's positions too (to measure extrapolation)")
    ev.add_argument("--drift", default=None, metavar="BASE",
                    help="what each --model / --stack changed beyond its task: KL(BASE || model) of next-token "
                    "distributions and the perplexity change on held-out text (llmft/eval/drift.py)")
    ev.add_argument("--stack", action="append", default=[], metavar="A:W,B:W",
                    help="drift: a weighted stack of adapters, e.g. runs/a/final:0.7,runs/b/final:0.3; repeatable")
    ev.add_argument("--drift-data", action="append", default=None, metavar="TEXT",
                    help="drift: a .txt/.txt.gz whose last 10%% is scored; repeatable (default: the shipped books)")
    ev.add_argument("--drift-length", type=int, default=512, help="drift: window length in tokens")
    ev.add_argument("--drift-windows", type=int, default=16, help="drift: at most this many windows per text")
    ev.add_argument("--helm", default=None, metavar="SCENARIOS",
                    help="HELM v1.0 core scenarios, comma-separated (e.g. boolq,mmlu,narrative_qa) or 'all'; "
                    "suite in llmft/eval/helm/core.yaml")
    ev.add_argument("--helm-data", default="data/helm", help="directory with the scenarios' files (see docs/eval.md)")
    ev.add_argument("--max-instances", type=int, default=None, help="HELM: at most this many eval instances each")
    ev.add_argument("--helm-trials", type=int, default=3, metavar="N",
                    help="HELM: in-context example draws per scenario (train trials; trial t draws with seed + t), "
                    "scores averaged over them; 3 as in HELM v1.0, zero-shot scenarios run 1")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed for passkey keys, the HELM instance sample and in-context examples (HELM trial t: "
                    "seed + t)")
    ev.add_argument("--task", action="append", choices=["mdqa", "summarization"], default=[],
                    help="an application: multi-document QA by gold position (Lost in the Middle; --mdqa-data), or "
                    "summarization ROUGE (BookSum-style jsonl; --summ-data); repeat for both")
    ev.add_argument("--mdqa-data", default=None, help="directory of nq-open-<k>_total_documents_gold_at_<i>.jsonl.gz")
    ev.add_argument("--mdqa-docs", default="10,20,30", help="mdqa: comma-separated numbers of documents to run")
    ev.add_argument("--summ-data", default=None, help="summarization: jsonl of {chapter, summary_text}")
    ev.add_argument("--max-examples", type=int, default=None, help="tasks: at most this many examples per file")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="tasks and RULER: tokens generated per answer (default: mdqa 100, summarization 256; RULER's "
                    "per task, 30-128)")
    ev.add_argument("--compare", nargs="+", default=None, metavar="REPORT",
                    help="compare earlier reports (directories holding ppl.json and/or ruler.json, e.g. RUN/eval); "
                    "first = baseline")
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


PPL_LENGTHS = "2048,4096,8192,16384,32768"


def _lengths(text: str | None, default: str = PPL_LENGTHS) -> list[int]:
    text = default if text is None else text
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError([f"--lengths: got {text!r}; expected comma-separated token counts, e.g. 2048,4096"]) from None
    if not lengths or min(lengths) < 2:
        raise RecipeError([f"--lengths: got {text!r}; every length must be at least 2 tokens"])
    return lengths


def _ruler(args: argparse.Namespace):
    """The RULER request, or None.

    Raises:
        RecipeError: an unknown task, or --samples / --max-new-tokens out of range.
    """
    from llmft.eval.ruler import DEFAULT_LENGTHS, TASKS
    from llmft.eval.run import RulerRequest

    if args.ruler is None:
        return None
    names = list(TASKS) if args.ruler == "all" else [t.strip() for t in args.ruler.split(",") if t.strip()]
    problems = [f"--ruler: unknown task {t!r}; expected 'all' or some of {', '.join(TASKS)}"
                for t in names if t not in TASKS]
    if not names:
        problems.append(f"--ruler: got {args.ruler!r}; expected 'all' or task names, e.g. niah_single_1,vt")
    if args.samples < 1:
        problems.append(f"--samples: got {args.samples}; expected at least 1 prompt per task and length")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens: got {args.max_new_tokens}; expected at least 1")
    if args.haystack is not None and not Path(args.haystack).exists():
        problems.append(f"--haystack: {args.haystack} does not exist; expected a .txt book or a directory of them")
    if problems:
        raise RecipeError(problems)
    lengths = _lengths(args.lengths, ",".join(str(n) for n in DEFAULT_LENGTHS))
    return RulerRequest(names, lengths, args.samples, args.seed, args.haystack, args.ruler_qa_data,
                        args.ruler_threshold, args.strict, args.beyond_context, args.max_new_tokens)


def _requests(args: argparse.Namespace):
    """(ppl, passkey, helm) requests from the arguments, each None when not asked for; checked before any model
    is loaded.

    Raises:
        RecipeError: an option is out of range, or a HELM scenario is unknown.
    """
    from llmft.eval.run import HelmRequest, PasskeyRequest, PplRequest

    ppl = passkey = helm = None
    if args.ppl is not None or args.passkey:
        lengths = _lengths(args.lengths)
    if args.passkey:
        try:
            depths = [float(d) for d in args.depths.split(",") if d.strip()]
        except ValueError:
            raise RecipeError([f"--depths: got {args.depths!r}; expected fractions in [0, 1], e.g. 0,0.5,1"]) from None
        if not depths or not all(0 <= d <= 1 for d in depths):
            raise RecipeError([f"--depths: got {args.depths!r}; every depth must be in [0, 1]"])
        passkey = PasskeyRequest(lengths, depths, args.trials, args.seed)
    if args.helm is not None:
        from llmft.eval.helm import DEFAULT_SUITE, load_helm_suite, select_scenarios

        if args.helm_trials < 1:
            raise RecipeError([f"--helm-trials: got {args.helm_trials}; expected at least 1 (HELM v1.0 ran 3)"])
        names = [n.strip() for n in args.helm.split(",") if n.strip()]
        try:
            select_scenarios(load_helm_suite(DEFAULT_SUITE), names)
        except ValueError as e:
            raise RecipeError([f"--helm: {e}"]) from None
        helm = HelmRequest(names, Path(args.helm_data), args.max_instances, args.seed, args.helm_trials)
    if args.ppl is not None:
        if args.mode == "sliding" and min(lengths) <= args.stride:
            raise RecipeError([f"--stride {args.stride} must be below every length (got {min(lengths)}): each window "
                               "keeps length - stride tokens of context. Fix: lower --stride or drop that length"])
        ppl = PplRequest(args.data, lengths, args.mode, args.stride, args.max_docs)
    return ppl, passkey, helm


def cmd_eval(args: argparse.Namespace) -> int:
    """``llmft eval``: the requested evaluations of every --model (each loaded once), or --compare of reports.

    Raises:
        RecipeError: no evaluation or no model was given, an option is out of range, or the data is missing.
    """
    from llmft.eval import run as ev

    out = Path(args.out)
    if args.compare:
        return _compare([Path(p) for p in args.compare], out)
    if args.drift is not None:
        return _drift(args, out)
    if args.ppl is None and args.helm is None and not args.passkey and not args.task and args.ruler is None:
        raise RecipeError(["llmft eval: choose an evaluation (--ppl pg19, --passkey, --ruler, --helm SCENARIOS, "
                           "--task mdqa|summarization, --drift BASE) or --compare REPORT..."])
    if not args.model:
        raise RecipeError(["llmft eval: give at least one --model (a checkpoint directory, hub id or adapter)"])
    ppl, passkey, helm = _requests(args)
    ruler = _ruler(args)
    from llmft.data.sources import SourceError
    from llmft.model.load import resolve_attention

    # flash-attn computes only in bf16/fp16: the kernel follows --dtype (auto: sdpa in float32)
    attention, reason = resolve_attention(args.attention, {"float32": "fp32", "bfloat16": "bf16",
                                                           "float16": "fp16"}[args.dtype])
    logging.getLogger("llmft").info("attention: %s (%s)", attention, reason)
    try:
        results = ev.evaluate(args.model, out, ppl=ppl, passkey=passkey, helm=helm, tasks=_tasks(args), ruler=ruler,
                              dtype=args.dtype,
                              device=args.device or ev.device_default(), attention=attention,
                              wandb_project=args.wandb_project, wandb_mode=args.wandb_mode)
    except (SourceError, FileNotFoundError, ValueError) as e:  # books or a scenario's file missing: what to fix
        raise RecipeError([f"llmft eval: {e}"]) from None
    _print(results)
    return 0


def _drift(args: argparse.Namespace, out: Path) -> int:
    """``--drift BASE``: every --model and --stack against BASE on held-out text.

    Raises:
        RecipeError: nothing to compare, an option out of range, a malformed stack, a missing text or model.
    """
    from llmft.eval.drift import drift_table, run_drift, write_drift_report
    from llmft.model.load import ModelLoadError

    problems = []
    if not args.model and not args.stack:
        problems.append("--drift: give the fine-tuned models or adapters to compare (--model, repeatable) or "
                        "--stack A:W,B:W")
    for flag, value in (("--drift-length", args.drift_length), ("--drift-windows", args.drift_windows)):
        if value < 2:
            problems.append(f"{flag}: got {value}; expected at least 2")
    if problems:
        raise RecipeError(problems)
    from llmft.eval.run import device_default

    device = args.device or device_default()
    try:
        r = run_drift(args.drift, args.model, args.stack, args.drift_data, args.drift_length, args.drift_windows,
                      args.dtype, device)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        raise RecipeError([f"llmft eval --drift: {e}"]) from None
    paths = write_drift_report(r, out)
    print(f"# drift from {args.drift}\n" + drift_table(r))
    print(f"[llmft] drift report written to {paths['markdown']}, {paths['json']} and {paths['plot']}")
    return 0


def _compare(paths: list[Path], out: Path) -> int:
    """``--compare``: the perplexity reports and the RULER reports that every path holds, side by side.

    Raises:
        RecipeError: the paths share no report kind, or their reports were measured differently.
    """
    from llmft.eval.report import compare_reports, load_report
    from llmft.eval.ruler import compare_ruler, load_ruler

    done = 0
    for load, compare, kind in ((load_report, compare_reports, "perplexity"), (load_ruler, compare_ruler, "RULER")):
        try:
            for p in paths:
                load(p)
        except FileNotFoundError:
            continue
        try:
            written = compare(paths, out)
        except ValueError as e:
            raise RecipeError([f"--compare: {e}"]) from None
        print(written["table"])
        print(f"[llmft] {kind} comparison written to {written['markdown']} and {written['plot']}")
        done += 1
    if not done:
        raise RecipeError([f"--compare: {', '.join(map(str, paths))}: no ppl.json or ruler.json in every one of "
                           "them. Fix: run `llmft eval --ppl pg19` or `llmft eval --ruler` with --out there first"])
    return 0


def _tasks(args: argparse.Namespace):
    """The application tasks asked for, or None.

    Raises:
        RecipeError: a task without its data, or --mdqa-docs / --max-examples out of range.
    """
    from llmft.eval.run import TaskRequest

    if not args.task:
        return None
    problems = []
    if "mdqa" in args.task and not args.mdqa_data:
        problems.append("--task mdqa: give --mdqa-data DIR (the nq-open-<k>_total_documents_gold_at_<i>.jsonl.gz "
                        "files of Lost in the Middle, or the synthetic ones of llmft.data.synthetic)")
    if "summarization" in args.task and not args.summ_data:
        problems.append("--task summarization: give --summ-data FILE.jsonl ({\"chapter\", \"summary_text\"} rows)")
    try:
        docs = [int(x) for x in args.mdqa_docs.split(",") if x.strip()]
    except ValueError:
        docs = []
    if not docs or min(docs) < 1:
        problems.append(f"--mdqa-docs: got {args.mdqa_docs!r}; expected numbers of documents, e.g. 10,20,30")
    for flag, value in (("--max-examples", args.max_examples), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            problems.append(f"{flag}: got {value}; expected at least 1")
    if problems:
        raise RecipeError(problems)
    return TaskRequest(args.task, Path(args.mdqa_data) if args.mdqa_data else None, docs,
                       Path(args.summ_data) if args.summ_data else None, args.max_examples, args.max_new_tokens)


def _print(results) -> None:
    from llmft.eval.helm import format_helm_table
    from llmft.eval.passkey import format_passkey_table
    from llmft.eval.report import ppl_table

    for name, (r, paths) in results.passkey.items():
        print(f"# passkey retrieval: {name}\n" + format_passkey_table(r))
        print(f"[llmft] passkey report written to {', '.join(str(p) for p in paths.values())}")
    for name, (r, paths) in results.ruler.items():
        from llmft.eval.ruler import ruler_table

        print(f"# RULER: {name}\n" + ruler_table(r))
        print(f"[llmft] RULER report written to {paths['markdown']}, {paths['json']} and {paths['plot']}")
    for name, (r, (json_path, md_path)) in results.helm.items():
        print(f"# HELM core: {name}\n" + format_helm_table(r))
        print(f"[llmft] HELM report written to {md_path} and {json_path}")
    if results.mdqa:
        from llmft.eval.applications import mdqa_table

        for name, r in results.mdqa.items():
            print(f"# multi-document QA: {name}\n" + mdqa_table(r))
        paths = results.mdqa_paths
        print(f"[llmft] MDQA report written to {paths['markdown']}, {paths['json']} and {paths['plot']}")
    for name, r in results.summarization.items():
        print(f"# summarization: {name}: ROUGE-1 {r['rouge1']:.2f}, ROUGE-2 {r['rouge2']:.2f}, ROUGE-L "
              f"{r['rougeL']:.2f} over {r['n']} examples ({r['too_long']} longer than the context)")
    if results.ppl is not None:
        print(ppl_table(results.ppl))
        paths = results.ppl_paths
        print(f"[llmft] report written to {paths['markdown']}, {paths['json']} and {paths['plot']}")


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
