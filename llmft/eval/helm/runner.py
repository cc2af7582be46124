"""Running scenarios: greedy generation cut at stop sequences, option log probabilities, every instance scored with its
scenario's main metric over the train trials; the report (helm.json, helm.md)."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmft.config.eval import HelmSuite, ScenarioSpec
from llmft.eval.helm import metrics as hm
from llmft.eval.helm.prompts import Prompt, _option_prefix, build_prompt, example_block, sample_examples
from llmft.eval.helm.scenarios import TRAIN, Instance, load_subsets
from llmft.eval.helm.suite import DEFAULT_SUITE, load_helm_suite, select_scenarios


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model, tokenizer, input_ids: list[int], max_tokens: int, stop_sequences: list[str]) -> tuple[str, float]:
    """Greedy completion of ``input_ids``, cut at the first stop sequence (HELM's ``truncate_sequence``).

    Returns:
        (completion text, sum of the log probabilities of the tokens kept).
    """
    if max_tokens == 0:
        return "", 0.0
    x = torch.tensor([input_ids], device=_device(model))  # (1, s)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"stop_strings": stop_sequences, "tokenizer": tokenizer} if stop_sequences else {}
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         num_beams=1, output_logits=True, return_dict_in_generate=True, pad_token_id=pad, **kwargs)
    tokens = out.sequences[0, x.shape[1]:].tolist()  # (n,)
    logits = torch.stack(out.logits, dim=1)[0].float()  # (n, v)
    logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.index(s) for s in stop_sequences if s in text]
    if not cuts:
        return text, float(sum(logprobs))
    text = text[: min(cuts)]
    kept = 0  # tokens are only dropped whole: keep the longest prefix free of any stop sequence
    while kept < len(tokens):
        decoded = tokenizer.decode(tokens[: kept + 1], skip_special_tokens=True)
        if any(s in decoded for s in stop_sequences):
            break
        kept += 1
    return text, float(sum(logprobs[:kept]))


@torch.no_grad()
def continuation_logprob(model, input_ids: list[int], num_tokens: int) -> float:
    """Sum of the log probabilities of the last ``num_tokens`` tokens of ``input_ids`` given what precedes them."""
    x = torch.tensor([input_ids], device=_device(model))  # (1, s)
    logits = model(input_ids=x).logits[0, :-1].float()  # (s-1, v)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]  # (s-1,)
    return float(logprobs[-num_tokens:].sum()) if num_tokens > 0 else 0.0


@dataclass
class _Counters:
    prompts: int = 0
    dropped: int = 0
    prompts_with_drops: int = 0
    truncated: int = 0
    kept: int = 0
    sample_prompt: str | None = None

    def add(self, prompt: Prompt) -> Prompt:
        self.prompts += 1
        self.dropped += prompt.num_dropped
        self.prompts_with_drops += prompt.num_dropped > 0
        self.truncated += prompt.truncated
        self.kept += prompt.num_train_instances
        if self.sample_prompt is None:
            self.sample_prompt = prompt.text
        return prompt


def _evaluate_instance(spec: ScenarioSpec, model, tokenizer, instructions: str, train_blocks: list[str],
                       inst: Instance, max_length: int, counters: _Counters) -> dict:
    """Prompt the model for one eval instance and score it with the scenario's metric."""
    def prompt_for(block: str, completion: int, blocks: list[str] | None = None, text: str | None = None) -> Prompt:
        return counters.add(build_prompt(spec, tokenizer, instructions if text is None else text,
                                         train_blocks if blocks is None else blocks, block, max_length, completion))

    if spec.method in ("generation", "multiple_choice_joint"):
        prompt = prompt_for(example_block(spec, inst, include_output=False), spec.max_tokens)
        text, _ = generate(model, tokenizer, prompt.input_ids, spec.max_tokens, spec.stop_sequences)
        pred: str | None = text.strip()
        if spec.method == "multiple_choice_joint":  # output_mapping: letter -> option text
            letter = spec.reference_prefix.lstrip()[0]
            mapping = {_option_prefix(letter, i): r.text for i, r in enumerate(inst.references)}
            pred = mapping.get(pred)
        score = hm.score_references(spec.metric, inst.golds, pred)
        return {"prediction": text.strip(), "references": inst.golds, "score": score}

    if spec.method.startswith("multiple_choice_separate"):
        scores = []
        for i, ref in enumerate(inst.references):
            n = len(tokenizer(f" {ref.text}", add_special_tokens=False).input_ids)
            prompt = prompt_for(example_block(spec, inst, include_output=True, reference_index=i), 0)
            logprob = continuation_logprob(model, prompt.input_ids, n)
            if spec.method == "multiple_choice_separate_original":
                scores.append(logprob / n)
            else:  # calibrated: minus the log probability of the option after "Answer:" alone
                calib = Instance("Answer:", inst.references, inst.split)
                prompt = prompt_for(example_block(spec, calib, include_output=True, reference_index=i), 0,
                                    blocks=[], text="")
                scores.append(logprob - continuation_logprob(model, prompt.input_ids, n))
        em, predicted = hm.multiple_choice_separate_exact_match(scores, [r.correct for r in inst.references])
        return {"prediction": inst.references[predicted].text, "references": inst.golds, "score": em}

    # ranking_binary: one greedy "Yes"/"No" per passage, passages ranked by label and its log probability
    outputs = []
    for i in range(len(inst.references)):
        prompt = prompt_for(example_block(spec, inst, include_output=False, reference_index=i), spec.max_tokens)
        outputs.append(generate(model, tokenizer, prompt.input_ids, spec.max_tokens, spec.stop_sequences))
    ranked = hm.rank_binary(outputs)
    relevance = {i: r.relevance for i, r in enumerate(inst.references) if r.relevance}
    if spec.metric == "RR@10":
        score = hm.reciprocal_rank_at_k(ranked, relevance, 10, multiple_relevance_values=spec.format == "msmarco_trec")
    else:
        score = hm.ndcg_at_k(ranked, relevance, 10)
    return {"prediction": [o[0].strip() for o in outputs], "ranking": ranked, "references": sorted(relevance),
            "score": score}


HELM_TRAIN_TRIALS = 3  # HELM v1.0's num_train_trials


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _stddev(values: list[float]) -> float:
    """Population standard deviation, as HELM's ``Stat.stddev``."""
    if not values:
        return math.nan
    mean = _mean(values)
    return math.sqrt(max(0.0, sum(v * v for v in values) / len(values) - mean * mean))


def run_scenario(spec: ScenarioSpec, model, tokenizer, data_dir: str | Path, max_instances: int | None, seed: int,
                 max_length: int | None = None, log=print, trials: int = HELM_TRAIN_TRIALS) -> dict:
    """Evaluate one scenario (all of its subsets found in ``data_dir``) over ``trials`` in-context example draws.

    Trial t draws its examples with seed ``seed + t`` (HELM: ``random.seed(train_trial_index)``); every trial scores
    the same eval instances (sampled with ``seed``). A zero-shot scenario runs one trial.

    Returns:
        ``{"metric", "score", "trial_scores", "stddev", "trials", "instances", "subsets", "in_context_examples",
        "in_context_examples_dropped", ...}``; a trial's score is the mean over subsets of the mean instance score,
        ``score`` the mean over trials and ``stddev`` their population standard deviation.

    Raises:
        ValueError: ``trials`` < 1.
    """
    if trials < 1:
        raise ValueError(f"trials: got {trials}; expected at least 1 (HELM v1.0 ran {HELM_TRAIN_TRIALS})")
    started = time.time()
    max_length = max_length or model.config.max_position_embeddings
    trials = trials if spec.max_train_instances > 0 else 1  # HELM: num_train_trials=1 when max_train_instances=0
    subsets, skipped = load_subsets(spec, data_dir)
    counters = _Counters()
    per_subset, predictions = {}, []
    was_training = model.training
    model.eval()
    for subset in subsets:
        train = [i for i in subset.instances if i.split == TRAIN]
        evals = list(enumerate(i for i in subset.instances if i.split == spec.eval_split))
        if max_instances is not None and len(evals) > max_instances:
            evals = random.Random(seed).sample(evals, max_instances)  # HELM's downsample_eval_instances
        train_ids = {id(inst): i for i, inst in enumerate(train)}
        trial_scores, trial_examples = [], []
        for trial in range(trials):
            examples = sample_examples(train, spec.max_train_instances, seed + trial)
            train_blocks = [example_block(spec, e, include_output=True) for e in examples]
            trial_examples.append([train_ids[id(e)] for e in examples])
            scores = []
            for instance_id, inst in evals:
                record = _evaluate_instance(spec, model, tokenizer, subset.instructions, train_blocks, inst,
                                            max_length, counters)
                scores.append(record["score"])
                predictions.append({"subset": subset.name, "trial": trial, "instance_id": instance_id, **record})
            trial_scores.append(_mean(scores))
        per_subset[subset.name] = {"score": _mean(trial_scores), "trial_scores": trial_scores,
                                   "stddev": _stddev(trial_scores), "instances": len(evals),
                                   "in_context_examples_available": len(trial_examples[0]),
                                   "in_context_example_ids": trial_examples}
    model.train(was_training)
    scored = [s for s in per_subset.values() if s["instances"]]
    scenario_trials = [_mean([s["trial_scores"][t] for s in scored]) for t in range(trials)] if scored else []
    result = {
        "title": spec.title,
        "metric": spec.metric,
        "score": _mean(scenario_trials),
        "trial_scores": scenario_trials,
        "stddev": _stddev(scenario_trials),
        "trials": trials,
        "instances": sum(s["instances"] for s in per_subset.values()),
        "eval_split": spec.eval_split,
        "method": spec.method,
        "max_tokens": spec.max_tokens,
        "in_context_examples": spec.max_train_instances,
        "in_context_examples_dropped": counters.dropped,
        "prompts": counters.prompts,
        "prompts_with_dropped_examples": counters.prompts_with_drops,
        "prompts_truncated": counters.truncated,
        "mean_in_context_examples": counters.kept / counters.prompts if counters.prompts else 0.0,
        "context_length": max_length,
        "seed": seed,
        "subsets": per_subset,
        "subsets_missing": skipped,
        "seconds": round(time.time() - started, 2),
        "sample_prompt": counters.sample_prompt,
        "predictions": predictions,
    }
    log(f"helm {spec.name}: {spec.metric} = {result['score']:.4f} ± {result['stddev']:.4f} over {trials} trial(s) "
        f"on {result['instances']} instances ({counters.dropped} in-context examples dropped, {counters.truncated} "
        f"prompts truncated, {result['seconds']:.1f}s)")
    return result


def run_helm(model, tokenizer, scenarios: list[str], data_dir: str | Path, max_instances: int | None = None,
             seed: int = 0, *, suite: str | Path | HelmSuite = DEFAULT_SUITE, max_length: int | None = None,
             log=None, trials: int = HELM_TRAIN_TRIALS) -> dict:
    """Evaluate ``model`` on HELM core scenarios.

    Args:
        model: a causal LM (transformers), on its device.
        tokenizer: its tokenizer.
        scenarios: scenario names from the suite (``["all"]`` for every one).
        data_dir: directory holding one folder per scenario (``ScenarioSpec.path``) in the public formats.
        max_instances: evaluation instances per scenario subset (HELM v1.0 used 1000); None for all.
        seed: seed of the instance sample; trial t draws its in-context examples with ``seed + t``.
        suite: suite YAML or a loaded :class:`HelmSuite`.
        max_length: context length to fit prompts into; default ``model.config.max_position_embeddings``.
        log: function called with one progress line per scenario (default: print to stderr).
        trials: train trials (in-context example draws) per scenario, 3 as in HELM v1.0; zero-shot scenarios run 1.

    Returns:
        ``{scenario name: {"metric", "score", "trial_scores", "stddev", "instances", ...}}`` in the order given.

    Raises:
        ValueError: an unknown scenario name (the message lists the known ones), or ``trials`` < 1.
        HelmDataError: a scenario's data file is missing (the message names the path and format).
    """
    if trials < 1:
        raise ValueError(f"trials: got {trials}; expected at least 1 (HELM v1.0 ran {HELM_TRAIN_TRIALS})")
    suite = suite if isinstance(suite, HelmSuite) else load_helm_suite(suite)
    specs = select_scenarios(suite, scenarios)
    log = log or (lambda line: print(line, file=sys.stderr))
    return {spec.name: run_scenario(spec, model, tokenizer, data_dir, max_instances, seed, max_length, log, trials)
            for spec in specs}


def format_helm_table(results: dict) -> str:
    """A markdown table: one row per scenario: main metric, mean score over trials, ± (their standard deviation)."""

    def number(x: float) -> str:
        return "-" if x != x else f"{x:.3f}"

    rows = ["| scenario | metric | score | ± | trials | instances | in-context examples (dropped) "
            "| prompts truncated |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {r.get('title', name)} | {r['metric']} | {number(r['score'])} | {number(r['stddev'])} | "
                    f"{r['trials']} | {r['instances']} | {r['in_context_examples']} "
                    f"({r['in_context_examples_dropped']}) | {r['prompts_truncated']} |")
    return "\n".join(rows)


def write_helm_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``helm.json`` (everything, predictions included) and ``helm.md`` (the table) to ``out_dir``.

    Returns:
        (json path, markdown path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "helm.json", out / "helm.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False, allow_nan=True) + "\n", encoding="utf-8")
    md_path.write_text("# HELM core scenarios\n\n" + format_helm_table(results) + "\n", encoding="utf-8")
    return json_path, md_path
