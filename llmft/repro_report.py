"""The report of ``llmft repro pi`` (llmft/repro.py): the claims checked against the run's numbers, the tables (rows =
methods, as the PI paper's Table 1), the plots and ``pi_tiny.md``. Everything here reads the run's ``results``
dict; nothing trains or evaluates."""

from __future__ import annotations

import json
from pathlib import Path

from llmft.atomic import save_figure, write_text
from llmft.repro import MARKER, METHODS, PASSKEY_DEPTHS, Stage, schedule

RETRIEVES = 0.9  # the bar for PI + fine-tuning at 8C
FAILS = 0.2  # ... and for the base extrapolating beyond C
EXPLODES = 3.0  # the base's token perplexity at 8C over its value at C
GAP = 0.5  # the retrieval gap: the best fine-tune's passkey accuracy at 8C over the base's, at least


def passkey_by_length(pk: dict) -> dict[int, float | None]:
    """Accuracy per prompt length over the depths (None where no cell ran)."""
    by_len: dict[int, list[tuple[int, int]]] = {}
    for c in pk["cells"]:
        if c["accuracy"] is not None:
            by_len.setdefault(c["length"], []).append((c["correct"], c["trials"]))
    return {n: (sum(a for a, _ in got) / sum(b for _, b in got) if (got := by_len.get(n)) else None)
            for n in pk["lengths"]}


def niah_by_length(nh: dict) -> dict[int, float | None]:
    """RULER needle score per prompt length as a fraction (None where the prompt did not fit)."""
    return {int(n): None if v is None else v / 100 for n, v in nh["scores"].items()}


def effective_length(pk: dict, nh: dict) -> int | None:
    """RULER's effective length of one row: the longest length up to which retrieval (the mean of passkey and
    niah_single_1 where each ran) stays at or above RULER's bar (85.6, Llama-2-7B's average at 4K); None when it
    fails at C already."""
    from llmft.eval.ruler import THRESHOLD
    from llmft.eval.ruler import effective_length as longest

    a, b = passkey_by_length(pk), niah_by_length(nh)
    average = {}
    for n in pk["lengths"]:
        got = [v for v in (a.get(n), b.get(n)) if v is not None]
        average[n] = 100 * sum(got) / len(got) if got else None
    return longest(average, THRESHOLD)


def checks(ppl: dict[str, dict[int, dict]], passkey: dict[str, dict], niah: dict[str, dict],
           lengths: list[int], at_target: dict[str, dict] | None = None) -> list[dict]:
    """The paper's claims and the issue's goals, each with the numbers it rests on.

    ``ppl[key][length]`` as :func:`llmft.eval.ppl.evaluate_ppl` returns; ``passkey[key]`` as
    :func:`llmft.eval.passkey.run_passkey` returns; ``niah[key]`` RULER's needle scores as ``llmft.repro`` keeps
    them (``scores``: {length: 0..100 or None}); for the rows of ``METHODS`` the run evaluated, which include
    ``base`` and ``ft_linear``. ``at_target[key]``: :func:`llmft.repro.larger_sample` at 8C; where it has
    ``ft_linear``, the goals of PI + fine-tuning are judged on it (more keys and needles than the grid's cell).
    """
    C, L = lengths[0], lengths[-1]

    def v(key: str, n: int, metric: str = "ppl_per_byte") -> float:
        return ppl[key][n][metric]

    acc = {k: passkey_by_length(pk) for k, pk in passkey.items()}
    needle = {k: niah_by_length(nh) for k, nh in niah.items()}
    pi_needle = needle["ft_linear"][L]
    beyond = [acc["base"][n] for n in lengths[1:] if acc["base"][n] is not None]
    base_beyond = sum(beyond) / len(beyond) if beyond else float("nan")
    token_ratio = v("base", L, "token_ppl") / v("base", C, "token_ppl")
    labels = {k: label for k, label, _, _ in METHODS}
    best = max((k for k, _, recipe, _ in METHODS if recipe and k in acc), key=lambda k: acc[k][L])  # first of equals
    pi_key, pi_key_numbers = acc["ft_linear"][L], f"{acc['ft_linear'][L]:.0%} at {L}"
    pi_needle_numbers = "did not fit" if pi_needle is None else f"{pi_needle:.0%} at {L}"
    big = (at_target or {}).get("ft_linear")
    if big is not None:
        pi_key = big["passkey"]
        pi_key_numbers = (f"{big['passkey']:.0%} of {big['keys']} keys at {L} "
                          f"(the grid's cell: {acc['ft_linear'][L]:.0%})")
        if big["niah"] is not None:
            pi_needle_numbers = (f"{big['niah'] / 100:.0%} of {big['needles']} needles at {L} (the grid's cell: "
                                 + ("did not fit" if pi_needle is None else f"{pi_needle:.0%}") + ")")
            pi_needle = big["niah"] / 100
    return [
        {"claim": f"the base retrieves within C (passkey at {C} >= 80%): the premise of every retrieval claim",
         "holds": acc["base"][C] >= 0.8, "numbers": f"{acc['base'][C]:.0%} at {C}"},
        {"claim": f"(a) the base extrapolating retrieves <= {FAILS:.0%} beyond C",
         "holds": base_beyond <= FAILS,
         "numbers": ", ".join(f"{acc['base'][n]:.0%} at {n}" for n in lengths[1:]) + f" (mean {base_beyond:.0%})"},
        {"claim": f"(c) PI + fine-tuning retrieves >= {RETRIEVES:.0%} at 8C", "holds": pi_key >= RETRIEVES,
         "numbers": pi_key_numbers},
        {"claim": f"(c) PI + fine-tuning scores >= {RETRIEVES:.0%} on RULER niah_single_1 at 8C",
         "holds": pi_needle is not None and pi_needle >= RETRIEVES, "numbers": pi_needle_numbers},
        {"claim": f"(a) the base's token perplexity at 8C is >= {EXPLODES:g}x its value at C",
         "holds": token_ratio >= EXPLODES,
         "numbers": f"token ppl {v('base', L, 'token_ppl'):.1f} at {L} vs {v('base', C, 'token_ppl'):.1f} at {C} "
                    f"({token_ratio:.1f}x); per byte {v('base', L):.3f} vs {v('base', C):.3f}"},
        {"claim": "(c) PI + fine-tuning: ppl at 8C <= ppl at C", "holds": v("ft_linear", L) <= v("ft_linear", C),
         "numbers": f"{v('ft_linear', L):.3f} at {L} vs {v('ft_linear', C):.3f} at {C} (per byte)"},
        *([] if "ft_none" not in ppl else [  # a run without row (d) (``--fast``) cannot compare it
            {"claim": "(d) no interpolation is worse than (c) at 8C after the same steps (perplexity)",
             "holds": v("ft_none", L) > v("ft_linear", L),
             "numbers": f"{v('ft_none', L):.3f} vs {v('ft_linear', L):.3f} at {L} (per byte)"},
            {"claim": "(d) no interpolation retrieves less than (c) at 8C after the same steps",
             "holds": acc["ft_none"][L] < acc["ft_linear"][L],
             "numbers": f"{acc['ft_none'][L]:.0%} vs {acc['ft_linear'][L]:.0%} at {L}"}]),
        {"claim": "CI check: (c) < (a) at 8C", "holds": v("ft_linear", L) < v("base", L),
         "numbers": f"{v('ft_linear', L):.3f} vs {v('base', L):.3f} at {L} (per byte)"},
        {"claim": f"the retrieval gap: a fine-tune retrieves at 8C, {GAP:.0%} (points) more than the base "
                  f"extrapolating", "holds": acc[best][L] >= acc["base"][L] + GAP,
         "numbers": f"{labels[best]}: {acc[best][L]:.0%} vs {acc['base'][L]:.0%} at {L}"},
    ]


def method_table(results: dict, metric: str = "ppl_per_byte") -> str:
    """Rows = methods, columns = evaluation lengths, as in the PI paper's Table 1."""
    from llmft.eval.report import ppl_table

    models = {label: results["ppl"][key] for key, label, _, _ in rows(results)}
    return ppl_table(models, (metric,), by="model", context=results["context"], first_header="method",
                     digits=3 if metric == "ppl_per_byte" else 1)


def rows(results: dict) -> tuple[tuple, ...]:
    """The rows of ``METHODS`` the run evaluated, in their order (``--fast`` runs two of the four fine-tunes)."""
    return tuple(m for m in METHODS if m[0] in results["passkey"])


def not_run(results: dict) -> str:
    """A sentence naming the fine-tuned rows the run left out, or "" when it ran them all."""
    left = [label for key, label, recipe, _ in METHODS if recipe and key not in results["passkey"]]
    return "" if not left else (f" This {results['scale']} run leaves out {' and '.join(left)}: it fine-tunes the "
                                "rows its checks need; the full run fine-tunes all four.")


def passkey_table(results: dict) -> str:
    """Rows = methods, columns = prompt lengths: passkey accuracy, and how varied the answers are (a model that
    learned only the answer's format repeats one guess)."""
    lengths = results["lengths"]
    head = " | ".join(f"{n:,}" for n in lengths)
    lines = [f"| method | {head} | overall | distinct answers | most common answer |",
             "|---|" + "---:|" * (len(lengths) + 3)]
    for key, label, _, _ in rows(results):
        pk = results["passkey"][key]
        acc = passkey_by_length(pk)
        cells = " | ".join("n/a" if acc[n] is None else f"{acc[n]:.0%}" for n in lengths)
        overall = "n/a" if pk["accuracy"] is None else f"{pk['accuracy']:.0%}"
        common = (f"{pk['most_common_answer'] or 'no number'} ({pk['most_common_share']:.0%} of trials)"
                  if pk["distinct_answers"] < pk["trials"] else "none repeated")  # all distinct: no answer leads
        lines.append(f"| {label} | {cells} | {overall} | {pk['distinct_answers']} of {pk['trials']} | {common} |")
    return "\n".join(lines)


def needle_table(results: dict) -> str:
    """Rows = methods, columns = prompt lengths: RULER niah_single_1 (string match, 0..100), and each row's
    effective length."""
    lengths, niah = results["lengths"], results["niah"]
    skipped = sorted({int(n) for nh in niah.values() for n in nh["skipped"]})
    lines = [f"| method | {' | '.join(f'{n:,}' for n in lengths)} | effective length |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for key, label, _, _ in rows(results):
        nh = niah[key]
        cells = " | ".join("n/a" if nh["scores"][str(n)] is None else f"{nh['scores'][str(n)]:.0f}" for n in lengths)
        eff = effective_length(results["passkey"][key], nh)
        lines.append(f"| {label} | {cells} | {'below C' if eff is None else f'{eff:,}'} |")
    if skipped:
        lines.append("")
        lines.append(f"n/a: the task's smallest prompt does not fit {', '.join(f'{n:,}' for n in skipped)} tokens "
                     f"with this tokenizer.")
    return "\n".join(lines)


def _by_first(cells: dict[str, dict]) -> str:
    return ", ".join(f"`{tok!r}` {c['correct']:g}/{c['n']}" for tok, c in cells.items())


def target_section(results: dict) -> str:
    """The fine-tuned rows at 8C on the larger samples (``at_target``), with the misses by the answer's first token;
    empty for a run without them (``--fast``, runs before they existed)."""
    big = results.get("at_target") or {}
    if not big:
        return ""
    first = next(iter(big.values()))
    L = first["length"]
    lines = ["## At 8C on larger samples, by the answer's first token", "",
             f"The grid above scores {results['settings']['passkey_trials'] * len(PASSKEY_DEPTHS)} keys and "
             f"{results['settings']['niah_samples']} needles per length, so one miss is several points. Each "
             f"fine-tuned row is also scored at {L:,} on {first['keys']} other keys "
             f"({first['keys'] // len(PASSKEY_DEPTHS)} per depth) and {first['needles']} other needles "
             f"(seed {first['seed']}; training avoids these keys too). An answer is generated after a word, so its "
             "first token holds the space: the columns on the right give the correct answers out of all, by that "
             "first token.", "",
             "| method | passkey | needle | passkey by first token | needle by first token |",
             "|---|---:|---:|---|---|"]
    labels = {k: label for k, label, _, _ in METHODS}
    for key, r in big.items():
        needle = "n/a" if r["niah"] is None else f"{r['niah']:.0f}"
        lines.append(f"| {labels[key]} | {r['passkey']:.0%} | {needle} | {_by_first(r['passkey_by_first_token'])} | "
                     f"{_by_first(r['niah_by_first_token'])} |")
    common = {tok for r in big.values() for tok in list(r["passkey_by_first_token"])[:1]}
    if len(common) == 1:  # every row's most frequent first token is the same: say how the rows do on it and not
        (tok,) = common

        def split(cells: dict[str, dict]) -> tuple[float, float | None]:
            rest = [c for t, c in cells.items() if t != tok]
            on = cells[tok]["accuracy"] if tok in cells else float("nan")
            return on, (sum(c["correct"] for c in rest) / sum(c["n"] for c in rest)) if rest else None

        parts = [(labels[k].split(" + ")[0], split(r["passkey_by_first_token"]), split(r["niah_by_first_token"]))
                 for k, r in big.items()]
        lines += ["", f"On answers that start with `{tok!r}`, the most common first token, the rows retrieve "
                  + ", ".join(f"{p} {a[0]:.0%} / {b[0]:.0%}" for p, a, b in parts)
                  + " (passkey / needle); on answers that start with any other token, "
                  + ", ".join(f"{p} {'n/a' if a[1] is None else f'{a[1]:.0%}'} / "
                              f"{'n/a' if b[1] is None else f'{b[1]:.0%}'}" for p, a, b in parts) + "."]
    return "\n".join(lines) + "\n\n"


def plot(results: dict, path: Path) -> Path:
    """Perplexity per byte against context length, one line per method; fine-tuned methods solid."""
    from llmft.eval.report import plot_ppl

    lengths = results["lengths"]
    models = {label: {n: results["ppl"][key][str(n)] for n in lengths} for key, label, _, _ in rows(results)}
    return plot_ppl(models, path, ylabel="perplexity per byte (held-out, lower is better)",
                    title=f"Context extension x{results['factor']:g} at tiny scale ({results['scale']}, "
                          f"seed {results['seed']})",
                    trained_len=results["context"], trained_label="pre-training length C",
                    dashed=frozenset(label for _, label, recipe, _ in rows(results) if not recipe), legend_outside=True)


def _finish(fig, ax, context: int, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """The pre-training length as a dotted line, labels, grid and legend; the figure saved (atomically) and closed."""
    import matplotlib.pyplot as plt

    ax.axvline(context, color="grey", linestyle=":", label=f"pre-training length C = {context}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_retrieval(results: dict, path: Path) -> Path:
    """Passkey accuracy against prompt length, one line per method; fine-tuned methods solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = results["lengths"]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for key, label, recipe, _ in rows(results):
        acc = passkey_by_length(results["passkey"][key])
        ax.plot(lengths, [acc[n] if acc[n] is not None else float("nan") for n in lengths], marker="o", label=label,
                linestyle="-" if recipe else "--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.set_ylim(-0.03, 1.03)
    return _finish(fig, ax, results["context"], "prompt length (tokens)", "passkey accuracy",
                   "Retrieval by prompt length", path)


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
    return _finish(fig, ax, results["context"],
                   f"position in a {pos['length']}-token window (mean over {pos['bucket']} positions)",
                   "NLL per token (nats, held-out)", "Where the loss goes: by position", path)


def speed(results: dict) -> str:
    """The machine's fp32 matmul peak, when the run measured it: the same run takes twice as long on a machine half
    as fast."""
    g = results.get("machine_gflops")
    return "" if g is None else f" (fp32 matmul peak {g:.0f} GFLOP/s)"


def _base_line(r: dict) -> str:
    s = r["settings"]
    if s.get("base"):
        return (f"A 4-layer LLaMA pre-trained from scratch at C = {r['context']} tokens, not by this run: the saved "
                f"base `{s['base']}` ({r['base_source']})")
    return f"A 4-layer LLaMA pre-trained from scratch at C = {r['context']} tokens for {s['base_steps']} steps"


def stages_text(r: dict) -> str:
    """The fine-tunes' schedule (``settings["stages"]``) in words (:func:`llmft.repro.schedule`); the row without
    interpolation trains at the same lengths unscaled."""
    stages = tuple(Stage(**st) for st in r["settings"]["stages"])
    if len(stages) == 1:
        return f"{stages[0].steps:,} steps at {stages[0].length} tokens"
    return f"in {len(stages)} stages, {schedule(stages)} ((d) trains at the same lengths without scaling)"


def training_text(r: dict) -> str:
    """How the fine-tunes ran (``fine_tuning``: precision, processes side by side, threads each), when recorded."""
    ft = r.get("fine_tuning")
    if ft is None:
        return ""
    prec = "in fp32" if ft["precision"] == "fp32" else f"in {ft['precision']} autocast (fp32 master weights)"
    side = (f", {ft['processes']} at a time side by side with {ft['threads_each']} thread(s) each"
            if ft["processes"] > 1 else "")
    return f", {prec}{side}"


def fine_tunes_time(r: dict) -> str:
    """The fine-tunes' minutes: all of them (side by side, when they ran so) and linear PI's own."""
    t, ft = r["timings_s"], r.get("fine_tuning") or {}
    own = f"{t['ft_linear'] / 60:.1f} min per fine-tune (linear PI's)"
    if "fine_tunes" not in t or ft.get("processes", 1) == 1:
        return own
    return (f"{t['fine_tunes'] / 60:.1f} min for the fine-tunes ({ft['processes']} at a time; linear PI's took "
            f"{t['ft_linear'] / 60:.1f} min)")


def _base_mix(r: dict) -> str:
    mix, s = r["mix"], r["settings"]
    copies = ("copy documents (a segment of single-token words and numbers written four times: predicting\nthe later "
              "copies needs an induction head)")
    if not s.get("base"):
        return (f"its mix is the training books plus {mix['base_retrieval']:,} retrieval documents of\n"
                f"{mix['base_retrieval_tokens']} tokens (passkeys and name-number lists, the whole text trained) and\n"
                f"{mix['base_copies']:,} {copies}")
    n_ret, n_copy = (f"{s['base_retrieval']:,} ", f"{s['base_copies']:,} ") if s["base_retrieval"] else ("", "")
    return (f"the saved base was pre-trained on the training books plus {n_ret}retrieval documents of 32..C tokens\n"
            f"(passkeys and name-number lists, the whole text trained) and {n_copy}{copies}; `llmft repro pi "
            "--pretrain` makes it again")


def markdown(results: dict, ppl_png: str, passkey_png: str, position_png: str) -> str:
    r, s = results, results["settings"]
    L = r["target"]
    mins = {k: f"{v / 60:.1f}" for k, v in r["timings_s"].items()}
    checks_md = "\n".join(f"- {'**holds**' if c['holds'] else '**does not hold**'}: {c['claim']}: {c['numbers']}"
                          for c in r["checks"])
    mix = r["mix"]
    pretrain = "no pre-training (a saved base)" if s.get("base") else f"{mins['pretrain']} min pre-training"
    return f"""# Position Interpolation at tiny scale

Produced by `{r['command']}` (seed {r['seed']}, {r['scale']} scale) in {mins['total']} min on {r['machine']}{speed(r)}.
Every number below comes from that run (`results.json` next to the run's copy of this file).

**Setup.** {_base_line(r)}, then extended
x{r['factor']:g} to 8C = {L}. Each fine-tuned row gets the same N steps from that base: {stages_text(r)},
with the same data, learning rate and seed (`recipes/repro/`){training_text(r)}.{not_run(r)} Held-out text: {r['split']}
({', '.join(f'{k}: {v:,} tokens' for k, v in r['eval_tokens'].items())}).

**Data.** Perplexity alone does not show that a model uses its context, so the base is taught to look things up
within C: {_base_mix(r)}. Each fine-tune reads the books plus {mix['ft_retrieval']:,} retrieval
documents of {mix['ft_retrieval_tokens']} tokens (passkeys, name-number lists, RULER's single needle) and
{mix['ft_copies']:,} long-range copies (the segment, up to {mix['gap_words']} book words, the segment twice more).
Documents are packed whole and attend only to themselves (`packing: isolated`). The passkeys of the training data
avoid every key the evaluation draws.

**Metrics.** Perplexity per byte, exp(sum of token NLLs / UTF-8 bytes), with non-overlapping windows of the given
length (every token of a window is scored, so a window of 8C also contains positions below C). Passkey retrieval:
greedy decoding after "The pass key is", {s['passkey_trials']} keys per (length, depth) cell, depths
{', '.join(f'{d:.0%}' for d in PASSKEY_DEPTHS)}.

## The claims

{checks_md}

## Passkey retrieval (rows = methods, columns = prompt length)

{passkey_table(r)}

![passkey accuracy by prompt length]({passkey_png})

## RULER niah_single_1 and effective length (rows = methods, columns = prompt length)

RULER's single needle in noise (its template; a word's 7-digit "special magic number"), {s['niah_samples']} prompts
per length, scored by string match (0..100). Effective length as RULER's: the longest length up to which retrieval
(the mean of passkey and needle where each ran) stays at or above 85.6.

{needle_table(r)}

{target_section(r)}## Perplexity per byte (rows = methods, columns = evaluation context)

{method_table(r)}

![perplexity per byte by context length]({ppl_png})

Token perplexity (the PI paper's Table 1 reports this):

{method_table(r, 'token_ppl')}

## Loss by position in a {L}-token window

The NLL of the held-out tokens by their position in the window: positions below C are the ones the base was
trained on; from C on, the base extrapolates.

{position_table(r)}

![NLL by position]({position_png})

## Reproduce

```bash
{r['command']}
```

The run takes {mins['total']} min: {pretrain}, {fine_tunes_time(r)},
{mins['eval_ppl']} min perplexity, {mins['passkey']} min passkey, {mins['niah']} min needle{_target_time(r)}.
A run resumes where it was interrupted, and `--fresh` starts over. `--fast` is the CI-sized version that
`tests/integration/test_repro_pi.py` runs; `--pretrain` also pre-trains the base instead of starting from the
shipped one.

{MARKER}
"""


def _target_time(r: dict) -> str:
    seconds = r["timings_s"].get("at_target")
    return f", {seconds / 60:.1f} min the larger samples at 8C" if seconds else ""


def write_outputs(results: dict, out: Path, doc: Path | None) -> None:
    """results.json, pi_tiny.md and the PNGs in ``out``; with ``doc``, the markdown and PNGs there too."""
    write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    targets = [out / "pi_tiny.md"] + ([doc] if doc is not None else [])
    for md in targets:
        ppl_png, pk_png, pos_png = (md.with_name(f"{md.stem}_{k}.png") for k in ("ppl", "passkey", "positions"))
        md.parent.mkdir(parents=True, exist_ok=True)
        plot(results, ppl_png)
        plot_positions(results, pos_png)
        plot_retrieval(results, pk_png)
        kept = ""
        if md.is_file() and MARKER in md.read_text():
            kept = md.read_text().split(MARKER, 1)[1].lstrip("\n")
        write_text(md, markdown(results, ppl_png.name, pk_png.name, pos_png.name) + ("\n" + kept if kept else ""))
