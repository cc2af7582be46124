"""Evaluation of the two long-context applications (``llmft eval --task mdqa | summarization``).

Multi-document QA follows "Lost in the Middle" (Liu et al. 2023): an NQ-Open question with k retrieved passages,
exactly one holding the answer, at every gold position; the prompt is the paper's (llmft.data.sources.applications);
the model answers greedily, its answer is the text before the first newline (a base model goes on to write more
documents), and it is right when a gold answer, normalized as in SQuAD, appears in it. Files:
``nq-open-{k}_total_documents_gold_at_{i}.jsonl[.gz]`` (the paper's release, or the synthetic stand-ins of
llmft/data/synthetic.py). The report: accuracy by k and gold position as a table, JSON and a PNG of the
U-shaped curves.

Summarization: BookSum-style rows ``{"chapter", "summary_text"}`` (or ``text``/``summary``); the model writes a
summary after the same prompt as in training; ROUGE-1/2/L F1 (``rouge-score``, stemmed) against the reference.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from llmft.data.sources import read_json_lines
from llmft.data.sources.applications import answer_in, mdqa_prompt, normalize_answer, summary_prompt
from llmft.generate import GenerationError, Sampling, context_length, generate

log = logging.getLogger(__name__)

MDQA_FILE = re.compile(r"nq-open-(\d+)_total_documents_gold_at_(\d+)\.jsonl(\.gz)?$")


def mdqa_files(root: Path) -> dict[tuple[int, int], Path]:
    """{(documents k, gold position i): file} of a directory in the paper's naming.

    Raises:
        FileNotFoundError: no such file there.
    """
    found = {}
    for p in sorted(Path(root).glob("nq-open-*")):
        m = MDQA_FILE.search(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        raise FileNotFoundError(f"--mdqa-data: no nq-open-<k>_total_documents_gold_at_<i>.jsonl(.gz) files in {root}")
    return found


def run_mdqa(model, tokenizer, root: Path, docs: list[int] | None = None, max_examples: int | None = None,
             max_new_tokens: int = 100) -> dict:
    """Accuracy by number of documents and gold position.

    Returns:
        ``{"cells": {k: {i: {"accuracy", "correct", "n", "too_long"}}}, "examples": [first answers], "outputs":
        [{"k", "gold", "output", "correct", "in_context"} for every question asked]}`` (``in_context``: the output
        holds some passage's text, right or wrong: the model answered from the passages); a prompt longer than the
        model's context is counted as too long and not asked.

    Raises:
        FileNotFoundError: no files (for the requested ``docs``).
    """
    files = {key: p for key, p in mdqa_files(root).items() if docs is None or key[0] in docs}
    if not files:
        raise FileNotFoundError(f"--mdqa-data: {root} has no files for {docs} documents")
    s = Sampling(max_new_tokens=max_new_tokens, stop=("\n",))
    ctx = context_length(model)
    cells: dict = {}
    examples, outputs = [], []
    for (k, i), path in sorted(files.items()):
        correct = n = too_long = 0
        for record in read_json_lines(path)[:max_examples]:
            prompt = mdqa_prompt(record["question"], record["ctxs"])
            if ctx is not None and len(tokenizer(prompt).input_ids) + 1 >= ctx:
                too_long += 1
                continue
            try:
                answer = generate(model, tokenizer, prompt, s).text
            except GenerationError:
                too_long += 1
                continue
            ok = answer_in(answer, record["answers"])
            correct += ok
            n += 1
            said = normalize_answer(answer)
            outputs.append({"k": k, "gold": i, "output": answer, "correct": ok,
                            "in_context": bool(said) and any(said in normalize_answer(c["text"])
                                                             for c in record["ctxs"])})
            if len(examples) < 5:
                examples.append({"k": k, "gold": i, "question": record["question"], "answers": record["answers"],
                                 "output": answer, "correct": ok})
        cells.setdefault(k, {})[i] = {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n,
                                      "too_long": too_long}
        log.info("mdqa: %d documents, gold at %d: %d/%d", k, i, correct, n)
    return {"cells": cells, "examples": examples, "outputs": outputs}


def mdqa_table(r: dict) -> str:
    """Markdown: a row per number of documents, a column per gold position (accuracy %)."""
    positions = sorted({i for row in r["cells"].values() for i in row})
    lines = ["| documents | " + " | ".join(f"gold at {i}" for i in positions) + " |",
             "|---:|" + "---:|" * len(positions)]
    for k, row in sorted(r["cells"].items()):
        cells = [f"{100 * row[i]['accuracy']:.1f}% ({row[i]['correct']}/{row[i]['n']})" if i in row else "-"
                 for i in positions]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_mdqa_report(results: dict[str, dict], out: Path) -> dict[str, Path]:
    """mdqa.json, mdqa.md (a table per model) and mdqa.png (accuracy by gold position, a line per model and k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "mdqa.json", "markdown": out / "mdqa.md", "plot": out / "mdqa.png"}
    paths["json"].write_text(json.dumps(results, indent=1))
    md = ["# Multi-document QA (Lost in the Middle protocol)", ""]
    for name, r in results.items():
        md += [f"## {name}", "", mdqa_table(r), ""]
    paths["markdown"].write_text("\n".join(md))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in results.items():
        for k, row in sorted(r["cells"].items()):
            pos = sorted(row)
            ax.plot([p + 1 for p in pos], [100 * row[p]["accuracy"] for p in pos], marker="o",
                    label=f"{name}, {k} docs" if len(results) > 1 else f"{k} documents")
    ax.set_xlabel("position of the document with the answer (1 = first)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Multi-document QA: accuracy by gold position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths


def run_summarization(model, tokenizer, path: Path, max_examples: int | None = None,
                      max_new_tokens: int = 256) -> dict:
    """Mean ROUGE-1/2/L F1 (x100) of the model's summaries against the references.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row without chapter/text or summary_text/summary.
    """
    from rouge_score import rouge_scorer

    if not Path(path).is_file():
        raise FileNotFoundError(f"--summ-data: {path} is not a file (BookSum-style jsonl: chapter, summary_text)")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    s = Sampling(max_new_tokens=max_new_tokens, stop=("\nQ:",))
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    n = too_long = 0
    examples = []
    for number, row in enumerate(read_json_lines(Path(path))[:max_examples], 1):
        chapter, summary = row.get("chapter", row.get("text")), row.get("summary_text", row.get("summary"))
        if not isinstance(chapter, str) or not isinstance(summary, str):
            raise ValueError(f"{path}:{number}: expected \"chapter\" (or \"text\") and \"summary_text\" (or "
                             "\"summary\") strings")
        try:
            out = generate(model, tokenizer, summary_prompt(chapter), s).text.strip()
        except GenerationError:
            too_long += 1
            continue
        scores = scorer.score(summary, out)
        for key in totals:
            totals[key] += scores[key].fmeasure
        n += 1
        if len(examples) < 3:
            examples.append({"reference": summary, "output": out})
    return {**{k: 100 * v / n if n else float("nan") for k, v in totals.items()}, "n": n, "too_long": too_long,
            "examples": examples}
