"""``llmft repro mdqa``: Together's multi-document QA application at tiny scale, offline, on CPU.

Together fine-tuned LLaMA-2-7B-32K on multi-document QA (OpenChatKit's ``finetune_llama-2-7b-32k-mqa.sh``) and
evaluated it with the "Lost in the Middle" protocol: a question, k retrieved passages, exactly one holding the
answer at a varied position, accuracy by that position. This driver runs the same application end to end with a
PI-extended tiny model (1024 tokens) and the synthetic stand-in of llmft/data/synthetic.py (the same file layout as
the paper's release; each passage states the code of a made-up name, the question asks one name's code, so the
answer is nowhere but in its passage):

1. the start model: ``--model``, else the shipped :data:`START_MODEL` (the PI experiment's linear PI x8 fine-tune
   of its retrieval-trained base, ``llmft repro pi``; see its SOURCE.md). The quickstart's extended model
   (``--model runs/quickstart/extended/final``) also runs, but it was pre-trained on two books only and has no
   lookup for a fine-tune this short to build on (docs/eval.md);
2. the data: evaluation files for k in :attr:`Scale.eval_ks` with the gold passage at every position, and a
   training set with the gold passage at random positions (other names and codes);
3. accuracy by k and gold position of the start model;
4. fine-tuning through the normal training loop (``recipes/repro/mdqa.yaml``): passages and question are context,
   only the answer is trained, packing is isolated; in stages (:data:`FULL`): k = 2 and 4 first, then k up to 12 at
   a lower learning rate;
5. the same evaluation of the fine-tuned model; ``OUT/mdqa_tiny.md`` (before/after tables, the chance level of a
   model that picks one of the k codes at random, the gain, the command), ``OUT/results.json`` and a PNG;
   ``--doc PATH`` writes the markdown and PNG there too.

Runs resume: an interrupted fine-tune continues from its last checkpoint (``--fresh`` starts over). ``--fast`` is
the CI-sized version (``tests/integration/test_repro_mdqa.py``, which asserts the gain).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmft.atomic import save_figure, write_text
from llmft.config import load_recipe
from llmft.config.loading import shipped_path

RECIPE = "recipes/repro/mdqa.yaml"  # shipped with llmft: read from the installed package


@dataclass(frozen=True)
class Stage:
    """One fine-tuning stage: ``steps`` steps on ``examples`` training examples with k in ``ks``, at ``lr_factor``
    times the run's learning rate (the recipe's, or ``--lr``)."""

    steps: int
    examples: int
    ks: tuple[int, ...]  # numbers of passages in the training examples
    lr_factor: float = 1.0


@dataclass(frozen=True)
class Scale:
    """How big a run is."""

    stages: tuple[Stage, ...]  # fine-tuning, in order, each from the previous stage's model
    eval_ks: tuple[int, ...]  # numbers of passages evaluated (every gold position of each)
    eval_examples: int  # per (k, gold position)


# Short examples first: the lookup is learned on k = 2 and 4 at the recipe's lr, then extended to k up to 12 at 0.3x.
# Straight on k up to 12 (600 steps at 1e-3, 7.6 examples of about 5 answer tokens a step) the answer loss stayed
# at ~1.5 nats and accuracy at chance or below on one draw of the data (53% at k = 4 on another); the second stage at
# the full lr undid the first's lookup within 30 steps.
SHORT = Stage(steps=150, examples=1_500, ks=(2, 4))
FULL = Scale(stages=(SHORT, Stage(steps=450, examples=12_000, ks=(2, 4, 8, 12), lr_factor=0.3)), eval_ks=(4, 8, 12),
             eval_examples=30)
FAST = Scale(stages=(SHORT,), eval_ks=(4,), eval_examples=25)
START_MODEL = "llmft/assets/repro-pi-linear"  # shipped in bf16: the default start model (its SOURCE.md)
MAX_NEW_TOKENS = 8  # a 4-digit code and its full stop


def _log(msg: str) -> None:
    print(f"[llmft] repro mdqa: {msg}", flush=True)


_write = write_text  # published atomically


def _start_model(model: Path | None) -> Path:
    """``--model``, else the shipped :data:`START_MODEL`.

    Raises:
        RecipeError: no model directory (``config.json``) there.
    """
    from llmft.config import RecipeError
    from llmft.config.loading import resolve_shipped

    path = Path(model).resolve() if model is not None else Path(resolve_shipped(START_MODEL)).resolve()
    if not (path / "config.json").is_file():
        raise RecipeError([f"--model {path}: no model there (config.json); give a model directory, e.g. "
                           "runs/quickstart/extended/final, or leave --model out for the shipped one"])
    return path


def write_data(out: Path, scale: Scale, seed: int) -> tuple[Path, list[Path]]:
    """(evaluation directory, a training file per stage): the evaluation in the paper's file naming, the gold passage
    at every position; the training records in the same layout, gold at random positions, other names and codes
    (each stage's its own draw; the first stage's is the same at every scale)."""
    from llmft.data.synthetic import mdqa_training_records, write_mdqa

    eval_dir = out / "data" / "eval"
    shutil.rmtree(eval_dir, ignore_errors=True)
    write_mdqa(eval_dir, ks=scale.eval_ks, examples=scale.eval_examples, seed=seed, positions="all")
    files = []
    for i, stage in enumerate(scale.stages, 1):
        records = mdqa_training_records(stage.examples, ks=stage.ks, seed=seed + i)
        files.append(out / "data" / f"train-{i}.jsonl")
        _write(files[-1], "".join(json.dumps(r) + "\n" for r in records))
    return eval_dir, files


def _evaluate(model_dir: Path, eval_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmft.eval.applications import run_mdqa

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # fp32 also for bf16 files
    return run_mdqa(model, AutoTokenizer.from_pretrained(model_dir), eval_dir, max_new_tokens=MAX_NEW_TOKENS)


def overall(r: dict) -> dict[int, float]:
    """{k: accuracy over every gold position} of one model's results."""
    return {int(k): sum(c["correct"] for c in row.values()) / max(1, sum(c["n"] for c in row.values()))
            for k, row in r["cells"].items()}


def behaviour(r: dict) -> dict:
    """How a model answers, beyond accuracy: the share of answers taken from some passage (right or wrong: the
    model answers from the context), the number of distinct answers and the share of the most common one (a model
    that learned only the answer's shape repeats one guess; of equally common answers, the first given)."""
    outs = r["outputs"]
    said = [o["output"].strip() for o in outs]
    common = Counter(said).most_common(1)[0][0] if said else None
    return {"n": len(outs), "from_a_passage": sum(o["in_context"] for o in outs) / max(1, len(outs)),
            "distinct_answers": len(set(said)), "most_common_answer": common,
            "most_common_share": said.count(common) / max(1, len(said))}


def run_mdqa_demo(out: Path, model: Path | None = None, fast: bool = False, seed: int = 0, fresh: bool = False,
                  doc: Path | None = None, command: str | None = None, lr: float | None = None) -> dict:
    """Run the whole demonstration; returns the results written to ``OUT/results.json``. ``lr`` overrides the
    recipe's learning rate (a start model that already retrieves keeps that at a gentler one).

    Raises:
        ModelLoadError: ``model`` cannot be loaded.
        RecipeError: ``model`` is no model directory, or its context cannot hold the longest evaluation prompt.
    """
    from llmft.config import RecipeError

    started = time.time()
    scale = FAST if fast else FULL
    start = _start_model(model)
    out = Path(out).resolve()
    doc = Path(doc).resolve() if doc is not None else None
    if fresh:
        for sub in ("data", "ft"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    eval_dir, train_files = write_data(out, scale, seed)

    t0 = time.time()
    _log(f"1/3 accuracy of the start model {start} (k = {', '.join(map(str, scale.eval_ks))} passages)")
    before = _evaluate(start, eval_dir)
    too_long = sum(c["too_long"] for row in before["cells"].values() for c in row.values())
    if too_long:
        raise RecipeError([f"--model {start}: {too_long} evaluation prompts do not fit its context; leave --model "
                           "out (the shipped 1024-token model) or give one with a longer context"])
    _log("    " + ", ".join(f"{k} passages: {a:.0%}" for k, a in overall(before).items()))
    timings["eval_before"] = time.time() - t0

    t0 = time.time()
    tuned, losses, lrs = fine_tune(start, out / "ft", train_files, scale.stages, seed, lr)
    timings["fine_tune"] = time.time() - t0

    t0 = time.time()
    _log("3/3 accuracy of the fine-tuned model")
    after = _evaluate(tuned, eval_dir)
    _log("    " + ", ".join(f"{k} passages: {a:.0%}" for k, a in overall(after).items()))
    timings["eval_after"] = time.time() - t0
    timings["total"] = time.time() - started

    results = {
        "scale": "fast" if fast else "full", "seed": seed, "start_model": str(start), "settings": asdict(scale),
        "start_rope": _rope(start), "lr": lrs[0], "stage_lrs": lrs,
        "timings_s": timings, "train_losses": losses,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": command or _command(fast, seed, model, doc, lr),
        "before": before, "after": after,
        "overall": {"before": overall(before), "after": overall(after),
                    "chance": {k: 1 / k for k in scale.eval_ks}},
        "behaviour": {"before": behaviour(before), "after": behaviour(after)},
    }
    write_outputs(results, out, doc)
    _log(f"done in {timings['total'] / 60:.1f} min: {out / 'mdqa_tiny.md'}" + (f", {doc}" if doc else ""))
    return results


def fine_tune(start: Path, out: Path, train_files: list[Path], stages: tuple[Stage, ...], seed: int,
              lr: float | None) -> tuple[Path, list[float], list[float]]:
    """Fine-tune ``start`` through ``stages`` with the shipped recipe, stage i on ``train_files[i]``; returns the last
    stage's final model, the loss of every step this process ran (all stages, in order) and each stage's lr. One
    stage trains in ``out``; several in ``out/stage-<i>``, each from the previous stage's final model, the last one's
    also ``out/final`` (hard links). A finished stage is not trained again: an interrupted run resumes in the stage
    it stopped in.

    Raises:
        RecipeError: the recipe does not take the start model or the overrides.
    """
    from llmft.repro import linked_copy
    from llmft.train.loop import train_for

    losses, lrs, model = [], [], start
    for i, (stage, data) in enumerate(zip(stages, train_files), 1):
        run_dir = out if len(stages) == 1 else out / f"stage-{i}"
        rec = load_recipe(shipped_path(RECIPE), [f"model.name={model}", f"checkpoint.dir={run_dir}",
                                                 f"data.sources.0.path={data}", f"train.seed={seed}"]
                          + ([f"train.lr={lr}"] if lr is not None else []))
        rec.train.lr *= stage.lr_factor
        lrs.append(rec.train.lr)
        _log(f"2/3 fine-tuning, stage {i}/{len(stages)}: {stage.examples:,} examples with k in "
             f"{{{', '.join(map(str, stage.ks))}}}, {stage.steps} steps at lr {rec.train.lr:g} (answers only, "
             "isolated)")
        model, done = train_for(rec, stage.steps)  # --fresh removed out/ above; a finished stage is kept
        losses += done
    return (model if len(stages) == 1 else linked_copy(model, out / "final")), losses, lrs


def _rope(model_dir: Path) -> str:
    """A model's positions and RoPE scaling, in words: "1024 positions, RoPE linear x8"."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", "default")
    scaled = f"RoPE {kind} x{rope['factor']:g}" if kind != "default" and "factor" in rope else "RoPE as pre-trained"
    return f"{cfg['max_position_embeddings']} positions, {scaled}"


def _command(fast: bool, seed: int, model: Path | None, doc: Path | None, lr: float | None = None) -> str:
    parts = ["llmft repro mdqa", "--fresh"] + (["--fast"] if fast else []) + [f"--seed {seed}"]
    if model is not None:
        parts.append(f"--model {model}")
    if lr is not None:
        parts.append(f"--lr {lr:g}")
    if doc is not None:
        parts.append(f"--doc {doc.relative_to(Path.cwd()) if doc.is_relative_to(Path.cwd()) else doc}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- report


def comparison_table(results: dict) -> str:
    """Markdown: a row per k, accuracy before, after, and the chance level of picking one of the k codes."""
    o = results["overall"]
    lines = ["| passages k | before fine-tuning | after fine-tuning | chance (one of the k codes at random) |",
             "|---:|---:|---:|---:|"]
    for k in sorted(o["after"], key=int):
        lines.append(f"| {k} | {100 * o['before'][k]:.1f}% | {100 * o['after'][k]:.1f}% | "
                     f"{100 * o['chance'][k]:.1f}% |")
    return "\n".join(lines)


def verdict(results: dict) -> str:
    """What the numbers say, in one paragraph (written from them, never by hand)."""
    o, b = results["overall"], results["behaviour"]["after"]
    above = [k for k in o["after"] if o["after"][k] > o["chance"][k]]
    gained = [k for k in o["after"] if o["after"][k] > o["before"][k]]
    if above:
        return (f"**Retrieval gained**: after fine-tuning the model beats chance at k = "
                f"{', '.join(map(str, sorted(above, key=int)))}.")
    shape = (f"it repeats one answer ({b['most_common_answer']!r}, {100 * b['most_common_share']:.0f}% of answers)"
             if b["most_common_share"] >= 0.5 else f"{b['distinct_answers']} distinct answers")
    over_start = f"; above the start model at k = {', '.join(map(str, sorted(gained, key=int)))}" if gained else ""
    why = ("The fine-tune learned the format, not the lookup: this model, pre-trained only on two books, has no "
           "mechanism for finding a name in its context and copying what follows, and an answer-only fine-tune of "
           "this length does not build one (the same failure as passkey retrieval in pi_tiny.md). A start model "
           "pre-trained with retrieval tasks in its mix is what this demonstration needs.")
    return (f"**No retrieval gained** (accuracy above chance at no k{over_start}): after fine-tuning the model "
            f"answers in the answer's shape, but {shape}, and {100 * b['from_a_passage']:.1f}% of its answers come "
            f"from a passage. {why}")


def load_results(path: Path) -> dict:
    """``results.json`` as :func:`run_mdqa_demo` returned it (JSON turned the int keys into strings)."""
    r = json.loads(Path(path).read_text())
    for which in ("before", "after"):
        r[which]["cells"] = {int(k): {int(i): c for i, c in row.items()} for k, row in r[which]["cells"].items()}
    r["overall"] = {w: {int(k): v for k, v in d.items()} for w, d in r["overall"].items()}
    return r


def behaviour_table(results: dict) -> str:
    lines = ["| model | answers taken from a passage | distinct answers | most common answer (share) |",
             "|---|---:|---:|---|"]
    for which in ("before", "after"):
        b = results["behaviour"][which]
        common = (f"{b['most_common_answer']!r} ({100 * b['most_common_share']:.0f}%)"
                  if b["distinct_answers"] < b["n"] else "none repeated")  # all distinct: no answer leads
        lines.append(f"| {which} fine-tuning | {100 * b['from_a_passage']:.1f}% | {b['distinct_answers']} of "
                     f"{b['n']} | {common} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Accuracy by gold position, a line per k, dashed before and solid after fine-tuning, dotted chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, k in enumerate(sorted(results["after"]["cells"], key=int)):
        c = colors[n % len(colors)]
        for which, style in (("before", "--"), ("after", "-")):
            row = results[which]["cells"][k]
            pos = sorted(row, key=int)
            ax.plot([int(p) + 1 for p in pos], [100 * row[p]["accuracy"] for p in pos], style, marker="o",
                    color=c, label=f"{k} passages, {which}")
        ax.axhline(100 / int(k), color=c, linestyle=":", linewidth=1)
    ax.set_xlabel("position of the passage with the answer (1 = first)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Multi-document QA, tiny PI model: before and after fine-tuning\n(dotted: chance, 1/k)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _start_words(r: dict) -> str:
    start = Path(r["start_model"])
    if start.parts[-3:] == tuple(Path(START_MODEL).parts[-3:]):
        return (f"the shipped `{START_MODEL}` ({r.get('start_rope', 'its own config')}): the PI experiment's base, "
                "pre-trained at 128 tokens on two books and retrieval documents, extended x8 with linear Position "
                "Interpolation and fine-tuned up to 1024 tokens (`llmft repro pi`, its SOURCE.md)")
    if start.parts[-3:] == ("quickstart", "extended", "final"):
        return ("the quickstart's tiny LLaMA, pre-trained at 128 tokens and extended x8 to 1024 with linear Position "
                "Interpolation (`final` of the quickstart)")
    shown = start.relative_to(Path.cwd()) if start.is_relative_to(Path.cwd()) else start
    return f"`{shown}` ({r.get('start_rope', 'its own config')})"


def stages_words(results: dict) -> str:
    """The fine-tuning stages in words: "150 steps at lr 0.001 on 1,500 examples with k in {2, 4}, then ..."."""
    stages, lrs = results["settings"]["stages"], results["stage_lrs"]
    words = [f"{st['steps']} steps at lr {lr:g} on {st['examples']:,} examples with k in "
             f"{{{', '.join(map(str, st['ks']))}}}" for st, lr in zip(stages, lrs)]
    return ", then ".join(words) + (", each stage from the previous one's model" if len(words) > 1 else "")


def markdown(results: dict, png: str) -> str:
    from llmft.eval.applications import mdqa_table

    r, s = results, results["settings"]
    mins = {k: f"{v / 60:.1f}" for k, v in r["timings_s"].items()}
    return f"""# Multi-document QA at tiny scale

Produced by `{r['command']}` (seed {r['seed']}, {r['scale']} scale) in {mins['total']} min on {r['machine']}.
Every number below comes from that run (`results.json` next to the run's copy of this file).

**Setup.** The start model is {_start_words(r)}. The task is the synthetic
stand-in of the "Lost in the Middle" protocol (`llmft/data/synthetic.py`, the paper's file layout and
prompt): k passages, each stating the code of a made-up name, exactly one about the name the question asks. The
answer is right when the gold code appears in the first line the model writes (greedy, at most {MAX_NEW_TOKENS}
tokens). {s['eval_examples']} questions per (k, gold position), every position. Fine-tuning with
`recipes/repro/mdqa.yaml`: {stages_words(r)}; the gold passage at a random position (other names and codes than the
evaluation), the loss on the answer only, isolated packing.

## Accuracy over all gold positions

{comparison_table(r)}

A model that learned only the answer's format, picking one of the k codes in the prompt at random, scores the
chance column: accuracy above it is retrieval.

{verdict(r)}

How the models answer (all questions):

{behaviour_table(r)}

![accuracy by gold position before and after]({png})

## By gold position

Before fine-tuning:

{mdqa_table(r['before'])}

After fine-tuning:

{mdqa_table(r['after'])}

## Reproduce

```bash
{r['command']}
```

The run takes {mins['total']} min: {mins['eval_before']} + {mins['eval_after']} min evaluation, {mins['fine_tune']} min
fine-tuning. An interrupted run resumes the fine-tune from its last checkpoint; `--fresh` starts over. `--fast` is
the CI-sized version that `tests/integration/test_repro_mdqa.py` runs. On real data, the same evaluation is
`llmft eval --task mdqa --mdqa-data DIR` (docs/eval.md).
"""


def write_outputs(results: dict, out: Path, doc: Path | None) -> None:
    """results.json, mdqa_tiny.md and its PNG in ``out``; with ``doc``, the markdown and PNG there too."""
    _write(out / "results.json", json.dumps(results, indent=1) + "\n")
    for md in [out / "mdqa_tiny.md"] + ([doc] if doc is not None else []):
        png = md.with_name(f"{md.stem}.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(results, png)
        _write(md, markdown(results, png.name))
