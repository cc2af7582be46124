"""``llmft generate`` (one prompt streamed to the terminal, or a JSONL batch) and ``llmft chat`` (multi-turn in the
terminal)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from llmft.config import RecipeError


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a run directory (its final/), a checkpoint directory or hub id, "
                   "or an llmft adapter directory (applied to its base with the adapter's RoPE config)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and compute dtype (default on CUDA: the training recipe's precision, else bfloat16; "
                   "on CPU: float32)")
    p.add_argument("--attention", choices=["auto", "flash_attention_2", "sdpa", "eager"], default=None,
                   help="attention kernel (default: the training recipe's, else auto); auto: flash_attention_2 on "
                        "CUDA with flash-attn and 16-bit, else sdpa")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding (default); > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the output at this text (not included); repeat for several")
    p.add_argument("--prefill-chunk", type=int, default=4096,
                   help="prompt tokens per forward while prefilling (bounds memory for 32K+ prompts; 0: all at once)")


def register(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a trained model (streamed), or a JSONL file of "
                       "prompts (--input/--output)")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' or absent: read it from stdin")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    g.add_argument("--input", default=None, help="batch mode: JSONL, one {\"prompt\": ..., \"id\": ...} a line")
    g.add_argument("--output", default=None, help="batch mode: JSONL of completions (default: INPUT.out.jsonl)")
    g.add_argument("--on-error", choices=["skip", "stop"], default="skip",
                   help="batch mode: a bad line is reported with file:line and skipped, or stops the run")
    g.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="batch mode: vllm serves the batch where vLLM is installed (GPU; a merged checkpoint)")
    _model_options(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a trained model in the terminal (chat template; /reset, /save FILE, "
                       "/exit)")
    c.add_argument("--template", default=None, help="a named chat template for base models without one: chatml, "
                   "llama2 (default: the tokenizer's)")
    c.add_argument("--system", default=None, help="a system prompt")
    _model_options(c)
    c.set_defaults(func=cmd_chat)


def _sampling(args: argparse.Namespace):
    from llmft.generate import Sampling

    s = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed,
                 tuple(args.stop), args.prefill_chunk)
    problems = s.problems()
    if problems:
        raise RecipeError(problems)
    return s


def _trained_with(model: str) -> dict:
    """The precision and attention of the run that made ``model`` (a run directory or its final/), from the
    recipe.yaml training wrote there; {} for anything else."""
    import yaml

    path = Path(model).expanduser()
    for run in (path, path.parent):
        recipe = run / "recipe.yaml"
        if (run / "final").is_dir() and recipe.is_file():
            raw = yaml.safe_load(recipe.read_text()) or {}
            return {"precision": (raw.get("train") or {}).get("precision"),
                    "attention": (raw.get("model") or {}).get("attention")}
    return {}


def _load(args: argparse.Namespace):
    """(model, tokenizer) as the options say; by default in the precision and with the attention of the recipe
    that trained it (16-bit only on CUDA)."""
    import torch

    from llmft.model.load import load_trained, resolve_attention

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = _trained_with(args.model)
    dtype = args.dtype or ({"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(recipe.get("precision"),
                                                                                           "bfloat16")
                           if device == "cuda" else "float32")
    requested = args.attention or recipe.get("attention") or "auto"
    attention, _ = resolve_attention(requested if requested != "flash_attention_2" or device == "cuda" else "auto",
                                     {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype])
    return load_trained(args.model, dtype, device, attention)


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise RecipeError([f"--prompt-file: {path} is not a file"])
        return path.read_text(encoding="utf-8")
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    return sys.stdin.read()


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    """``llmft generate``.

    Raises:
        RecipeError: an option is out of range.
        GenerationError: the prompt does not fit the context, a batch line is bad (with --on-error stop), or
            --engine vllm cannot run here.
        ModelLoadError: the model or its tokenizer cannot be loaded.
    """
    from llmft.generate import GenerationError, generate, generate_file

    s = _sampling(args)
    if args.engine == "vllm":
        if args.input is None:
            raise RecipeError(["--engine vllm: serves batch mode only. Fix: give --input FILE.jsonl"])
        if importlib.util.find_spec("vllm") is None:
            raise GenerationError("--engine vllm: vLLM is not installed here (it needs a CUDA GPU). Fix: pip install "
                                  "vllm on a GPU machine, or leave out --engine (transformers)")
        from llmft.serve_vllm import generate_file_vllm

        src = Path(args.input)
        dst = Path(args.output) if args.output else src.with_suffix(".out.jsonl")
        stats = generate_file_vllm(args.model, src, dst, s, args.on_error, args.dtype or "bfloat16")
        print(f"[llmft] {stats['done']} completions -> {dst}; {len(stats['bad'])} bad line(s)", file=sys.stderr)
        return 0
    model, tokenizer = _load(args)
    if args.input is not None:
        src = Path(args.input)
        dst = Path(args.output) if args.output else src.with_suffix(".out.jsonl")
        stats = generate_file(model, tokenizer, src, dst, s, args.on_error)
        print(f"[llmft] {stats['done']} completions -> {dst}; {len(stats['bad'])} bad line(s) skipped; "
              f"{stats['new_tokens']:,} tokens at {stats['tokens_per_second']:,.1f} tok/s", file=sys.stderr)
        return 0
    c = generate(model, tokenizer, _prompt(args), s, on_text=_emit)
    _emit("\n")
    print(f"[llmft] {c.new_tokens} new tokens after a {c.prompt_tokens:,}-token prompt in {c.seconds:.2f} s "
          f"({c.new_tokens / max(c.seconds, 1e-9):,.1f} tok/s); finish: {c.finish}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """``llmft chat``: one user turn per stdin line; /reset, /save FILE, /exit.

    Raises:
        RecipeError: an option is out of range.
        GenerationError: no chat template (pass --template) or an unknown one.
        ModelLoadError: the model or its tokenizer cannot be loaded.
    """
    from llmft.chat import ChatSession
    from llmft.generate import GenerationError

    s = _sampling(args)
    model, tokenizer = _load(args)
    chat = ChatSession(model, tokenizer, s, args.template, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("[llmft] chat: type a message; /reset clears the history, /save FILE writes it, /exit ends",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            chat.reset()
            print("[llmft] history cleared", file=sys.stderr)
            continue
        if text.startswith("/save"):
            target = text[len("/save"):].strip()
            if not target:
                print("[llmft] /save needs a file name: /save chat.json", file=sys.stderr)
                continue
            chat.save(Path(target))
            print(f"[llmft] conversation saved to {target}", file=sys.stderr)
            continue
        try:
            chat.reply(text, on_text=_emit)
        except GenerationError as e:  # this message does not fit: say so and keep the conversation going
            print(f"llmft: error: {e}", file=sys.stderr)
            continue
        _emit("\n")
    return 0
