"""``llmft repro pi``: the Position Interpolation experiment at tiny scale, from scratch, offline, on CPU.

The PI paper (Chen et al., 2023, Table 1 and Figure 1) extends LLaMA-7B from 2K to 32K: with interpolation and ~1000
steps of fine-tuning, PG-19 perplexity keeps falling as the window grows, while the base model explodes past its
trained length and fine-tuning without interpolation extends slowly. This driver runs the same experiment with a
4-layer LLaMA pre-trained at C = 128 tokens and extended x8 to 8C = 1024, through the normal recipes
(``recipes/repro/``), data reader, training loop and evaluation:

1. split the books into a PG-19-shaped directory (``OUT/books/train``, ``OUT/books/test``): the bundled two books
   by default (the last 10% of each, cut at a paragraph, held out), or ``--books DIR`` (a PG-19 layout with
   ``train/`` and ``test/`` is used as it is; a flat directory of books is split like the bundled ones);
2. pre-train the base at C (``recipes/repro/base.yaml``);
3. fine-tune N steps at 8C with each method: linear PI (``ft_linear``), no interpolation (``ft_none``), YaRN
   (``ft_yarn``), dynamic NTK (``ft_dynamic``); the same N, lr and data for all;
4. perplexity per byte (and token perplexity) of the held-out text at C, 2C, 4C, 8C for the base as is, each
   scaling applied to the base without training, and each fine-tuned model;
5. passkey retrieval at C..8C for the PI model and for the PI model after a short passkey-aware fine-tune
   (``ft_passkey``: synthetic passkey prompts of C..8C tokens, keys disjoint from the evaluation keys);
6. ``OUT/pi_tiny.md`` (the table shaped like the paper's, the paper's three claims checked, the commands, the
   seed), ``OUT/results.json`` and two PNGs; ``--doc PATH`` writes the same markdown and PNGs there too (text the
   user appended after the "not regenerated" marker of an existing doc is kept).

Runs resume: an interrupted repro continues from the last checkpoint of the step it was in (``--fresh`` starts
over). ``--fast`` is a ~2-minute version (the tiny quickstart model, fewer steps, a slice of the held-out text)
used as the CI integration test.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from llmft.config import RecipeError, RopeConfig, load_recipe
from llmft.config.loading import shipped_path
from llmft.config.sources import SourceSpec
from llmft.data.sources import read_source

RECIPES = "recipes/repro"  # shipped with llmft: read from the installed package
BUNDLED_BOOKS = ("llmft/assets/frankenstein.txt.gz", "llmft/assets/mobydick.txt.gz")
HELD_OUT = 0.1
MARKER = "<!-- written by `llmft repro pi` above this line; text below it is kept when the doc is regenerated -->"


@dataclass(frozen=True)
class Scale:
    """How big a repro is: steps per phase and how much is evaluated."""

    base_steps: int
    ft_steps: int
    passkey_steps: int
    passkey_examples: int
    eval_tokens_per_book: int | None  # None: the whole held-out text
    passkey_trials: int
    model: str | None = None  # overrides the base recipe's model.name (None: the recipe's)
    ft_lr: float | None = None  # overrides the fine-tune recipes' lr (None: the recipes')


FULL = Scale(base_steps=600, ft_steps=100, passkey_steps=80, passkey_examples=1500, eval_tokens_per_book=None,
             passkey_trials=5)
FAST = Scale(base_steps=300, ft_steps=60, passkey_steps=6, passkey_examples=60, eval_tokens_per_book=4096,
             passkey_trials=1, model="llmft/assets/tiny-llama", ft_lr=2e-3)

# (key, label, fine-tune recipe or None, rope scaling applied to the base for the untrained rows)
METHODS = (
    ("base", "(a) base, RoPE as trained (extrapolation)", None, None),
    ("pi", "(b) PI x8, no fine-tuning", None, "linear"),
    ("ft_linear", "(c) PI x8 + N steps at 8C", "ft_linear", None),
    ("ft_none", "(d) no interpolation + N steps at 8C", "ft_none", None),
    ("yarn", "(e) YaRN x8, no fine-tuning", None, "yarn"),
    ("ft_yarn", "(e) YaRN x8 + N steps at 8C", "ft_yarn", None),
    ("dynamic", "(e) dynamic NTK x8, no fine-tuning", None, "dynamic"),
    ("ft_dynamic", "(e) dynamic NTK x8 + N steps at 8C", "ft_dynamic", None),
)
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_EVAL_SEED = 0


def _log(msg: str) -> None:
    print(f"[llmft] repro pi: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- books


def _cut(text: str, fraction: float) -> tuple[str, str]:
    """Split ``text`` at the first paragraph break after ``1 - fraction`` of its characters."""
    at = int(len(text) * (1 - fraction))
    brk = text.find("\n\n", at)
    at = brk + 2 if brk != -1 else at
    return text[:at], text[at:]


def prepare_books(out: Path, books: Path | None) -> tuple[Path, Path, str]:
    """Write (or find) the PG-19-shaped train/test directories.

    Returns:
        (train dir, test dir, a one-line description of the split)

    Raises:
        RecipeError: ``books`` holds no ``.txt`` books.
    """
    if books is not None and (books / "train").is_dir() and (books / "test").is_dir():
        return books / "train", books / "test", f"{books}: its own train/ and test/ books (PG-19 layout)"
    if books is None:
        sources = [shipped_path(p) for p in BUNDLED_BOOKS]
        where = "the two bundled books (Frankenstein, Moby Dick; Project Gutenberg #84, #2701)"
    else:
        sources = sorted(p for p in books.iterdir()
                         if p.suffix in (".txt", ".gz", ".zst") and not p.name.startswith("."))
        where = f"{len(sources)} books from {books}"
        if not sources:
            raise RecipeError([f"--books {books}: no .txt books there (nor train/ and test/ directories)"])
    dest = out / "books"
    train_dir, test_dir = dest / "train", dest / "test"
    shutil.rmtree(dest, ignore_errors=True)
    train_dir.mkdir(parents=True)
    test_dir.mkdir(parents=True)
    for src in sources:
        (doc,) = read_source(SourceSpec(format="text", path=src), on_error="stop")  # .txt, .gz or .zst: one book
        head, tail = _cut(doc.text, HELD_OUT)
        name = src.name.split(".")[0] + ".txt"
        (train_dir / name).write_text(head, encoding="utf-8")
        (test_dir / name).write_text(tail, encoding="utf-8")
    return train_dir, test_dir, f"{where}; the last {HELD_OUT:.0%} of each (from a paragraph break) held out"


# ---------------------------------------------------------------------------------------------------- passkey data


def passkey_training_file(path: Path, tokenizer, count: int, min_len: int, max_len: int, seed: int) -> Path:
    """``count`` passkey prompt/completion pairs (jsonl) of uniform random length in [min_len, max_len] tokens and
    uniform depth; the keys avoid every key the evaluation draws (its seed's grid), so no answer is memorized."""
    from llmft.eval.passkey import KEY_HIGH, KEY_LOW, passkey_prompt

    taken = set(np.random.default_rng(PASSKEY_EVAL_SEED).integers(KEY_LOW, KEY_HIGH + 1, size=100_000).tolist())
    rng = np.random.default_rng(seed + 1000)
    with path.open("w", encoding="utf-8") as f:
        written = 0
        while written < count:
            key = int(rng.integers(KEY_LOW, KEY_HIGH + 1))
            if key in taken:
                continue
            length, depth = int(rng.integers(min_len, max_len + 1)), float(rng.uniform(0, 1))
            p = passkey_prompt(tokenizer, length, depth, key=key)
            f.write(json.dumps({"prompt": p.text, "completion": f" {key}."}) + "\n")
            written += 1
    return path


# ---------------------------------------------------------------------------------------------------- diagnosis


POSITION_ROWS = ("base", "pi", "ft_linear", "ft_none", "ft_yarn")


@torch.no_grad()
def nll_by_position(model: torch.nn.Module, books: list, length: int, bucket: int) -> list[float]:
    """Mean NLL (nats per token) by position in non-overlapping windows of ``length`` tokens (the windows of the
    perplexity table), averaged over ``bucket`` consecutive positions: element i covers the predictions of the
    tokens at positions 1 + i * bucket .. (i + 1) * bucket of a window.

    Raises:
        ValueError: no book has ``length`` tokens.
    """
    model.eval()
    sums, windows = torch.zeros(length - 1, dtype=torch.float64), 0  # (L - 1,)
    for book in books:
        ids = torch.from_numpy(book.ids).long()
        for start in range(0, len(ids) - length + 1, length):
            x = ids[start : start + length][None]  # (1, L)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()  # (L - 1, v)
            sums += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").double()
            windows += 1
    if windows == 0:
        raise ValueError(f"no held-out book has {length} tokens")
    mean = sums / windows  # (L - 1,)
    return [float(mean[i : i + bucket].mean()) for i in range(0, length - 1, bucket)]


# ---------------------------------------------------------------------------------------------------- driver


def _recipe(name: str, out: Path, scale: Scale, seed: int, train_dir: Path, model_name: str | None = None):
    overrides = [f"checkpoint.dir={out / name}", f"train.seed={seed}"]
    if model_name is not None:
        overrides.append(f"model.name={model_name}")
    rec = load_recipe(shipped_path(f"{RECIPES}/{name}.yaml"), overrides)
    rec.data.sources = [SourceSpec(format="text", path=train_dir)]
    rec.data.validation_fraction = 0.0
    return rec


def _train(rec, steps: int, fresh: bool) -> Path:
    from llmft.train.loop import train

    rec.train.max_steps = steps
    rec.train.warmup_steps = min(rec.train.warmup_steps, max(1, steps // 10))
    rec.checkpoint.every_steps = min(rec.checkpoint.every_steps, steps)
    run_dir = Path(rec.checkpoint.dir)
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    train(rec, resume=True)
    return run_dir / "final"


def _scaled_base(base: Path, kind: str, factor: float):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmft.model.rope import apply_rope_scaling

    config = AutoConfig.from_pretrained(base)
    apply_rope_scaling(config, RopeConfig(type=kind, factor=factor))
    return AutoModelForCausalLM.from_pretrained(base, config=config)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def run_pi(out: Path, fast: bool = False, seed: int = 0, books: Path | None = None, fresh: bool = False,
           doc: Path | None = None, command: str | None = None) -> dict:
    """Run the whole experiment; returns the results written to ``OUT/results.json``.

    Raises:
        RecipeError: ``books`` holds no books.
    """
    from transformers import AutoTokenizer

    from llmft.eval.passkey import run_passkey
    from llmft.eval.pg19 import load_books
    from llmft.eval.ppl import evaluate_ppl

    started = time.time()
    scale = FAST if fast else FULL
    out = Path(out).resolve()
    doc = Path(doc).resolve() if doc is not None else None
    books = Path(books).resolve() if books is not None else None
    if fresh:
        for sub in ("base", "passkey_data", *[m[2] for m in METHODS if m[2]], "ft_passkey"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir, split = prepare_books(out, books)
    timings: dict[str, float] = {}

    # 1. the base at C
    t0 = time.time()
    base_rec = _recipe("base", out, scale, seed, train_dir, scale.model)
    C = base_rec.model.max_seq_len
    _log(f"1/4 pre-training the base at C = {C} tokens ({scale.base_steps} steps)")
    base = _train(base_rec, scale.base_steps, fresh)
    timings["pretrain"] = time.time() - t0

    # 2. the fine-tunes at 8C, same steps and data
    finals: dict[str, Path] = {}
    factor, target = None, None
    for key, label, recipe, _ in METHODS:
        if recipe is None:
            continue
        t0 = time.time()
        rec = _recipe(recipe, out, scale, seed, train_dir, str(base))
        rec.train.lr = scale.ft_lr or rec.train.lr
        factor = rec.model.rope.factor if rec.model.rope is not None else factor
        target = rec.model.max_seq_len
        _log(f"2/4 fine-tuning {label.split(' ', 1)[1]} ({scale.ft_steps} steps at {target} tokens)")
        finals[key] = _train(rec, scale.ft_steps, fresh)
        timings[recipe] = time.time() - t0
    factor = float(factor or 8.0)
    lengths = [C * 2**i for i in range(int(math.log2(target // C)) + 1)]  # C .. 8C

    # 3. perplexity by length for every row
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base)
    test_books = load_books(test_dir, tokenizer)
    if scale.eval_tokens_per_book is not None:
        for b in test_books:
            b.ids, b.nbytes = b.ids[: scale.eval_tokens_per_book], b.nbytes[: scale.eval_tokens_per_book]
    _log(f"3/4 perplexity of {sum(len(b.ids) for b in test_books):,} held-out tokens at {lengths}")
    ppl: dict[str, dict[int, dict]] = {}
    by_position: dict[str, list[float]] = {}
    bucket = C // 2
    for key, label, recipe, kind in METHODS:
        model = _load(finals[key]) if recipe else (_scaled_base(base, kind, factor) if kind else _load(base))
        ppl[key] = evaluate_ppl(model, test_books, lengths, mode="windows")
        if key in POSITION_ROWS:
            by_position[key] = nll_by_position(model, test_books, target, bucket)
        _log(f"    {label}: " + ", ".join(f"{n}: {ppl[key][n]['ppl_per_byte']:.3f}" for n in lengths))
    timings["eval_ppl"] = time.time() - t0

    # 4. passkey: the PI model as trained on books, then after a short passkey-aware fine-tune
    t0 = time.time()
    data_dir = out / "passkey_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    pk_file = passkey_training_file(data_dir / "passkey_train.jsonl", tokenizer, scale.passkey_examples,
                                    min(C, target // 4), target - 8, seed)
    pk_rec = _recipe("ft_passkey", out, scale, seed, train_dir, str(finals["ft_linear"]))
    pk_rec.data.sources = [SourceSpec(format="prompt_completion", path=pk_file)]
    _log(f"4/4 passkey-aware fine-tune of (c) ({scale.passkey_steps} steps), then passkey retrieval at {lengths}")
    finals["ft_passkey"] = _train(pk_rec, scale.passkey_steps, fresh)
    passkey = {}
    for key in ("ft_linear", "ft_passkey"):
        passkey[key] = run_passkey(_load(finals[key]), tokenizer, lengths, list(PASSKEY_DEPTHS),
                                   scale.passkey_trials, seed=PASSKEY_EVAL_SEED, model_name=key, progress=False)
        _log(f"    passkey {key}: overall {passkey[key]['accuracy']:.0%}")
    timings["passkey"] = time.time() - t0
    timings["total"] = time.time() - started

    results = {
        "scale": "fast" if fast else "full", "seed": seed, "context": C, "factor": factor, "target": target,
        "lengths": lengths, "split": split, "settings": asdict(scale), "timings_s": timings,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": command or _command(fast, seed, books, doc),
        "eval_tokens": {b.name: len(b.ids) for b in test_books},
        "ppl": {k: {str(n): r for n, r in v.items()} for k, v in ppl.items()},
        "nll_by_position": {"bucket": bucket, "length": target, "rows": by_position},
        "passkey": {k: {**{f: v[f] for f in ("model", "lengths", "depths", "trials", "seed", "accuracy", "cells")},
                        **_answers(v)} for k, v in passkey.items()},
        "checks": checks(ppl, lengths),
    }
    write_outputs(results, out, doc)
    _log(f"done in {timings['total'] / 60:.1f} min: {out / 'pi_tiny.md'}" + (f", {doc}" if doc else ""))
    return results


def _answers(passkey: dict) -> dict:
    """How varied the model's answers are: a model that retrieves gives as many answers as there are keys; one
    that learned only the answer's format repeats one guess."""
    answers = [r["answer"] for r in passkey["records"]]
    common = max(set(answers), key=answers.count) if answers else None
    return {"trials": len(answers), "distinct_answers": len(set(answers)), "most_common_answer": common,
            "most_common_share": answers.count(common) / len(answers) if answers else None}


def _command(fast: bool, seed: int, books: Path | None, doc: Path | None) -> str:
    parts = ["llmft repro pi", "--fresh"] + (["--fast"] if fast else []) + [f"--seed {seed}"]
    if books is not None:
        parts.append(f"--books {books}")
    if doc is not None:
        parts.append(f"--doc {doc.relative_to(Path.cwd()) if doc.is_relative_to(Path.cwd()) else doc}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- report


def checks(ppl: dict[str, dict[int, dict]], lengths: list[int]) -> list[dict]:
    """The paper's three claims, each with the numbers it rests on (perplexity per byte, and token perplexity)."""
    C, L = lengths[0], lengths[-1]

    def v(key: str, n: int, metric: str = "ppl_per_byte") -> float:
        return ppl[key][n][metric]

    return [
        {"claim": "(c) PI + fine-tuning: ppl at 8C <= ppl at C", "holds": v("ft_linear", L) <= v("ft_linear", C),
         "numbers": f"{v('ft_linear', L):.3f} at {L} vs {v('ft_linear', C):.3f} at {C} (per byte)"},
        {"claim": "(a) the base at 8C is >= 10x worse than at C (token perplexity, as the paper's table)",
         "holds": v("base", L, "token_ppl") >= 10 * v("base", C, "token_ppl"),
         "numbers": f"token ppl {v('base', L, 'token_ppl'):.1f} at {L} vs {v('base', C, 'token_ppl'):.1f} at {C} "
                    f"({v('base', L, 'token_ppl') / v('base', C, 'token_ppl'):.1f}x); per byte "
                    f"{v('base', L):.3f} vs {v('base', C):.3f} ({v('base', L) / v('base', C):.2f}x)"},
        {"claim": "(d) no interpolation is worse than (c) at 8C after the same steps",
         "holds": v("ft_none", L) > v("ft_linear", L),
         "numbers": f"{v('ft_none', L):.3f} vs {v('ft_linear', L):.3f} at {L} (per byte)"},
        {"claim": "CI check: (c) < (a) at 8C", "holds": v("ft_linear", L) < v("base", L),
         "numbers": f"{v('ft_linear', L):.3f} vs {v('base', L):.3f} at {L} (per byte)"},
    ]


def method_table(results: dict, metric: str = "ppl_per_byte") -> str:
    """Rows = methods, columns = evaluation lengths, as in the PI paper's Table 1."""
    from llmft.eval.report import ppl_table

    models = {label: results["ppl"][key] for key, label, _, _ in METHODS}
    return ppl_table(models, (metric,), by="model", context=results["context"], first_header="method",
                     digits=3 if metric == "ppl_per_byte" else 1)


def passkey_table(results: dict) -> str:
    lengths = results["lengths"]
    head = " | ".join(f"{n:,}" for n in lengths)
    lines = [f"| model | {head} | overall | distinct answers | most common answer |",
             "|---|" + "---:|" * (len(lengths) + 3)]
    names = {"ft_linear": "(c) PI x8 + N steps on books", "ft_passkey": "(c) + passkey-aware fine-tune"}
    for key, pk in results["passkey"].items():
        by_len = {}
        for c in pk["cells"]:
            if c["accuracy"] is not None:
                by_len.setdefault(c["length"], []).append((c["correct"], c["trials"]))
        cells = []
        for n in lengths:
            got = by_len.get(n)
            cells.append("n/a" if not got else f"{sum(a for a, _ in got) / sum(b for _, b in got):.0%}")
        overall = pk["accuracy"]
        lines.append(f"| {names[key]} | " + " | ".join(cells) + " | " + ("n/a" if overall is None else f"{overall:.0%}")
                     + f" | {pk['distinct_answers']} of {pk['trials']} | {pk['most_common_answer'] or 'no number'} "
                     f"({pk['most_common_share']:.0%} of trials) |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Perplexity per byte against context length, one line per method; fine-tuned methods solid."""
    from llmft.eval.report import plot_ppl

    lengths = results["lengths"]
    models = {label: {n: results["ppl"][key][str(n)] for n in lengths} for key, label, _, _ in METHODS}
    return plot_ppl(models, path, ylabel="perplexity per byte (held-out, lower is better)",
                    title=f"Context extension x{results['factor']:g} at tiny scale ({results['scale']}, "
                          f"seed {results['seed']})",
                    trained_len=results["context"], trained_label="pre-training length C",
                    dashed=frozenset(label for _, label, recipe, _ in METHODS if not recipe), legend_outside=True)


def position_table(results: dict) -> str:
    """Mean NLL per token of the positions a base model was trained on (below C) and of the new ones (C..8C-1),
    in windows of 8C tokens."""
    pos, C = results["nll_by_position"], results["context"]
    labels = {k: label for k, label, _, _ in METHODS}
    inside = (C - 1) // pos["bucket"]  # buckets entirely below position C (position 0 is never predicted)
    lines = [f"| method | positions 1..{C - 1} | positions {C}..{pos['length'] - 1} | change |", "|---|---:|---:|---:|"]
    for key, row in pos["rows"].items():
        w_in = [min(pos["bucket"], C - 1 - i * pos["bucket"]) for i in range(inside + 1)]
        lo = sum(v * w for v, w in zip(row, w_in)) / sum(w_in)
        hi_vals = row[inside + 1 :]
        hi = sum(hi_vals) / len(hi_vals)
        lines.append(f"| {labels[key]} | {lo:.3f} | {hi:.3f} | {hi - lo:+.3f} |")
    return "\n".join(lines)


def plot_positions(results: dict, path: Path) -> Path:
    """NLL by position in windows of 8C tokens, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = results["nll_by_position"]
    labels = {k: label for k, label, _, _ in METHODS}
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for key, row in pos["rows"].items():
        xs = [min(1 + i * pos["bucket"] + pos["bucket"] / 2, pos["length"] - 1) for i in range(len(row))]
        ax.plot(xs, row, marker=".", label=labels[key])
    ax.axvline(results["context"], color="grey", linestyle=":", label=f"pre-training length C = {results['context']}")
    ax.set_xlabel(f"position in a {pos['length']}-token window (mean over {pos['bucket']} positions)")
    ax.set_ylabel("NLL per token (nats, held-out)")
    ax.set_title("Where the loss goes: by position")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(results: dict, ppl_png: str, passkey_png: str, position_png: str) -> str:
    r, s = results, results["settings"]
    C, L = r["context"], r["target"]
    mins = {k: f"{v / 60:.1f}" for k, v in r["timings_s"].items()}
    checks_md = "\n".join(f"- {'**holds**' if c['holds'] else '**does not hold**'}: {c['claim']}: {c['numbers']}"
                          for c in r["checks"])
    return f"""# Position Interpolation at tiny scale

Produced by `{r['command']}` (seed {r['seed']}, {r['scale']} scale) in {mins['total']} min on {r['machine']}.
Every number below comes from that run (`results.json` next to the run's copy of this file).

**Setup.** A 4-layer LLaMA pre-trained from scratch at C = {C} tokens for {s['base_steps']} steps, then extended
x{r['factor']:g} to 8C = {L}. Each fine-tuned row is N = {s['ft_steps']} steps at {L} tokens from that base,
with the same data, learning rate and seed (`recipes/repro/`). Held-out text: {r['split']}
({', '.join(f'{k}: {v:,} tokens' for k, v in r['eval_tokens'].items())}). Metric: perplexity per byte,
exp(sum of token NLLs / UTF-8 bytes), with non-overlapping windows of the given length. Every token of a window is
scored, so a window of 8C also contains positions below C.

## Perplexity per byte (rows = methods, columns = evaluation context)

{method_table(r)}

![perplexity per byte by context length]({ppl_png})

Token perplexity (the PI paper's Table 1 reports this):

{method_table(r, 'token_ppl')}

## Loss by position in a {L}-token window

The NLL of the held-out tokens by their position in the window: positions below C are the ones the base was
trained on; from C on, the base extrapolates.

{position_table(r)}

![NLL by position]({position_png})

## The paper's shape

{checks_md}

## Passkey retrieval

Greedy decoding of the 5-digit key after "The pass key is", {s['passkey_trials']} keys per (length, depth) cell,
depths {', '.join(f'{d:.0%}' for d in PASSKEY_DEPTHS)}. The passkey-aware fine-tune is {s['passkey_steps']} steps
at {L} tokens on {s['passkey_examples']} synthetic passkey prompts of {C}..{L - 8} tokens, with keys disjoint
from the evaluation keys.

{passkey_table(r)}

![passkey accuracy of the passkey-aware model]({passkey_png})

## Reproduce

```bash
{r['command']}
```

The run takes {mins['total']} min: {mins['pretrain']} min pre-training, {mins['ft_linear']} min per
fine-tune, {mins['eval_ppl']} min perplexity, {mins['passkey']} min passkey. A run resumes where it was
interrupted, and `--fresh` starts over. `--fast` is the CI-sized version that `tests/integration/test_repro_pi.py` runs.

{MARKER}
"""


def write_outputs(results: dict, out: Path, doc: Path | None) -> None:
    """results.json, pi_tiny.md and the PNGs in ``out``; with ``doc``, the markdown and PNGs there too."""
    from llmft.eval.passkey import plot_passkey_heatmap

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    targets = [out / "pi_tiny.md"] + ([doc] if doc is not None else [])
    for md in targets:
        ppl_png, pk_png, pos_png = (md.with_name(f"{md.stem}_{k}.png") for k in ("ppl", "passkey", "positions"))
        md.parent.mkdir(parents=True, exist_ok=True)
        plot(results, ppl_png)
        plot_positions(results, pos_png)
        plot_passkey_heatmap(results["passkey"]["ft_passkey"], pk_png)
        kept = ""
        if md.is_file() and MARKER in md.read_text():
            kept = md.read_text().split(MARKER, 1)[1].lstrip("\n")
        md.write_text(markdown(results, ppl_png.name, pk_png.name, pos_png.name) + ("\n" + kept if kept else ""))
