"""HELM core scenarios (HELM v1.0 "core"): scenario data, HELM's prompts, generation, main metrics.

The suite is defined in ``llmft/eval/helm/core.yaml`` (validated by :class:`HelmSuite`): the 16 core scenarios with
HELM's adapter settings (instructions, prefixes, in-context examples, max tokens, stop sequences) and main metric.
Everything below follows HELM's code (stanford-crfm/helm, ``src/helm/benchmark/``); where we differ it says so.

Prompt (``adaptation/adapters/in_context_learning_adapter.py``, ``adaptation/prompt.py``)::

    <instructions>            (only if not empty; HELM appends "\n" to non-empty instructions)
    <instance_prefix = "\n">
    <input_prefix><train input><input_suffix><output_prefix><train output><output_suffix>   x k
    <instance_prefix>
    <input_prefix><eval input><input_suffix><output_prefix.rstrip()>

e.g. BoolQ: ``Passage: ...\nQuestion: Is ...?\nAnswer: Yes\n`` blocks, the last one ending in ``Answer:``.
``multiple_choice_joint`` adds ``A. <option>\n`` lines after the input and the answer is the letter (a
prediction is mapped back to the option text before scoring); ``multiple_choice_separate_*`` score every option
by its log probability after the input (HellaSwag, OpenbookQA in HELM v1.0, zero-shot); ``ranking_binary`` asks
"Does the passage answer the query?" for every (query, passage) pair (MS MARCO) and ranks the passages as HELM's
RankingMetric does: greedy answer "Yes" first, most probable first (by the completion's log probability), then "No",
least probable first, then anything else; RR@10 / NDCG@10 follow trec_eval on that ranking.

In-context examples (``sample_examples``): drawn from the train split cycling through the labels from the most
frequent, so both answers of a yes/no task appear. Train trials: HELM v1.0 runs three (``num_train_trials=3``), and
trial t draws its examples after ``random.seed(t)`` (``_adapt_trial_index``); trial t here draws with seed
``seed + t``, so the default seed 0 gives HELM's draws 0, 1, 2. Every trial scores the same eval instances; a
scenario's score is the mean over trials of the trial's score (``Metric.evaluate``: per-trial mean, then
``merge_stat`` of ``take_mean()``), reported with the per-trial scores and their standard deviation (population, as
HELM's ``Stat.stddev``). A zero-shot scenario runs one trial, as HELM's ``run_entries_to_run_specs`` sets.

Fitting (``_make_prompt_fit``): while ``len(prompt tokens) + max_tokens`` exceeds the model's
context, the last in-context example is dropped; with none left, the prompt is cut from the right to
``context - max_tokens`` tokens (HELM's ``WindowService.truncate_from_right``, HuggingFace's default truncation
side; this can cut the final "Answer:" of a very long input, as in HELM). Token counts include the special tokens
the tokenizer adds (BOS for LLaMA), i.e. what the model actually reads.

Generation: greedy (``model.generate``, ``do_sample=False``) for ``max_tokens`` new tokens, cut at the first
stop sequence; the prediction scored is the stripped completion (HELM's ``compute_reference_metrics``).
Summarization uses greedy decoding where HELM samples at temperature 0.3. ``max_instances`` scores a seeded random
sample of the eval split (HELM's ``max_eval_instances``, 1000 in v1.0), the same sample in every trial.

Data: local files in each scenario's public format under ``data_dir/<scenario path>`` (see :data:`FORMAT_HELP`),
or, for the scenarios with an ``hf_dataset`` in the suite, that ``datasets`` dataset when the local file is missing:
``data_dir/<hub id>`` if it is a directory (a copy of the hub repository, e.g. ``huggingface-cli download google/boolq
--repo-type dataset --local-dir data/helm/google/boolq``, read offline), else the hub id itself (network or cache)
or a directory path given as the name. Hub rows are converted to the instance the local file's row gives.
Scenarios with subsets (MMLU subjects, RAFT tasks, CivilComments demographics) are scored per subset and averaged
over the subsets present, as HELM averages its runs; a subset whose files are missing is reported and skipped.
"""

from llmft.eval.helm.prompts import Prompt, build_prompt, example_block, sample_examples
from llmft.eval.helm.runner import (
           HELM_TRAIN_TRIALS,
           format_helm_table,
           generate,
           run_helm,
           run_scenario,
           write_helm_report,
)
from llmft.eval.helm.scenarios import (
           FORMAT_HELP,
           TEST,
           TRAIN,
           VALID,
           HelmDataError,
           Instance,
           Reference,
           Subset,
           load_subsets,
)
from llmft.eval.helm.suite import DEFAULT_SUITE, load_helm_suite, select_scenarios

__all__ = ["DEFAULT_SUITE", "FORMAT_HELP", "HELM_TRAIN_TRIALS", "TEST", "TRAIN", "VALID", "HelmDataError", "Instance",
           "Prompt", "Reference", "Subset", "build_prompt", "example_block", "format_helm_table", "generate",
           "load_helm_suite", "load_subsets", "run_helm", "run_scenario", "sample_examples", "select_scenarios",
           "write_helm_report"]
