"""``llmft repro pi``: the Position Interpolation experiment at tiny scale, from scratch, offline, on CPU.

The PI paper (Chen et al., 2023, Table 1 and Figure 1) extends LLaMA-7B from 2K to 32K: with interpolation and ~1000
steps of fine-tuning, PG-19 perplexity keeps falling as the window grows, while the base model explodes past its
trained length and fine-tuning without interpolation extends slowly. This driver runs the same experiment with a
4-layer LLaMA pre-trained at C = 128 tokens and extended x8 to 8C = 1024, through the normal recipes
(``recipes/repro/``), data reader, training loop and evaluation:

1. split the books into a PG-19-shaped directory (``OUT/books/train``, ``OUT/books/test``): the bundled two books
   by default (the last 10% of each, cut at a paragraph, held out), or ``--books DIR`` (a PG-19 layout with
   ``train/`` and ``test/`` is used as it is; a flat directory of books is split like the bundled ones);
2. write the synthetic part of the mix (``OUT/mix``, llmft/data/synthetic.py): retrieval documents (passkeys,
   name-number lists; RULER's single needle from 2C on) and copy documents, short ones for the base and long-range
   ones for the fine-tunes; a model that never learned to look back within C has nothing to extend;
3. the base at C: the shipped one (``llmft/assets/repro-base``, :data:`SAVED_BASE`), or with ``--pretrain`` one
   pre-trained on books + mix (``recipes/repro/base.yaml``, 16 more minutes; the shipped base is that, bit for bit);
4. fine-tune each method up to 8C: linear PI (``ft_linear``), no interpolation (``ft_none``), YaRN (``ft_yarn``),
   dynamic NTK (``ft_dynamic``); the same stages (:data:`STAGES`: x2 at 2C, then x8 at 4C and 8C), steps, lr and
   data for all; side by side, the cores split between them (llmft/side_by_side.py), each writing its output to
   ``OUT/logs/<recipe>.log``;
5. for every row (the base as is, each scaling applied to the base without training, each fine-tuned model):
   perplexity per byte (and token perplexity) of the held-out text at C, 2C, 4C, 8C, passkey retrieval and RULER's
   needle at the same lengths; each fine-tuned row also at 8C on larger samples, by the answer's first token;
6. ``OUT/pi_tiny.md`` (llmft/repro_report.py: the tables shaped like the paper's, its claims and the retrieval
   goals checked, the commands, the seed), ``OUT/results.json`` and three PNGs; ``--doc PATH`` writes the same
   markdown and PNGs there too (text the user appended after the "not regenerated" marker of an existing doc is
   kept).

Runs resume: an interrupted repro continues from the last checkpoint of the step it was in (``--fresh`` starts
over). ``--fast`` is a few-minute version used as the CI integration test: it fine-tunes only the two methods its
checks need (linear PI and YaRN), in one stage of fewer steps straight at 8C, and evaluates a slice of the held-out
text. ``--save-base DIR`` also saves the base in bf16 (:func:`save_bf16`): a trained short-context model that
retrieves within C, to start other experiments from.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from llmft.config import RecipeError, RopeConfig, load_recipe
from llmft.config.loading import resolve_shipped, shipped_path
from llmft.config.sources import SourceSpec
from llmft.data.sources import read_source
from llmft.side_by_side import run_side_by_side, split_cores

RECIPES = "recipes/repro"  # shipped with llmft: read from the installed package
BUNDLED_BOOKS = ("llmft/assets/frankenstein.txt.gz", "llmft/assets/mobydick.txt.gz")
HELD_OUT = 0.1
MARKER = "<!-- written by `llmft repro pi` above this line; text below it is kept when the doc is regenerated -->"


@dataclass(frozen=True)
class Stage:
    """One stage of the fine-tunes' schedule: ``steps`` steps of ``length``-token rows with the method's RoPE scaling
    at ``factor`` over the base's C (the row without interpolation trains unscaled at the same lengths)."""

    factor: float
    length: int
    steps: int


@dataclass(frozen=True)
class Scale:
    """How big a repro is: steps per phase, the synthetic part of the mix, and how much is evaluated."""

    base_steps: int  # pre-training steps (when the run pre-trains: ``base`` is None)
    stages: tuple[Stage, ...]  # every fine-tune's schedule, the same for each method
    base_retrieval: int  # retrieval documents of 32..C tokens in the base's mix
    base_copies: int  # copy documents in the base's mix
    ft_retrieval: int  # retrieval documents of C..8C tokens in the fine-tunes' mix
    ft_copies: int  # long-range copy documents in the fine-tunes' mix
    eval_tokens_per_book: int | None  # None: the whole held-out text
    passkey_trials: int
    niah_samples: int  # RULER niah_single_1 prompts per length
    target_samples: int = 0  # keys and needles at 8C for each fine-tuned row, apart from the grid (0: none)
    base: str | None = None  # a saved base (``--save-base`` of a full run) used instead of pre-training one
    fine_tunes: tuple[str, ...] | None = None  # the fine-tuned rows run (keys of METHODS); None: all of them


SAVED_BASE = "llmft/assets/repro-base"  # made by `--pretrain --save-base`, shipped in bf16: what a run starts from
# Extension in stages, as long-context recipes extend (Code Llama, Llama 3, YaRN's s = 16 then 32): x2 at 2C, then x8
# at 4C and 8C, 1.84M tokens per method (0.41M straight at 8C left linear PI at 0% passkey; docs/results/pi_tiny.md,
# "Linear PI and the token budget"); fits 30 min in bf16, two fine-tunes side by side (llmft/side_by_side.py).
STAGES = (Stage(2, 256, 2400), Stage(8, 512, 1200), Stage(8, 1024, 600))
# 12,000 retrieval documents in the fine-tunes' mix, not 3,000: a fine-tune then sees ~4x as many answers whose first
# token is not the space (' 1', ' 2' with the book BPE); linear PI at 8C went from 87% of 100 keys and 82 of 100
# needles to 94% and 90 (9,000: 95% and 82; docs/results/pi_tiny.md, "Where the misses are").
FULL = Scale(base_steps=2500, stages=STAGES, base_retrieval=10_000, base_copies=8_000, ft_retrieval=12_000,
             ft_copies=3_000, eval_tokens_per_book=16_384, passkey_trials=4, niah_samples=20, target_samples=100,
             base=SAVED_BASE)
FAST = Scale(base_steps=0, stages=(Stage(8, 1024, 200),), base_retrieval=0, base_copies=0, ft_retrieval=1500,
             ft_copies=1500, eval_tokens_per_book=4096, passkey_trials=4, niah_samples=2, base=SAVED_BASE,
             fine_tunes=("ft_linear", "ft_yarn"))  # the two its checks need: the CI check (c) and the retrieval gap
GAP_WORDS = 600  # a long-range copy's book words between its first two copies, at most (~800 tokens: fits 8C)

# (key, label, fine-tune recipe or None, rope scaling applied to the base for the untrained rows)
METHODS = (
    ("base", "(a) base, RoPE as trained (extrapolation)", None, None),
    ("pi", "(b) PI x8, no fine-tuning", None, "linear"),
    ("ft_linear", "(c) PI x8 + N steps up to 8C", "ft_linear", None),
    ("ft_none", "(d) no interpolation + N steps up to 8C", "ft_none", None),
    ("yarn", "(e) YaRN x8, no fine-tuning", None, "yarn"),
    ("ft_yarn", "(e) YaRN x8 + N steps up to 8C", "ft_yarn", None),
    ("dynamic", "(e) dynamic NTK x8, no fine-tuning", None, "dynamic"),
    ("ft_dynamic", "(e) dynamic NTK x8 + N steps up to 8C", "ft_dynamic", None),
)
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PASSKEY_EVAL_SEED = 0
TARGET_SEED = 1  # the larger samples at 8C: other keys and needles than the grid's
NIAH_TASK, NIAH_NEW_TOKENS = "niah_single_1", 12  # RULER's single needle in noise; its answer, a 7-digit number, fits


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


# ---------------------------------------------------------------------------------------------------- mix


def eval_keys() -> frozenset[str]:
    """Every passkey the evaluation can draw (the grid's seed's first 100,000 draws and the larger sample's first
    1,000, far more than either takes): training passkeys avoid them, so no answer is learned by heart."""
    from llmft.eval.passkey import KEY_HIGH, KEY_LOW

    draws = [np.random.default_rng(s).integers(KEY_LOW, KEY_HIGH + 1, size=n).tolist()
             for s, n in ((PASSKEY_EVAL_SEED, 100_000), (TARGET_SEED, 1_000))]
    return frozenset(str(k) for keys in draws for k in keys)


def write_mix(out: Path, tokenizer, train_dir: Path, scale: Scale, C: int, target: int, seed: int) -> dict:
    """The synthetic documents of the base's and the fine-tunes' mixes, as ``{"text"}`` jsonl in ``out``.

    Base: retrieval documents of 32..C tokens (passkeys and name-number lists; RULER's needle prompt is longer than
    a small C) and copy documents. Fine-tunes: retrieval documents of C..8C tokens (passkeys, lists, needles) and
    long-range copies whose gap is book text from ``train_dir``. Returns the paths and what they hold.

    Raises:
        ValueError: C is too short for the smallest passkey or list prompt.
    """
    from llmft.data.synthetic import copy_records, retrieval_records, vocabulary_words, write_retrieval, write_texts

    out.mkdir(parents=True, exist_ok=True)
    avoid, words = eval_keys(), vocabulary_words(tokenizer)
    book = " ".join(d.text for d in read_source(SourceSpec(format="text", path=train_dir), on_error="stop")).split()
    base_kinds, ft_kinds = ("passkey", "kv"), ("passkey", "kv", "niah")
    files = {} if scale.base is not None else {  # a saved base was pre-trained on a full run's mix
        "base_retrieval": write_retrieval(out / "base_retrieval.jsonl", retrieval_records(
            tokenizer, scale.base_retrieval, 32, C, seed=seed, kinds=base_kinds, avoid=avoid), whole=True),
        "base_copies": write_texts(out / "base_copies.jsonl", copy_records(words, scale.base_copies, seed=seed)),
    }
    files |= {
        "ft_retrieval": write_retrieval(out / "ft_retrieval.jsonl", retrieval_records(
            tokenizer, scale.ft_retrieval, C, target, seed=seed + 1, kinds=ft_kinds, avoid=avoid), whole=True),
        "ft_copies": write_texts(out / "ft_copies.jsonl", copy_records(
            words, scale.ft_copies, seed=seed + 1, repeats=3, gap=book, gap_words=(0, GAP_WORDS))),
    }
    return {"files": files, "base_retrieval": scale.base_retrieval, "base_retrieval_tokens": f"32..{C}",
            "base_copies": scale.base_copies, "ft_retrieval": scale.ft_retrieval,
            "ft_retrieval_tokens": f"{C}..{target}", "ft_copies": scale.ft_copies, "gap_words": GAP_WORDS,
            "base_kinds": list(base_kinds), "ft_kinds": list(ft_kinds)}


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


def _recipe(name: str, out: Path, seed: int, train_dir: Path, mix: list[Path], model_name: str | None = None,
            overrides: tuple[str, ...] = ()):
    """The shipped recipe ``name`` reading the train books and the ``mix`` files, checkpointing in ``out / name``
    (``overrides``, ``KEY=VALUE`` as on the command line, come after)."""
    overrides = [f"checkpoint.dir={out / name}", f"train.seed={seed}", *overrides]
    if model_name is not None:
        overrides.append(f"model.name={model_name}")
    rec = load_recipe(shipped_path(f"{RECIPES}/{name}.yaml"), overrides)
    rec.data.sources = [SourceSpec(format="text", path=train_dir), *(SourceSpec(format="jsonl", path=f) for f in mix)]
    rec.data.validation_fraction = 0.0
    return rec


def fine_tune(recipe: str, out: Path, seed: int, train_dir: Path, mix: list[Path], base: Path,
              stages: tuple[Stage, ...], C: int, fresh: bool, overrides: tuple[str, ...] = ()) -> Path:
    """Fine-tune ``base`` with the shipped ``recipe`` through ``stages``; returns the last stage's final model.
    ``overrides`` (``KEY=VALUE``) apply to every stage's recipe.

    One stage trains in ``OUT/<recipe>``; several in ``OUT/<recipe>/stage-<i>``, each starting from the previous
    stage's weights with the RoPE scaling set anew to its own factor over C (RoPE has no weights, so only the config
    changes: :func:`unscaled`), and the last stage's model is also ``OUT/<recipe>/final`` (hard links). The recipe's
    learning rate schedule runs once per stage.

    Raises:
        RecipeError: a stage the recipe cannot take (e.g. a length beyond its positions).
    """
    from llmft.train.loop import train_for

    start, scaled = base, scales_rope(recipe)
    for i, stage in enumerate(stages, 1):
        run_dir = out / recipe if len(stages) == 1 else out / recipe / f"stage-{i}"
        rec = _recipe(recipe, out, seed, train_dir, mix, str(start),
                      (f"checkpoint.dir={run_dir}", f"model.max_seq_len={stage.length}",
                       *([f"model.rope.factor={stage.factor}"] if scaled else []), *overrides))
        _log(f"{recipe} stage {i}/{len(stages)}: {stage.steps:,} steps at {stage.length} tokens"
             + (f" (x{stage.factor:g})" if scaled else ""))
        final, _ = train_for(rec, stage.steps, fresh)
        if i < len(stages):
            start = unscaled(final, out / recipe / f"stage-{i + 1}-start", C)
    return final if len(stages) == 1 else linked_copy(final, out / recipe / "final")


def scales_rope(recipe: str) -> bool:
    """Whether the shipped fine-tune ``recipe`` sets a RoPE scaling (every method but no interpolation).

    Raises:
        RecipeError: the shipped recipe does not validate.
    """
    return load_recipe(shipped_path(f"{RECIPES}/{recipe}.yaml"), ["model.name=base"]).model.rope is not None


def unscaled(model_dir: Path, dest: Path, C: int) -> Path:
    """``model_dir`` with its RoPE scaling removed (``max_position_embeddings`` C): the next stage's recipe then sets
    its factor over C instead of composing with this one. The weights are hard-linked (copied across devices).

    Raises:
        OSError: ``dest`` cannot be written.
    """
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"],
                              **{k: rope[k] for k in ("partial_rotary_factor",) if k in rope}}
    cfg["max_position_embeddings"] = C
    return linked_copy(model_dir, dest, json.dumps(cfg, indent=2) + "\n")


def linked_copy(model_dir: Path, dest: Path, config: str | None = None) -> Path:
    """``model_dir``'s files published at ``dest`` as hard links (copies across devices), with ``config`` as its
    ``config.json`` when given.

    Raises:
        OSError: ``dest`` cannot be written.
    """
    from llmft.atomic import publish_dir

    with publish_dir(dest) as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and not (config is not None and f.name == "config.json"):
                try:
                    (tmp / f.name).hardlink_to(f)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        if config is not None:
            (tmp / "config.json").write_text(config)
    return dest


def schedule(stages: tuple[Stage, ...], scaled: bool = True) -> str:
    """A fine-tune's schedule in words: "1,200 steps at 256 tokens (x2), then ...; 1.02M tokens" (``scaled``: the
    method scales RoPE; else the factors are left out)."""
    parts = [f"{s.steps:,} steps at {s.length} tokens" + (f" (x{s.factor:g})" if scaled else "") for s in stages]
    tokens = sum(s.steps * s.length for s in stages)
    return ", then ".join(parts) + f"; {tokens / 1e6:.2f}M tokens"


def _scaled_base(base: Path, kind: str, factor: float):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmft.model.rope import apply_rope_scaling

    config = AutoConfig.from_pretrained(base)
    apply_rope_scaling(config, RopeConfig(type=kind, factor=factor))
    return AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 also for a base saved in bf16


def saved_base(name: str) -> Path:
    """The directory of a saved base (``Scale.base``): as given, or its installed copy when llmft ships it.

    Raises:
        RecipeError: no model directory (``config.json``) there.
    """
    path = Path(resolve_shipped(name))
    if not (path / "config.json").is_file():
        raise RecipeError([f"the saved base {name}: no model there (config.json); make one with "
                           f"`llmft repro pi --fresh --save-base {name}` (a full run)"])
    return path


def _source(base: Path) -> str:
    """The first line of a saved base's SOURCE.md: how it was made."""
    src = base / "SOURCE.md"
    return src.read_text().splitlines()[0].rstrip(".") if src.is_file() else "no SOURCE.md"


def save_bf16(model_dir: Path, dest: Path, provenance: str) -> Path:
    """A trained model (and its tokenizer) saved in bf16 safetensors to ``dest``, atomically, with a ``SOURCE.md``
    saying where it came from (``--save-base``: a full run's base, half the size, to start other experiments from).

    Raises:
        OSError: ``dest`` cannot be written.
    """
    from transformers import AutoTokenizer

    from llmft.atomic import publish_dir

    with publish_dir(dest) as tmp:
        model = _load(model_dir).to(torch.bfloat16)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        (tmp / "SOURCE.md").write_text(f"Made by {provenance}, saved in bf16 by llmft.repro.save_bf16.\n")
    return dest


def run_pi(out: Path, fast: bool = False, seed: int = 0, books: Path | None = None, fresh: bool = False,
           doc: Path | None = None, command: str | None = None, save_base: Path | None = None,
           pretrain: bool = False) -> dict:
    """Run the whole experiment; returns the results written to ``OUT/results.json``. ``pretrain``: pre-train the
    base (:data:`FULL`'s ``base_steps``) instead of starting from the saved one; with ``save_base``, the base is
    also saved there in bf16 (:func:`save_bf16`).

    Raises:
        RecipeError: ``books`` holds no books; ``pretrain`` with ``fast``.
    """
    from transformers import AutoTokenizer

    from llmft.eval.passkey import run_passkey
    from llmft.eval.pg19 import load_books
    from llmft.eval.ppl import evaluate_ppl
    from llmft.eval.ruler import run_ruler
    from llmft.machine import gemm_peak
    from llmft.repro_report import checks, write_outputs
    from llmft.train.loop import train_for

    started = time.time()
    if pretrain and fast:
        raise RecipeError(["--pretrain with --fast: the fast run has no pre-training; drop one of them"])
    scale = replace(FULL, base=None) if pretrain else FAST if fast else FULL
    gflops = gemm_peak((1024, 2048), repeats=3) / 1e9  # how fast this machine is: minutes differ 2x between machines
    out = Path(out).resolve()
    doc = Path(doc).resolve() if doc is not None else None
    books = Path(books).resolve() if books is not None else None
    if fresh:
        for sub in ("base", "mix", "logs", *[m[2] for m in METHODS if m[2]]):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir, split = prepare_books(out, books)
    timings: dict[str, float] = {}

    # 1. the synthetic part of the mix
    t0 = time.time()
    base_rec = _recipe("base", out, seed, train_dir, [])
    ft_rec = load_recipe(shipped_path(f"{RECIPES}/ft_linear.yaml"), ["model.name=base"])  # all methods' shape
    ft_shape = ft_rec.model
    C, target, factor = base_rec.model.max_seq_len, ft_shape.max_seq_len, float(ft_shape.rope.factor)
    saved = saved_base(scale.base) if scale.base is not None else None
    # the mix in the base's tokens: the saved base's own tokenizer, or the one the pre-training will use
    tokenizer = AutoTokenizer.from_pretrained(saved or resolve_shipped(base_rec.model.tokenizer or base_rec.model.name))
    _log(f"1/5 writing the retrieval and copy documents of the mix ({out / 'mix'})")
    mix = write_mix(out / "mix", tokenizer, train_dir, scale, C, target, seed)
    timings["mix"] = time.time() - t0

    # 2. the base at C
    t0 = time.time()
    if saved is None:
        base_rec = _recipe("base", out, seed, train_dir,
                           [mix["files"]["base_retrieval"], mix["files"]["base_copies"]])
        _log(f"2/5 pre-training the base at C = {C} tokens ({scale.base_steps} steps)")
        base, _ = train_for(base_rec, scale.base_steps, fresh)
    else:
        base = saved
        _log(f"2/5 the base at C = {C} tokens: {base} ({_source(base)})")
    if save_base is not None:
        made = (f"copying {scale.base} (its SOURCE.md says how that was made)" if scale.base is not None else
                f"the pre-training of `{command or _command(fast, seed, books, doc, pretrain)}` "
                f"(recipes/repro/base.yaml, {scale.base_steps} steps, seed {seed})")
        save_bf16(base, Path(save_base), made)
    timings["pretrain"] = time.time() - t0

    # 3. the fine-tunes up to 8C, the same stages, steps and data for each
    rows = methods(scale)
    t0 = time.time()
    jobs = {}
    for key, label, recipe, _ in rows:
        if recipe is not None:
            _log(f"3/5 fine-tuning {label.split(' ', 1)[1]} ({schedule(scale.stages, scales_rope(recipe))})")
            jobs[recipe] = (fine_tune, (recipe, out, seed, train_dir,
                                        [mix["files"]["ft_retrieval"], mix["files"]["ft_copies"]], base, scale.stages,
                                        C, fresh))
    processes, threads_each = split_cores(len(jobs), torch.get_num_threads())
    done = run_side_by_side(jobs, {r: out / "logs" / f"{r}.log" for r in jobs}, say=_log)
    finals = {key: done[recipe][0] for key, _, recipe, _ in rows if recipe is not None}
    timings.update({recipe: seconds for recipe, (_, seconds) in done.items()}, fine_tunes=time.time() - t0)
    lengths = [C * 2**i for i in range(int(math.log2(target // C)) + 1)]  # C .. 8C

    # 4. perplexity by length, 5. passkey retrieval by length, for every row
    test_books = load_books(test_dir, tokenizer)
    if scale.eval_tokens_per_book is not None:
        for b in test_books:
            b.ids, b.nbytes = b.ids[: scale.eval_tokens_per_book], b.nbytes[: scale.eval_tokens_per_book]
    _log(f"4/5 perplexity of {sum(len(b.ids) for b in test_books):,} held-out tokens and 5/5 retrieval (passkey, "
         f"RULER {NIAH_TASK}) at {lengths}")
    ppl: dict[str, dict[int, dict]] = {}
    passkey: dict[str, dict] = {}
    niah: dict[str, dict] = {}
    by_position: dict[str, list[float]] = {}
    bucket = C // 2
    at_target: dict[str, dict] = {}  # 6. the fine-tuned rows at 8C on larger samples
    timings["eval_ppl"] = timings["passkey"] = timings["niah"] = timings["at_target"] = 0.0
    for key, label, recipe, kind in rows:
        model = _load(finals[key]) if recipe else (_scaled_base(base, kind, factor) if kind else _load(base))
        t0 = time.time()
        ppl[key] = evaluate_ppl(model, test_books, lengths, mode="windows")
        if key in POSITION_ROWS:
            by_position[key] = nll_by_position(model, test_books, target, bucket)
        timings["eval_ppl"] += time.time() - t0
        t0 = time.time()
        passkey[key] = run_passkey(model, tokenizer, lengths, list(PASSKEY_DEPTHS), scale.passkey_trials,
                                   seed=PASSKEY_EVAL_SEED, model_name=key, allow_beyond_max_positions=True,
                                   progress=False)
        timings["passkey"] += time.time() - t0
        t0 = time.time()
        niah[key] = _niah(run_ruler(model, tokenizer, [NIAH_TASK], lengths, scale.niah_samples, seed=PASSKEY_EVAL_SEED,
                                    allow_beyond=True, max_new_tokens=NIAH_NEW_TOKENS, model_name=key,
                                    progress=False))
        timings["niah"] += time.time() - t0
        if recipe and scale.target_samples:
            t0 = time.time()
            at_target[key] = larger_sample(model, tokenizer, target, scale.target_samples)
            timings["at_target"] += time.time() - t0
            _log(f"    {label} at {target}: passkey {at_target[key]['passkey']:.0%} of {at_target[key]['keys']} keys, "
                 f"{NIAH_TASK} {at_target[key]['niah']:.0f} on {at_target[key]['needles']}")
        _log(f"    {label}: ppl/byte " + ", ".join(f"{n}: {ppl[key][n]['ppl_per_byte']:.3f}" for n in lengths)
             + f"; passkey {passkey[key]['accuracy']:.0%}; {NIAH_TASK} "
             + ", ".join(f"{n}: {v:.0f}" for n, v in niah[key]["scores"].items() if v is not None))
    timings["total"] = time.time() - started

    results = {
        "scale": "fast" if fast else "full", "seed": seed, "context": C, "factor": factor, "target": target,
        "lengths": lengths, "split": split, "settings": asdict(scale), "timings_s": timings,
        "fine_tuning": {"precision": ft_rec.train.precision, "processes": processes, "threads_each": threads_each},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "machine_gflops": gflops, "base_source": _source(base) if scale.base else None,
        "command": command or _command(fast, seed, books, doc, pretrain),
        "eval_tokens": {b.name: len(b.ids) for b in test_books},
        "mix": {k: v for k, v in mix.items() if k != "files"},
        "ppl": {k: {str(n): r for n, r in v.items()} for k, v in ppl.items()},
        "nll_by_position": {"bucket": bucket, "length": target, "rows": by_position},
        "passkey": {k: {**{f: v[f] for f in ("model", "lengths", "depths", "trials", "seed", "accuracy", "cells")},
                        **_answers(v)} for k, v in passkey.items()},
        "niah": niah,
        "at_target": at_target,
        "checks": checks(ppl, passkey, niah, lengths, at_target),
    }
    write_outputs(results, out, doc)
    _log(f"done in {timings['total'] / 60:.1f} min: {out / 'pi_tiny.md'}" + (f", {doc}" if doc else ""))
    return results


def methods(scale: Scale) -> tuple[tuple, ...]:
    """The rows of ``METHODS`` a run of this scale evaluates: every untrained row, and the fine-tunes it runs."""
    return tuple(m for m in METHODS if m[2] is None or scale.fine_tunes is None or m[0] in scale.fine_tunes)


def larger_sample(model: torch.nn.Module, tokenizer, length: int, samples: int) -> dict:
    """Passkey retrieval (``samples`` keys over :data:`PASSKEY_DEPTHS`) and RULER's needle (``samples`` prompts) at
    ``length`` only, seeded apart from the grid (:data:`TARGET_SEED`), each also by the answer's first token."""
    from llmft.eval.passkey import run_passkey
    from llmft.eval.ruler import run_ruler

    pk = run_passkey(model, tokenizer, [length], list(PASSKEY_DEPTHS), max(1, samples // len(PASSKEY_DEPTHS)),
                     seed=TARGET_SEED, allow_beyond_max_positions=True, progress=False)
    nh = run_ruler(model, tokenizer, [NIAH_TASK], [length], samples, seed=TARGET_SEED, allow_beyond=True,
                   max_new_tokens=NIAH_NEW_TOKENS, progress=False)
    return {"length": length, "seed": TARGET_SEED, "keys": len(pk["records"]), "passkey": pk["accuracy"],
            "needles": len(nh["records"]), "niah": nh["scores"][NIAH_TASK][str(length)],
            "passkey_by_first_token": pk["by_first_token"],
            "niah_by_first_token": nh["by_first_token"].get(NIAH_TASK, {})}


def _niah(r: dict) -> dict:
    """What the report keeps of a RULER run of the one needle task: scores (0..100) by length, the lengths skipped
    and why, the samples per length, and the first predictions (to see what a failing model says)."""
    (task,) = r["tasks"]
    return {"task": task, "samples": r["samples"], "scores": r["scores"][task],
            "skipped": {str(x["length"]): x["reason"] for x in r["skipped"]},
            "preds": [{"length": x["length"], "pred": x["pred"], "outputs": x["outputs"]} for x in r["records"][:8]]}


def _answers(passkey: dict) -> dict:
    """How varied the model's answers are: a model that retrieves gives as many answers as there are keys; one
    that learned only the answer's format repeats one guess (of equally common answers, the first given)."""
    answers = [r["answer"] for r in passkey["records"]]
    common = Counter(answers).most_common(1)[0][0] if answers else None
    return {"trials": len(answers), "distinct_answers": len(set(answers)), "most_common_answer": common,
            "most_common_share": answers.count(common) / len(answers) if answers else None}


def _command(fast: bool, seed: int, books: Path | None, doc: Path | None, pretrain: bool = False) -> str:
    parts = (["llmft repro pi", "--fresh"] + (["--fast"] if fast else []) + (["--pretrain"] if pretrain else [])
             + [f"--seed {seed}"])
    if books is not None:
        parts.append(f"--books {books}")
    if doc is not None:
        parts.append(f"--doc {doc.relative_to(Path.cwd()) if doc.is_relative_to(Path.cwd()) else doc}")
    return " ".join(parts)
