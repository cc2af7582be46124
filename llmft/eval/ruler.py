"""RULER (Hsieh et al. 2024, NVIDIA/RULER): 13 synthetic long-context tasks generated offline with the model's
tokenizer (llmft/eval/ruler_tasks.py), scored by string match, and the model's *effective length*: the longest
length whose task average stays at or above a threshold (RULER uses Llama-2-7B's 4K average, 85.6).

Tasks, templates, answer prefixes, generation budgets and metrics are RULER's (``scripts/synthetic.yaml``,
``scripts/data/synthetic/constants.py``, ``scripts/eval/synthetic/constants.py``):

========================  ======================================================================  ========
task                      what is hidden (haystack; keys; values)                                 metric
========================  ======================================================================  ========
niah_single_1             1 needle (noise: the passkey filler; word key; 7-digit number)          all
niah_single_2             1 needle (essay; word key; number)                                      all
niah_single_3             1 needle (essay; word key; UUID)                                        all
niah_multikey_1           4 needles, 1 asked (essay; words; numbers)                              all
niah_multikey_2           1 needle among needle-shaped distractors (words; numbers)               all
niah_multikey_3           1 needle among needle-shaped distractors (UUID keys; UUID values)       all
niah_multivalue           1 key with 4 values (essay; word; numbers)                              all
niah_multiquery           4 needles, all 4 asked (essay; words; numbers)                          all
vt                        a 4-hop chain VAR X = VAR Y ... = 12345 in noise, with one example      all
cwe                       the 10 words repeated most in a numbered word list, with one example    all
fwe                       the 3 most frequent coded words of a Zipf (alpha 2) text                all
qa_1                      SQuAD v2 question, its paragraph among distractor paragraphs            part
qa_2                      HotpotQA question, its paragraphs among distractors                     part
========================  ======================================================================  ========

The model sees ``input + answer_prefix`` (RULER's base template) and generates the task's token budget greedily;
the prompt plus that budget fits the length (RULER's ``max_seq_length``). The prediction is stripped, control
characters become newlines; ``string_match_all`` scores the share of references found in it (case-insensitive),
``string_match_part`` 1 when any is; both x100, averaged over samples.

Where this differs from RULER, and why:

- The essay haystack is local books (default: the public-domain books shipped in llmft/assets) instead of Paul
  Graham's essays, which cannot be redistributed; sentences are split by a regular expression (after ``.``, ``!``
  or ``?`` and whitespace) instead of NLTK's punkt, whose model would have to be downloaded.
- Randomness: every (task, length, sample) has its own generator seeded from (seed, task, length, sample), so a
  cell's samples do not depend on which other cells run; RULER seeds one generator per task file.
- The haystack size is found once per (task, length) by bisection on the tokenized prompt (as RULER) and shrunk
  per sample when a draw comes out longer (as RULER).
- cwe beyond wonderwords' 8,736 words uses adjective-noun pairs (RULER: an ``english_words.json`` list).
- vt: RULER's one in-context example is sized for 500 tokens; for prompt budgets under 2,000 tokens it has the
  fewest noise lines (5), so that short contexts can run the task.
- Default 100 samples per (task, length) instead of 500 (``samples``): the standard error of a score near 85 is
  then about 3.6 points. Lengths beyond the model's ``max_position_embeddings`` are skipped with a warning
  (``strict``: an error; ``allow_beyond``: run them, to measure extrapolation).
- QA needs the public files (``squad.json`` = SQuAD v2.0 dev, ``hotpotqa.json`` = HotpotQA dev distractor, the
  names RULER's download script gives them, or the original file names) in ``qa_dir``; without them the QA tasks
  are skipped with a note and the rest run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from llmft.atomic import save_figure, write_text
from llmft.config.eval import RULER_THRESHOLD
from llmft.eval.first_token import accuracy_by_first_token
from llmft.eval.ruler_tasks import (
    ASSETS,
    QA_FILES,
    TASKS,
    TEMPLATES,
    Generator,
    Sample,
    TooShort,
    read_hotpotqa,
    read_squad,
)

__all__ = ["ASSETS", "DEFAULT_LENGTHS", "QA_FILES", "TASKS", "TEMPLATES", "THRESHOLD", "Generator", "Sample",
           "TooShort", "compare_ruler", "effective_length", "load_ruler", "postprocess", "read_hotpotqa", "read_squad",
           "ruler_table", "run_ruler", "score", "string_match_all", "string_match_part", "write_ruler_report"]

log = logging.getLogger(__name__)

THRESHOLD = RULER_THRESHOLD
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


# ------------------------------------------------------------------------------------------------ scoring


def postprocess(pred: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(pred: str, refs: list[str]) -> float:
    """Share of the references found in the prediction, case-insensitive, x100 (RULER, per sample)."""
    return 100.0 * sum(r.lower() in pred.lower() for r in refs) / len(refs)


def string_match_part(pred: str, refs: list[str]) -> float:
    """100 if any reference is found in the prediction, case-insensitive (RULER, per sample)."""
    return 100.0 * max(r.lower() in pred.lower() for r in refs)


def score(task: str, pred: str, refs: list[str]) -> float:
    metric = string_match_part if TASKS[task].metric == "part" else string_match_all
    return metric(postprocess(pred), refs)


def effective_length(average: dict[int, float | None], threshold: float = THRESHOLD) -> int | None:
    """The longest length L such that the task average is >= ``threshold`` at every measured length up to L;
    None when the shortest measured length fails. Lengths where nothing ran (None) are left out."""
    best = None
    for n in sorted(average):
        v = average[n]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if v < threshold:
            break
        best = n
    return best


# ------------------------------------------------------------------------------------------------ running


def run_ruler(model, tokenizer, tasks: list[str], lengths: list[int], samples: int = 100, seed: int = 0, *,
              haystack: str | Path | None = None, qa_dir: str | Path | None = None, threshold: float = THRESHOLD,
              strict: bool = False, allow_beyond: bool = False, max_new_tokens: int | None = None,
              model_name: str | None = None, progress: bool = True) -> dict:
    """Generate and score RULER tasks at each length; every (task, length) cell averages ``samples`` prompts.

    Args:
        tasks: task names (keys of :data:`TASKS`).
        lengths: total lengths in tokens (prompt + the task's generation budget).
        samples: prompts per cell.
        haystack: books for the essay haystack (default: llmft/assets).
        qa_dir: holds squad.json / hotpotqa.json; QA tasks without their file are skipped with a note.
        threshold: the bar for the effective length.
        strict: a length beyond the model's ``max_position_embeddings`` is an error instead of a skip.
        allow_beyond: run lengths beyond ``max_position_embeddings`` (extrapolation); wins over ``strict``.
        max_new_tokens: generation budget for every task (default RULER's per task: 128, 30, 120, 50, 32).

    Returns:
        JSON-ready: ``model``, ``max_position_embeddings``, ``tasks``, ``lengths``, ``samples``, ``seed``,
        ``threshold``, ``scores`` ({task: {length: score or None}}), ``average`` ({length: mean over the tasks
        that ran at that length, or None}), ``effective_length``, ``skipped`` ([{task, length, reason}]) and
        ``records`` (per sample: task, length, index, tokens, outputs, pred, score).

    Raises:
        KeyError: an unknown task.
        ValueError: ``strict`` and a length beyond the model's context; or ``samples`` < 1.
    """
    from tqdm import tqdm

    from llmft.generate import Sampling, generate

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise KeyError(f"unknown RULER task(s) {unknown}; expected some of {', '.join(TASKS)}")
    if samples < 1:
        raise ValueError(f"RULER samples: got {samples}; expected at least 1")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    lengths = sorted(int(n) for n in lengths)
    beyond = [n for n in lengths if max_pos is not None and n > max_pos]
    if beyond and not allow_beyond:
        msg = f"lengths {beyond} exceed the model's context ({max_pos} positions)"
        if strict:
            raise ValueError(f"{msg}. Fix: drop them, or leave out --strict to skip them")
        log.warning("RULER: %s: skipped", msg)
    gen = Generator(tokenizer, haystack, qa_dir)
    scores: dict[str, dict[str, float | None]] = {t: {} for t in tasks}
    skipped, records = [], []
    was_training = model.training
    model.eval()
    cells = [(t, n) for t in tasks for n in lengths]
    bar = tqdm(total=len(cells) * samples, desc="RULER", unit="sample", disable=not progress)
    try:
        for task, n in cells:
            scores[task][str(n)] = None
            if n in beyond and not allow_beyond:
                skipped.append({"task": task, "length": n, "reason": f"beyond the model's {max_pos} positions"})
                bar.update(samples)
                continue
            try:
                batch = gen.samples(task, n, samples, seed, max_new_tokens)
            except (TooShort, FileNotFoundError) as e:
                if not any(x["task"] == task and x["reason"] == str(e) for x in skipped):
                    log.warning("RULER: %s skipped: %s", task, e)
                skipped.append({"task": task, "length": n, "reason": str(e)})
                bar.update(samples)
                continue
            budget = max_new_tokens or TEMPLATES[TASKS[task].kind][2]
            s = Sampling(max_new_tokens=budget)
            got = []
            for smp in batch:
                ids = tokenizer(smp.prompt, return_tensors="pt").input_ids
                pred = generate(model, tokenizer, ids, s, limit_to_context=not allow_beyond).text
                got.append(score(task, pred, smp.outputs))
                records.append({"task": task, "length": n, "index": smp.index, "tokens": smp.tokens,
                                "outputs": smp.outputs, "pred": pred, "score": got[-1]})
                bar.update(1)
                bar.set_postfix(task=task, length=n)
            scores[task][str(n)] = float(np.mean(got))
            log.info("RULER %s @ %d: %.1f", task, n, scores[task][str(n)])
    finally:
        bar.close()
        model.train(was_training)
    average = {}
    for n in lengths:
        vals = [scores[t][str(n)] for t in tasks if scores[t][str(n)] is not None]
        average[str(n)] = float(np.mean(vals)) if vals else None
    name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    return {"model": str(name), "max_position_embeddings": max_pos, "tasks": list(tasks), "lengths": lengths,
            "samples": samples, "seed": seed, "threshold": threshold, "scores": scores, "average": average,
            "effective_length": effective_length({int(k): v for k, v in average.items()}, threshold),
            "skipped": skipped, "records": records, "by_first_token": _by_first_token(tokenizer, tasks, records)}


def _by_first_token(tokenizer, tasks: list[str], records: list[dict]) -> dict[str, dict]:
    """{task: the samples by the first token of their answer} for the tasks with one answer per sample (the single
    needles and multikey ones), over every length run (llmft/eval/first_token.py)."""
    out = {}
    for task in tasks:
        recs = [x for x in records if x["task"] == task]
        if recs and all(len(x["outputs"]) == 1 for x in recs):
            out[task] = accuracy_by_first_token(tokenizer, [(x["outputs"][0], x["score"] / 100) for x in recs])
    return out


# ------------------------------------------------------------------------------------------------ reports


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def ruler_table(r: dict) -> str:
    """Markdown: a row per task, a column per length, the average row, and the effective length under it."""
    lengths = [str(n) for n in r["lengths"]]
    lines = ["| task | " + " | ".join(f"{int(n):,}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    lines += [f"| {t} | " + " | ".join(_fmt(r["scores"][t][n]) for n in lengths) + " |" for t in r["tasks"]]
    lines.append("| **average** | " + " | ".join(_fmt(r["average"][n]) for n in lengths) + " |")
    eff = r["effective_length"]
    measured = [int(n) for n in lengths if r["average"][n] is not None]
    lines += ["", f"Effective length (average >= {r['threshold']:g} at every measured length up to it): "
              + (f"{eff:,} tokens" if eff else f"none (below {r['threshold']:g} at {measured[0]:,})" if measured
                 else "none (no length was measured)")]
    return "\n".join(lines)


def plot_ruler(r: dict, path: Path) -> Path:
    """Heatmap PNG: a row per task plus the average, a column per length; grey where a cell did not run."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = [*r["tasks"], "average"]
    grid = np.array([[np.nan if (v := (r["average"] if t == "average" else r["scores"][t])[str(n)]) is None else v
                      for n in r["lengths"]] for t in rows])
    fig = Figure(figsize=(max(6.0, 1.1 * len(r["lengths"]) + 3), 0.45 * len(rows) + 2), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colormaps["RdYlGn"].with_extremes(bad="lightgrey"),
                      vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(r["lengths"])), [f"{n:,}" for n in r["lengths"]])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("length (tokens)")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(v) and (v < 20 or v > 80) else "black")
    fig.colorbar(image, ax=ax, label="score")
    eff = r["effective_length"]
    ax.set_title(f"RULER: {r['model'][-60:]}\n{r['samples']} samples per cell; effective length "
                 + (f"{eff:,}" if eff else "none") + f" (threshold {r['threshold']:g})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_ruler_report(r: dict, out: Path) -> dict[str, Path]:
    """``ruler.json``, ``ruler.md`` and ``ruler.png`` in ``out``, each written whole before it replaces the old."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ruler.json", "markdown": out / "ruler.md", "plot": out / "ruler.png"}
    write_text(paths["json"], json.dumps(r, indent=1) + "\n")
    notes = [f"- {s['task']} @ {s['length']:,}: {s['reason']}" for s in r["skipped"]]
    md = [f"# RULER: {r['model']}", "",
          f"{r['samples']} samples per task and length, seed {r['seed']}, max_position_embeddings "
          f"{r['max_position_embeddings']}. Scores are RULER's string match (x100).", "", ruler_table(r)]
    split = {t: cells for t, cells in (r.get("by_first_token") or {}).items() if len(cells) > 1}
    if split:  # a tokenizer that starts answers with more than one token: where the misses are
        md += ["", "By the answer's first token, as written after a word (a model that misses only the answers that "
               "start with a rare token reads the answer but not which token begins it):", "",
               "| task | first token | score | samples |", "|---|---|---:|---:|",
               *(f"| {t} | `{tok!r}` | {100 * c['accuracy']:.1f} | {c['n']} |"
                 for t, cells in split.items() for tok, c in cells.items())]
    if notes:
        md += ["", "Not run:", *notes]
    write_text(paths["markdown"], "\n".join(md) + "\n")
    plot_ruler(r, paths["plot"])
    return paths


def load_ruler(path: Path) -> dict:
    """A ``ruler.json`` (or a directory holding one, such as RUN/eval).

    Raises:
        FileNotFoundError: no ruler.json there.
    """
    path = Path(path)
    for candidate in (path, path / "ruler.json", path / "eval" / "ruler.json"):
        if candidate.is_file() and candidate.name == "ruler.json":
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"{path}: no ruler.json (run `llmft eval --ruler --model ... --out {path}` first)")


def compare_ruler(paths: list[Path], out: Path) -> dict[str, object]:
    """Average by length and effective length of earlier RULER reports side by side (the first is the baseline):
    ``compare_ruler.md`` and ``compare_ruler.png`` (average against length, one line per report).

    Raises:
        FileNotFoundError: a path has no ruler.json.
        ValueError: the reports ran different tasks, seeds or sample counts, so their averages do not compare.
    """
    from llmft.eval.report import plot_ppl

    reports = [(Path(p), load_ruler(p)) for p in paths]
    keys = ("tasks", "seed", "samples", "threshold")
    first = {k: reports[0][1][k] for k in keys}
    for p, rep in reports[1:]:
        other = {k: rep[k] for k in keys}
        if other != first:
            raise ValueError(f"{p} ran {other}, {paths[0]} ran {first}: re-run one of them with the same tasks, "
                             "--samples, --seed and --ruler-threshold")
    lengths = sorted({int(n) for _, rep in reports for n in rep["average"]})
    names = [(p.parent.name if p.name in ("eval", "ruler.json") else p.name) for p, _ in reports]
    head = "| length | " + " | ".join(names) + " |"
    lines = [head, "|---:|" + "---:|" * len(names)]
    for n in lengths:
        lines.append(f"| {n:,} | " + " | ".join(_fmt(rep["average"].get(str(n))) for _, rep in reports) + " |")
    lines.append("| **effective length** | " + " | ".join(
        f"{rep['effective_length']:,}" if rep["effective_length"] else "none" for _, rep in reports) + " |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "compare_ruler.md"
    md.write_text(f"# RULER average by length: {' vs '.join(names)}\n\n{len(first['tasks'])} tasks "
                  f"({', '.join(first['tasks'])}), {first['samples']} samples each, seed {first['seed']}; effective "
                  f"length at {first['threshold']:g}.\n\n{table}\n")
    curves = {name: {n: {"ruler": v if v is not None else math.nan} for n, v in
                     ((int(k), v) for k, v in rep["average"].items())} for name, (_, rep) in zip(names, reports)}
    png = plot_ppl(curves, out / "compare_ruler.png", metric="ruler", title="RULER average by length",
                   ylabel="average score (string match x100)")
    return {"markdown": md, "plot": png, "table": table}
