"""``llmft eval``: load each model once and run the requested evaluations on it, then write the reports.

    llmft eval --ppl pg19 --model runs/x/final --model meta-llama/Llama-2-7b-hf --data data/pg19/test \\
        --lengths 2048,4096,8192,16384,32768 --mode sliding --stride 256 --out runs/eval
    llmft eval --compare runs/base/eval runs/extended/eval --out runs/compare

A model is a directory or hub id of a Hugging Face checkpoint, or an llmft adapter directory (``method: lora`` /
``qlora`` output), which is applied to the base named in its ``adapter_config.json`` with the adapter's RoPE-scaled
config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmft.config.eval import RULER_THRESHOLD
from llmft.model.load import load_trained

log = logging.getLogger(__name__)


# one loader for every command that runs a trained model (eval, generate, chat)
load_eval_model = load_trained


def max_context(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


@dataclass(frozen=True)
class PplRequest:
    """Perplexity per byte on PG-19-shaped books (``llmft eval --ppl``)."""

    data: str
    lengths: list[int]
    mode: str = "windows"
    stride: int = 256
    max_docs: int | None = None


@dataclass(frozen=True)
class PasskeyRequest:
    """Passkey retrieval over lengths x depths (``llmft eval --passkey``)."""

    lengths: list[int]
    depths: list[float]
    trials: int = 10
    seed: int = 0


@dataclass(frozen=True)
class RulerRequest:
    """RULER's synthetic tasks at several lengths (``llmft eval --ruler``)."""

    tasks: list[str]
    lengths: list[int]
    samples: int = 100
    seed: int = 0
    haystack: str | None = None
    qa_dir: str | None = None
    threshold: float = RULER_THRESHOLD
    strict: bool = False
    beyond_context: bool = False
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class HelmRequest:
    """HELM core scenarios (``llmft eval --helm``)."""

    scenarios: list[str]
    data_dir: Path
    max_instances: int | None = None
    seed: int = 0
    trials: int = 3


@dataclass(frozen=True)
class TaskRequest:
    """The application tasks (``llmft eval --task mdqa | summarization``)."""

    tasks: list[str]
    mdqa_data: Path | None = None
    mdqa_docs: list[int] | None = None
    summ_data: Path | None = None
    max_examples: int | None = None
    max_new_tokens: int | None = None


@dataclass
class EvalResults:
    """What :func:`evaluate` measured and wrote: per evaluation, per model, the results and the report paths."""

    passkey: dict[str, tuple[dict, dict[str, Path]]] = field(default_factory=dict)  # model: (results, paths)
    ruler: dict[str, tuple[dict, dict[str, Path]]] = field(default_factory=dict)  # model: (results, paths)
    helm: dict[str, tuple[dict, tuple[Path, Path]]] = field(default_factory=dict)  # model: (results, (json, md))
    ppl: dict | None = None  # {model: {length: result}}
    ppl_paths: dict[str, Path] | None = None
    mdqa: dict[str, dict] = field(default_factory=dict)  # model: results
    mdqa_paths: dict[str, Path] | None = None
    summarization: dict[str, dict] = field(default_factory=dict)  # model: ROUGE


def evaluate(models: list[str], out: Path, *, ppl: PplRequest | None = None, passkey: PasskeyRequest | None = None,
             helm: HelmRequest | None = None, tasks: TaskRequest | None = None, ruler: RulerRequest | None = None,
             dtype: str = "float32",
             device: str = "cpu", attention: str = "sdpa",
             wandb_project: str | None = None, wandb_mode: str = "offline") -> EvalResults:
    """Load each model once and run every requested evaluation on it; write the reports under ``out``.

    Passkey, RULER and HELM reports go to ``out`` for one model and ``out/passkey-<i>``, ``out/ruler-<i>``,
    ``out/helm-<i>`` for several; the
    perplexity report (ppl.json/md/png) compares all models in ``out``. Books are tokenized again only for a model
    with another tokenizer.

    Raises:
        ModelLoadError: a model cannot be loaded.
        llmft.data.sources.SourceError: the books cannot be read.
        HelmDataError: a HELM scenario's data file is missing.
        ValueError: an unknown HELM scenario, a request out of range, or (strict) a RULER length beyond a model's
            positions.
    """
    from llmft.eval.passkey import run_passkey, write_passkey_report

    results = EvalResults()
    ppl_results, books, tok_vocab = {}, None, None
    for i, name in enumerate(models):
        model, tokenizer = load_eval_model(name, dtype, device, attention)
        if passkey is not None:
            r = run_passkey(model, tokenizer, passkey.lengths, passkey.depths, passkey.trials, passkey.seed, device,
                            model_name=name)
            results.passkey[name] = (r, write_passkey_report(r, out if len(models) == 1 else out / f"passkey-{i}"))
        if ruler is not None:
            from llmft.eval.ruler import run_ruler, write_ruler_report

            r = run_ruler(model, tokenizer, ruler.tasks, ruler.lengths, ruler.samples, ruler.seed,
                          haystack=ruler.haystack, qa_dir=ruler.qa_dir, threshold=ruler.threshold,
                          strict=ruler.strict, allow_beyond=ruler.beyond_context,
                          max_new_tokens=ruler.max_new_tokens, model_name=name)
            results.ruler[name] = (r, write_ruler_report(r, out if len(models) == 1 else out / f"ruler-{i}"))
        if helm is not None:
            from llmft.eval.helm import run_helm, write_helm_report

            r = run_helm(model, tokenizer, helm.scenarios, helm.data_dir, helm.max_instances, helm.seed,
                         trials=helm.trials)
            results.helm[name] = (r, write_helm_report(r, out if len(models) == 1 else out / f"helm-{i}"))
        if tasks is not None:
            from llmft.eval import applications as apps

            new = {"max_new_tokens": tasks.max_new_tokens} if tasks.max_new_tokens else {}
            if "mdqa" in tasks.tasks:
                results.mdqa[name] = apps.run_mdqa(model, tokenizer, tasks.mdqa_data, tasks.mdqa_docs,
                                                   tasks.max_examples, **new)
            if "summarization" in tasks.tasks:
                results.summarization[name] = apps.run_summarization(model, tokenizer, tasks.summ_data,
                                                                     tasks.max_examples, **new)
        if ppl is not None:
            from llmft.eval.pg19 import load_books
            from llmft.eval.ppl import evaluate_ppl

            if books is None or tokenizer.get_vocab() != tok_vocab:  # re-tokenize only for another tokenizer
                books = load_books(ppl.data, tokenizer, ppl.max_docs)
                tok_vocab = tokenizer.get_vocab()
            limit = max_context(model)
            beyond = [n for n in ppl.lengths if limit is not None and n > limit]
            if beyond:
                log.warning("%s: lengths %s exceed its max_position_embeddings %d (scored anyway: that is what a "
                            "context-extension comparison measures)", name, beyond, limit)
            log.info("%s: %d books, %s tokens", name, len(books), f"{sum(len(b.ids) for b in books):,}")
            ppl_results[name] = evaluate_ppl(model, books, ppl.lengths, ppl.mode, ppl.stride, device)
        del model
    if results.mdqa:
        from llmft.eval.applications import write_mdqa_report

        results.mdqa_paths = write_mdqa_report(results.mdqa, out)
    if results.summarization:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summarization.json").write_text(json.dumps(results.summarization, indent=1))
    if ppl is not None:
        from llmft.eval.report import write_ppl_report

        protocol = {"data": str(ppl.data), "mode": ppl.mode, "stride": ppl.stride if ppl.mode == "sliding" else None,
                    "lengths": sorted(ppl.lengths), "max_docs": ppl.max_docs}
        results.ppl, results.ppl_paths = ppl_results, write_ppl_report(ppl_results, protocol, out)
        if wandb_project:
            _log_wandb(ppl_results, protocol, wandb_project, wandb_mode, out)
    return results


def _log_wandb(results: dict, protocol: dict, project: str, mode: str, out: Path) -> None:
    import wandb

    run = wandb.init(project=project, mode=mode, dir=str(out), job_type="eval", config=protocol)
    try:
        for model, res in results.items():
            for n, r in res.items():
                run.log({f"eval/{model}/ppl_per_byte": r["ppl_per_byte"], f"eval/{model}/token_ppl": r["token_ppl"],
                         "context_length": int(n)})
        run.log({"eval/ppl_plot": wandb.Image(str(out / "ppl.png"))})
    finally:
        run.finish()


def device_default() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
