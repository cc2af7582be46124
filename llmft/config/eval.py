"""The evaluation schemas: the ``eval`` section of a training recipe (perplexity by length, passkey and RULER during
training), and a HELM suite file (``llmft/eval/helm/core.yaml``, or a user's): its scenarios, where their data is,
HELM's adapter settings and each scenario's main metric. ``llmft/eval/helm.py`` loads and runs it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from llmft.config.loading import Strict

# RULER's 13 tasks, in its order (llmft/eval/ruler_tasks.py defines them)
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
RULER_THRESHOLD = 85.6  # Llama-2-7B's 4K average in RULER's table: the bar for "effective" lengths


class PasskeyEval(Strict):
    """Passkey retrieval during training (llmft/eval/passkey.py): random 5-digit keys hidden in filler text."""

    lengths: list[Annotated[int, Field(gt=16)]] = Field(
        default_factory=list, description="Prompt lengths in tokens (default: [model.max_seq_len])."
    )
    depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0], description="Key positions as fractions of the filler (0 = start)."
    )
    trials: int = Field(default=5, ge=1, description="Random keys per (length, depth) cell.")


class RulerEval(Strict):
    """A small RULER subset during training (llmft/eval/ruler.py): synthetic retrieval and tracking tasks."""

    tasks: list[str] = Field(
        default_factory=lambda: ["niah_single_1", "niah_multikey_2", "niah_multivalue"],
        description="RULER task names (niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, "
        "cwe, fwe, qa_1, qa_2).",
    )
    lengths: list[Annotated[int, Field(gt=16)]] = Field(
        default_factory=list, description="Total lengths in tokens, prompt and answer (default: [model.max_seq_len])."
    )
    samples: int = Field(default=5, ge=1, description="Prompts per task and length.")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Tokens generated per answer (default: RULER's per task, 30-128)."
    )
    haystack: str | None = Field(default=None, description="Books for the essay haystack (default: shipped books).")
    qa_data: str | None = Field(default=None, description="Directory with squad.json / hotpotqa.json (qa_1, qa_2).")

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in RULER_TASKS]
        if unknown or not v:
            raise ValueError(f"unknown RULER task(s) {unknown or v}; expected some of {', '.join(RULER_TASKS)}")
        return v


class EvalConfig(Strict):
    """Perplexity by context length on held-out text during training (needs data.validation*), and optionally
    passkey retrieval and a RULER subset."""

    every_steps: int = Field(default=0, ge=0, description="Evaluate every N optimizer steps (0: off).")
    lengths: list[Annotated[int, Field(gt=1)]] = Field(
        default_factory=list, description="Context lengths to score (default: [model.max_seq_len])."
    )
    max_windows: int = Field(default=8, ge=1, description="At most this many windows per length.")
    at_end: bool = Field(default=True, description="Also evaluate after the last step (when every_steps > 0).")
    passkey: PasskeyEval | None = Field(
        default=None, description="Also run passkey retrieval at each evaluation; logged as eval/passkey@<length>."
    )
    ruler: RulerEval | None = Field(
        default=None, description="Also run RULER tasks at each evaluation; logged as eval/ruler@<length> (the "
        "average) and eval/ruler/<task>@<length>."
    )


Method = Literal["generation", "multiple_choice_joint", "multiple_choice_separate_original",
                 "multiple_choice_separate_calibrated", "ranking_binary"]
Metric = Literal["exact_match", "quasi_exact_match", "f1_score", "rouge_2", "RR@10", "NDCG@10"]
DataFormat = Literal["mmlu_csv", "boolq_jsonl", "narrativeqa_csv", "natural_qa_closedbook",
                     "natural_qa_openbook_longans", "quac_json", "hellaswag_jsonl", "openbookqa_jsonl",
                     "truthfulqa_csv", "msmarco_regular", "msmarco_trec", "cnndm_jsonl", "xsum_jsonl",
                     "imdb_aclimdb", "raft_jsonl", "civil_comments_csv"]


class HFSource(Strict):
    """A ``datasets`` dataset used when the local files of a scenario are missing.

    Read from ``data_dir/<name>`` when that is a directory (a copy of the hub repository: its parquet/json data files
    and README), else ``datasets.load_dataset(name)`` (hub id: network or cache; or a directory path).
    """

    name: str = Field(description="Hub id, e.g. google/boolq (or a directory laid out like the hub repository).")
    config: str | None = Field(default=None, description="Dataset configuration, e.g. 3.0.0 for cnn_dailymail; "
                                                         "'{subset}' is replaced by the subset (MMLU subjects).")
    splits: dict[str, str] = Field(description="Local file stem -> hub split, e.g. {dev: validation}.")


class ScenarioSpec(Strict):
    """One HELM scenario: where its data is, HELM's adapter settings, and its main metric."""

    name: str = Field(description="Name used on the command line (--helm boolq,mmlu,...).")
    title: str = Field(description="Display name in the scores table.")
    metric: Metric = Field(description="HELM's main metric for the scenario.")
    method: Method = Field(description="HELM adaptation method.")
    format: DataFormat = Field(description="Loader / file format of the scenario's data (llmft.eval.helm.FORMAT_HELP).")
    path: str = Field(description="Directory of the scenario's files, relative to the data directory.")
    eval_split: Literal["valid", "test"] = Field(description="Split scored (HELM's main split for the scenario).")
    subsets: list[str] = Field(default_factory=list,
                               description="MMLU subjects, RAFT tasks or CivilComments demographics.")
    instructions: str = Field(default="", description="Text before the examples; '{subject}' is replaced by the "
                                                      "subset. RAFT reads its instructions from the data.")
    input_prefix: str = Field(default="", description="Before each input (HELM AdapterSpec.input_prefix).")
    input_suffix: str = Field(default="\n", description="After each input.")
    output_prefix: str = Field(default="", description="Before each output; its rstrip ends the prompt.")
    output_suffix: str = Field(default="\n", description="After each in-context output.")
    instance_prefix: str = Field(default="\n", description="Between instructions and example blocks.")
    reference_prefix: str = Field(default="A. ",
                                  description="Before each option (multiple_choice_joint) or passage (ranking).")
    reference_suffix: str = Field(default="\n", description="After each option or passage.")
    max_train_instances: int = Field(ge=0, description="In-context examples (HELM v1.0: 5; MS MARCO: 2 queries x 2 "
                                                       "passages).")
    max_tokens: int = Field(ge=0, description="Maximum generated tokens.")
    stop_sequences: list[str] = Field(default_factory=list, description="Generation is cut at the first of these.")
    hf_dataset: HFSource | None = Field(default=None, description="Fallback when local files are missing.")
    notes: str = Field(default="", description="Where this differs from HELM, if anywhere.")

    @model_validator(mode="after")
    def _method_matches_metric(self) -> ScenarioSpec:
        ranking = self.method == "ranking_binary"
        if ranking != (self.metric in ("RR@10", "NDCG@10")):
            raise ValueError(f"metric {self.metric} does not go with method {self.method}; RR@10 and NDCG@10 are for "
                             "ranking_binary, and ranking_binary needs one of them")
        if ranking != self.format.startswith("msmarco"):
            raise ValueError("ranking_binary is the MS MARCO method: use format msmarco_regular/msmarco_trec with it")
        if self.method.startswith("multiple_choice_separate") and self.metric != "exact_match":
            raise ValueError("multiple_choice_separate_* score options by log probability: use metric exact_match")
        return self


class HelmSuite(Strict):
    """A suite file (``llmft/eval/helm/core.yaml``, or a user's): a list of scenarios."""

    description: str = Field(description="What the suite is and where its settings come from.")
    scenarios: list[ScenarioSpec] = Field(min_length=1, description="The scenarios, in table order.")

    @model_validator(mode="after")
    def _unique_names(self) -> HelmSuite:
        names = [s.name for s in self.scenarios]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scenario names must be unique; repeated: {', '.join(dupes)}")
        return self
