"""``llmft eval``: load each model once and run the requested evaluations on it, then write the reports.

    llmft eval --ppl pg19 --model runs/x/final --model meta-llama/Llama-2-7b-hf --data data/pg19/test \\
        --lengths 2048,4096,8192,16384,32768 --mode sliding --stride 256 --out runs/eval
    llmft eval --compare runs/base/eval runs/extended/eval --out runs/compare

A model is a directory or hub id of a Hugging Face checkpoint, or an llmft adapter directory (``method: lora`` /
``qlora`` output), which is applied to the base named in its ``adapter_config.json`` with the adapter's RoPE-scaled
config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llmft.model.build import DTYPES, ModelLoadError

log = logging.getLogger(__name__)


def load_eval_model(name: str, dtype: str = "float32", device: str = "cpu", attention: str = "sdpa"):
    """(model in eval mode, tokenizer) for a checkpoint or an llmft adapter directory.

    Raises:
        ModelLoadError: the model, its base or its tokenizer cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    try:
        if (path / "adapter_config.json").is_file():
            import json

            import peft

            from llmft.model.adapters import unquantized_base_config

            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"{path}/adapter_config.json names no base_model_name_or_path")
            model = AutoModelForCausalLM.from_pretrained(base, config=unquantized_base_config([path]),
                                                         dtype=DTYPES[dtype],
                                                         use_safetensors=True, attn_implementation=attention)
            model = peft.PeftModel.from_pretrained(model, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], use_safetensors=True,
                                                         attn_implementation=attention)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


def max_context(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def run_ppl(models: list[str], data: str, lengths: list[int], mode: str, stride: int, max_docs: int | None,
            out: Path, dtype: str = "float32", device: str = "cpu", wandb_project: str | None = None,
            wandb_mode: str = "offline", attention: str = "sdpa") -> dict:
    """Perplexity per byte of every model on the same books; writes ppl.json/md/png under ``out``.

    Raises:
        ModelLoadError: a model cannot be loaded.
        llmft.data.sources.SourceError: the books cannot be read.
    """
    from llmft.eval.pg19 import evaluate_ppl, load_books
    from llmft.eval.report import write_ppl_report

    results, books, tok_vocab = {}, None, None
    for name in models:
        model, tokenizer = load_eval_model(name, dtype, device, attention)
        if books is None or tokenizer.get_vocab() != tok_vocab:  # re-tokenize only for another tokenizer
            books = load_books(data, tokenizer, max_docs)
            tok_vocab = tokenizer.get_vocab()
        limit = max_context(model)
        beyond = [n for n in lengths if limit is not None and n > limit]
        if beyond:
            log.warning("%s: lengths %s exceed its max_position_embeddings %d (scored anyway: that is what a "
                        "context-extension comparison measures)", name, beyond, limit)
        log.info("%s: %d books, %s tokens", name, len(books), f"{sum(len(b.ids) for b in books):,}")
        results[name] = evaluate_ppl(model, books, lengths, mode, stride, device)
        del model
    protocol = {"data": str(data), "mode": mode, "stride": stride if mode == "sliding" else None,
                "lengths": sorted(lengths), "max_docs": max_docs}
    paths = write_ppl_report(results, protocol, out)
    if wandb_project:
        _log_wandb(results, protocol, wandb_project, wandb_mode, out)
    return {"results": results, "paths": paths}


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
