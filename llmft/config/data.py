"""The data-mix schema (``data_recipes/*.yaml``): sources with token shares, filters, decontamination,
deduplication, packing.

Weights are shares of *tokens*, not of documents: a source with weight 0.25 supplies 25% of the built
training tokens whatever its document lengths. To reach its share a small source is repeated (up to
``max_epochs`` passes); a large one is subsampled. Every document is chunked into ``seq_len`` units first,
so shares are met to within a unit even for book-length documents.

    sources:
      - name: books
        weight: 0.5
        source: {format: pg19, path: data/pg19/train}
        filters: {min_tokens: 2048}
        max_epochs: 2

Relative paths start at the current working directory.

``data.sources`` in a training recipe is a mix too (:func:`inline_mix`): every source whole, once
(``shares: natural``), built by the same builder into ``<checkpoint.dir>/data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from llmft.config.loading import RecipeError, Strict, load_validated
from llmft.config.recipe import DataConfig
from llmft.config.sources import SourceSpec

# ---------------------------------------------------------------------------------------------- UL2


class Denoiser(Strict):
    """One UL2 denoiser."""

    kind: Literal["R", "S", "X"] = Field(description="R: regular spans; X: extreme; S: prefix LM.")
    mean_span: float = Field(default=3.0, gt=0, description="R/X: mean corrupted span length (words).")
    rate: float = Field(default=0.15, gt=0, lt=1, description="R/X: fraction of words corrupted.")
    weight: float = Field(default=1.0, gt=0, description="Relative frequency of this denoiser.")


# The UL2 paper's mixture: R (mu 3, 8; r 0.15), X (mu 3, 8 at r 0.5; mu 64 at r 0.15 and 0.5), S.
UL2_DENOISERS = [
    Denoiser(kind="R", mean_span=3, rate=0.15), Denoiser(kind="R", mean_span=8, rate=0.15),
    Denoiser(kind="X", mean_span=3, rate=0.5), Denoiser(kind="X", mean_span=8, rate=0.5),
    Denoiser(kind="X", mean_span=64, rate=0.15), Denoiser(kind="X", mean_span=64, rate=0.5),
    Denoiser(kind="S"),
]


class UL2Config(Strict):
    """The UL2 transform (Tay et al. 2022): each document becomes a denoising example (llmft/data/transforms.py)."""

    denoisers: list[Denoiser] = Field(default_factory=lambda: list(UL2_DENOISERS), min_length=1,
                                      description="The mixture; one is drawn per document by weight.")
    mode_tokens: dict[str, str] = Field(default_factory=lambda: {"R": "[NLU]", "S": "[S2S]", "X": "[NLG]"},
                                        description="Text prepended to the input per denoiser kind.")
    sentinel: str = Field(default="<extra_id_{i}>", description="Sentinel text; {i} is the span number.")


# ---------------------------------------------------------------------------------------------- mix


class Filters(Strict):
    """Per-document filters, applied to the token count of the whole document (prompt included)."""

    min_tokens: int | None = Field(default=None, ge=1, description="Drop documents shorter than this.")
    max_tokens: int | None = Field(default=None, ge=1, description="Drop documents longer than this.")


class Decontamination(Strict):
    """Remove training text that shares word n-grams with evaluation texts (see llmft/data/decontam.py)."""

    targets: list[Path] = Field(
        min_length=1,
        description="Evaluation files or directories: .txt books (PG-19 test/validation), HELM scenario "
        ".jsonl/.json files.",
    )
    n: int = Field(default=13, ge=4, description="n-gram length in words (Together used 10 for HELM).")
    mode: Literal["document", "span"] = Field(
        default="document", description="'document' drops a whole document on any hit; 'span' cuts the overlap."
    )

    @field_validator("targets")
    @classmethod
    def _targets_exist(cls, v: list[Path], info: ValidationInfo) -> list[Path]:
        if not (info.context and info.context.get("check_paths") is False):
            missing = [str(p) for p in v if not p.exists()]
            if missing:
                raise ValueError(f"decontamination targets do not exist: {', '.join(missing)}")
        return v


class Dedup(Strict):
    """Remove exact and near-duplicate documents (see llmft/data/dedup.py), after decontamination.

    Two documents are near-duplicates when the Jaccard similarity of their sets of word shingles
    (``shingle_size`` consecutive normalized words) is at least ``threshold``; ``minhash`` and ``clusters``
    find candidate pairs, and every candidate is checked with the exact similarity.
    """

    methods: list[Literal["exact", "minhash", "clusters"]] = Field(
        default=["exact", "minhash"], min_length=1,
        description="'exact': equal normalized text (a hash); 'minhash': MinHash-LSH over the shingles; 'clusters': "
        "embed, k-means, search pairs within each cluster, repeated over several clusterings. Pairs found by any "
        "method are joined into groups.",
    )
    scope: Literal["per_source", "across_sources"] = Field(
        default="per_source",
        description="'per_source': each source is deduplicated on its own; 'across_sources': all together, so a "
        "document can be dropped as a copy of one in an earlier source.",
    )
    threshold: float = Field(
        default=0.8, gt=0, le=1,
        description="Jaccard similarity of shingle sets at or above which two documents are duplicates "
        "(0.8 with 5-word shingles is about 2% of the words substituted; 0.4 with 3-word shingles about 17%).",
    )
    shingle_size: int = Field(default=5, ge=1, description="Words per shingle (documents shorter: one shingle).")
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations (minhash).")
    num_clusters: int = Field(
        default=1024, ge=2,
        description="K of the k-means (clusters); at most one cluster per 10 documents is used. The pair search "
        "costs about n^2 / K, so raise K with the corpus.",
    )
    clusterings: int = Field(
        default=5, ge=1, description="Independent clusterings whose candidate pairs are joined (clusters).",
    )
    embedder: str = Field(
        default="hashed",
        description="Document vectors for clusters: 'hashed' (the shingles feature-hashed into 256 signed "
        "dimensions), 'sentence-transformers:<model>' (if installed) or 'package.module:function' (texts -> "
        "array of shape (n, d)). Vectors are L2-normalized.",
    )
    candidate_cosine: float | None = Field(
        default=None, ge=-1, le=1,
        description="Within a cluster, pairs with embedding cosine at least this are checked. Default for "
        "'hashed': 2 t / (1 + t) - 0.27 for threshold t (a pair with J >= t has shingle-set cosine >= 2t / (1 + t); "
        "0.27 is 3 standard deviations of hashing noise); other embedders must set it.",
    )
    keep: Literal["first", "longest"] = Field(
        default="first", description="The document kept from each group: the first read, or the longest (ties: first).",
    )
    seed: int = Field(default=0, description="Seeds MinHash permutations, k-means and the recall sample.")
    recall_sample: int = Field(
        default=1000, ge=0,
        description="Measure recall against an exact all-pairs search for this many sampled documents (each "
        "compared with every document of its scope); 0 skips it.",
    )
    examples: int = Field(default=10, ge=0, description="Example pairs in the report (the least similar found).")


class TextFilter(Strict):
    """One document filter of the mix's ``filters`` list (see llmft/data/filters.py): a score per document, and the
    document is removed when the score is above ``threshold``.

        filters:
          - {kind: keywords, words: [damn, hell], patterns: ["\\bf+u+c+k+"], threshold: 0}
          - {kind: length, min_words: 50}
          - {kind: classifier, function: mypkg.quality:toxicity, threshold: 0.8, mode: recall}
          - {kind: perplexity, model: runs/small-lm/final, threshold: 1000}
    """

    kind: Literal["keywords", "length", "classifier", "perplexity"] = Field(
        description="'keywords': matches of whole words (case-insensitive) and regexes per 1000 words; 'length': "
        "words outside [min_words, max_words]; 'classifier': 'package.module:function' (texts -> one score each); "
        "'perplexity': token perplexity under a small causal LM (gibberish, boilerplate scores high).",
    )
    name: str | None = Field(default=None, description="Name in stats and reports (default: the kind).")
    sources: list[str] | None = Field(default=None, description="Apply only to these sources (default: all).")
    words: list[str] = Field(default_factory=list, description="keywords: whole words or phrases, case-insensitive.")
    patterns: list[str] = Field(default_factory=list, description="keywords: Python regexes, case-insensitive.")
    min_words: int | None = Field(default=None, ge=0, description="length: remove documents with fewer words.")
    max_words: int | None = Field(default=None, ge=1, description="length: remove documents with more words.")
    function: str | None = Field(
        default=None, description="classifier: 'package.module:function' taking a list of texts, returning a score "
        "per text (higher = more to remove).",
    )
    model: str | None = Field(
        default=None, description="perplexity: the scoring causal LM, a local directory or hub id (its own tokenizer; "
        "safetensors weights only, no remote code).",
    )
    max_tokens: int = Field(
        default=512, ge=2, description="perplexity: tokens scored per document (or window), the rest cut off; at most "
        "the model's max_position_embeddings.",
    )
    batch_size: int = Field(default=16, ge=1, description="perplexity: documents per forward pass.")
    threshold: float | None = Field(
        default=None,
        description="Remove a document whose score is above this. keywords: matches per 1000 words (default 0: any "
        "match); classifier: required; perplexity: required, a perplexity > 1.",
    )
    mode: Literal["document", "recall"] = Field(
        default="document",
        description="'document': score the whole document; 'recall': score every window of window_words words and "
        "remove on the highest (filters more: a keyword rate's maximum over windows is at least the document's).",
    )
    window_words: int = Field(default=100, ge=10, description="Words per window in recall mode.")
    examples: int = Field(default=5, ge=0, description="Removed documents shown in the report, per source.")


class Reweight(Strict):
    """Weights that undo the shift the filters cause (see llmft/data/reweight.py): a smooth linear probe predicts
    P(unfiltered | x) from document embeddings, and every kept document gets w = p / (1 - p), clipped and
    normalized to mean 1 over the kept documents of its source. The weights are stored per token (column
    ``weight`` of the train shards); training weighs each token's loss by them (llmft/train/loss.py)."""

    embedder: str = Field(
        default="hashed",
        description="'hashed' (words or word n-grams feature-hashed into dim signed dimensions) or "
        "'package.module:function' (texts -> array (n, d)). Vectors are L2-normalized.",
    )
    shingle_size: int = Field(default=1, ge=1, description="hashed: words per feature (1 = bag of words).")
    dim: int = Field(default=4096, ge=16, le=1 << 20, description="hashed: dimensions.")
    l2: float = Field(
        default=1e-2, gt=0,
        description="L2 penalty (l2 / 2 * |w|^2 added to the class-balanced mean log-loss, features of unit "
        "variance): strong keeps the probe smooth, so weights follow broad content rather than single documents.",
    )
    sample_size: int = Field(
        default=20000, ge=10,
        description="Documents sampled uniformly from each set (all read, kept), per source: the principal components "
        "and the probe are fitted on them (the build holds their sparse embeddings, a few KB each).",
    )
    min_weight: float = Field(default=0.2, gt=0, description="Clip weights below this (before normalizing).")
    max_weight: float = Field(default=5.0, gt=0, description="Clip weights above this (before normalizing).")
    folds: int = Field(
        default=2, ge=1, le=10,
        description="Cross-fitting: a document's weight comes from a probe trained on the other folds (1: one probe "
        "for all, which partly memorizes its training documents and flattens their weights).",
    )
    components: int = Field(
        default=32, ge=0,
        description="Fit the probe on this many principal components of the embeddings (0: all dimensions). Few "
        "components keep it smooth: it follows broad content (topics, style) and cannot pick up the filtered words "
        "themselves, which the kept documents lack anyway.",
    )
    seed: int = Field(default=0, description="Seeds the samples and the folds.")


ENGINE_RESERVED = ("pipeline", "tasks", "workers", "logging_dir", "depends", "skip_completed")  # set by the build


class Engine(Strict):
    """Run the per-file stages of the build (read, clean, decontaminate, filter, UL2, tokenize, dedup features) as
    tasks on a datatrove executor: on this machine's cores (``local``) or on a cluster (``slurm``, ``ray``). The
    build then selects, packs and writes as without an engine, with the same rows. Hub sources and ``ni_fewshot``
    sources (whose sequences span files) are still read in the build's process."""

    executor: Literal["local", "slurm", "ray"] = Field(
        default="local", description="'local': worker processes here; 'slurm': an sbatch job array; 'ray': a Ray "
        "cluster. With slurm or ray, the build's output directory must be on storage every node sees.")
    workers: int | None = Field(
        default=None, ge=1, description="Tasks run at once (default: num_proc for local, unlimited on a cluster).")
    files_per_task: int | None = Field(
        default=None, ge=1, description="Files each task processes, one after another. Default: locally, a wave's "
        "files over 4 tasks per worker (each task costs datatrove's setup, about 0.2 s); on a cluster, 1.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of the datatrove executor, e.g. {partition: cpu, time: '4:00:00', cpus_per_task: 4} "
        "for slurm (its constructor's keyword arguments, except " + ", ".join(ENGINE_RESERVED) + ").")


class MixSource(Strict):
    """One source of the mix and its share of the tokens."""

    name: str = Field(min_length=1, description="Short name used in stats and plots (e.g. rp_book).")
    weight: float = Field(default=1.0, gt=0, description="Share of the training tokens (weights are normalized to sum "
                          "1; equal shares when omitted). Not used with shares: natural.")
    source: SourceSpec = Field(description="Where and in which format the documents are.")
    transform: Literal["none", "ul2", "ni_fewshot"] = Field(
        default="none",
        description="'ul2': UL2 mixture of denoisers (input context, target trained); 'ni_fewshot': pack the "
        "instances of each Natural Instructions task after one header, as in-context demonstrations.",
    )
    ul2: UL2Config = Field(default_factory=UL2Config, description="UL2 denoisers, mode tokens and sentinel.")
    filters: Filters = Field(default_factory=Filters, description="Document filters.")
    max_epochs: float = Field(
        default=1.0, gt=0, description="At most this many passes over the source to reach its share (1 = no repeats)."
    )


class MixRecipe(Strict):
    """A data mix: what ``llmft data build`` turns into packed, shuffled training rows."""

    tokenizer: str | None = Field(
        default=None, description="Tokenizer (hub id or directory). Training recipes use their model's tokenizer."
    )
    seq_len: int | None = Field(
        default=None, gt=1, description="Row length. Training recipes use model.max_seq_len."
    )
    packing: Literal["concat", "isolated"] = Field(
        default="concat", description="'concat' (attention across documents) or 'isolated' (see packing.py)."
    )
    total_tokens: int | None = Field(
        default=None, ge=1,
        description="Training tokens to build. Default: the most the sources allow within their max_epochs.",
    )
    validation_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="Hold out this fraction of every source's tokens (its tail)."
    )
    shares: Literal["weights", "natural"] = Field(
        default="weights",
        description="'weights': each source supplies its weight's share of the tokens. 'natural': each source in "
        "proportion to its size, so every source is taken whole, once (unless total_tokens asks for less); what "
        "data.sources in a training recipe builds.",
    )
    validation_sources: list[SourceSpec] = Field(
        default_factory=list,
        description="Held-out sources, tokenized whole into the validation tokens (beside each training source's "
        "validation_fraction).",
    )
    seed: int = Field(default=0, description="Seeds subsampling and the order of the mixed rows.")
    num_proc: int = Field(
        default=1, ge=1,
        description="Tokenize in this many worker processes (reading stays in one). The output is the same "
        "for any value; each worker uses one tokenizer thread, so set it to the number of cores.",
    )
    engine: Engine | None = Field(
        default=None, description="Run the per-file stages as datatrove tasks (locally or on a cluster); omit to "
        "read in this process and tokenize in num_proc workers. The output is the same either way.")
    on_error: Literal["skip", "stop"] = Field(default="skip", description="Malformed records: skip (counted) or stop.")
    add_eos: bool = Field(default=True, description="End every document with EOS.")
    decontaminate: Decontamination | None = Field(default=None, description="n-gram decontamination; omit for none.")
    dedup: Dedup | None = Field(default=None, description="Exact and near-duplicate removal; omit for none.")
    filters: list[TextFilter] = Field(
        default_factory=list, description="Document filters (keywords, length, user classifiers), after dedup."
    )
    reweight: Reweight | None = Field(
        default=None, description="Weights per kept document that undo the filters' shift; needs filters."
    )
    sources: list[MixSource] = Field(min_length=1, description="The sources and their token shares.")


def _checks(mix: MixRecipe) -> list[tuple[tuple, str]]:
    problems = []
    names = [s.name for s in mix.sources]
    for i, s in enumerate(mix.sources):
        if mix.shares == "natural" and "weight" in s.model_fields_set:
            problems.append((("sources", i, "weight"), "with shares: natural every source counts by its size; remove "
                             "the weight, or use shares: weights"))
        if names.count(s.name) > 1:
            problems.append((("sources", i, "name"), f"{s.name!r} is used twice; give every source its own name"))
        if s.transform == "ni_fewshot" and s.source.format != "natural_instructions":
            problems.append((("sources", i, "transform"), f"ni_fewshot needs format natural_instructions, not "
                             f"{s.source.format!r}"))
        if "ul2" in s.model_fields_set and s.transform != "ul2":
            problems.append((("sources", i, "ul2"), "ul2 settings need transform: ul2"))
        f = s.filters
        if f.min_tokens and f.max_tokens and f.min_tokens > f.max_tokens:
            problems.append((("sources", i, "filters"), "min_tokens is larger than max_tokens"))
    if mix.dedup is not None:
        problems += [(("dedup", *loc), msg) for loc, msg in _dedup_checks(mix.dedup)]
    if mix.engine is not None:
        problems += [(("engine", *loc), msg) for loc, msg in _engine_checks(mix)]
    filter_names = [f.name or f.kind for f in mix.filters]
    for i, f in enumerate(mix.filters):
        if filter_names.count(filter_names[i]) > 1:
            problems.append((("filters", i, "name"), f"{filter_names[i]!r} names two filters; give each its own name"))
        problems += [(("filters", i, *loc), msg) for loc, msg in _filter_checks(f, names)]
    if mix.reweight is not None:
        r = mix.reweight
        if not mix.filters:
            problems.append((("reweight",), "reweight undoes the shift of filters, and there are none; add filters "
                             "or remove reweight"))
        if r.min_weight >= r.max_weight:
            problems.append((("reweight", "min_weight"), f"{r.min_weight} is not below max_weight {r.max_weight}"))
        if r.embedder != "hashed" and not all(r.embedder.partition(":")[::2]):
            problems.append((("reweight", "embedder"), f"got {r.embedder!r}; expected 'hashed' or "
                             "'package.module:function'"))
        for i, s in enumerate(mix.sources):
            if s.transform == "ni_fewshot":
                problems.append((("sources", i, "transform"), "ni_fewshot packs many documents into one sequence, "
                                 "so a document weight has no single place; use transform: none or remove reweight"))
    return problems


_FILTER_KEYS = {"words": "keywords", "patterns": "keywords", "min_words": "length", "max_words": "length",
                "function": "classifier", "model": "perplexity", "max_tokens": "perplexity",
                "batch_size": "perplexity"}


def _filter_checks(f: TextFilter, sources: list[str]) -> list[tuple[tuple, str]]:
    import re

    problems = []
    for key, kind in _FILTER_KEYS.items():
        if key in f.model_fields_set and f.kind != kind:
            problems.append(((key,), f"{key} is a setting of kind {kind}, not {f.kind}; remove it"))
    for i, s in enumerate(f.sources or []):
        if s not in sources:
            problems.append((("sources", i), f"{s!r} is not a source of this mix (sources: {', '.join(sources)})"))
    if f.kind == "keywords":
        if not f.words and not f.patterns:
            problems.append(((), "a keywords filter needs words or patterns"))
        for i, pat in enumerate(f.patterns):
            try:
                re.compile(pat)
            except re.error as e:
                problems.append((("patterns", i), f"{pat!r} is not a valid regex: {e}"))
    if f.kind == "length":
        if f.min_words is None and f.max_words is None:
            problems.append(((), "a length filter needs min_words or max_words"))
        elif f.min_words is not None and f.max_words is not None and f.min_words > f.max_words:
            problems.append((("min_words",), f"{f.min_words} is larger than max_words {f.max_words}"))
        if f.mode == "recall":
            problems.append((("mode",), "a length filter scores the whole document; remove mode: recall"))
        if f.threshold is not None:
            problems.append((("threshold",), "a length filter has no score threshold; use min_words / max_words"))
    if f.kind == "classifier":
        if not f.function or not all(f.function.partition(":")[::2]):
            problems.append((("function",), f"got {f.function!r}; expected 'package.module:function' (texts -> "
                             "one score each)"))
        if f.threshold is None:
            problems.append((("threshold",), "a classifier filter needs threshold: the score above which a document "
                             "is removed"))
    if f.kind == "perplexity":
        if not f.model:
            problems.append((("model",), "a perplexity filter needs model: a small causal LM (a local directory or "
                             "hub id) to score the documents with"))
        if f.threshold is None:
            problems.append((("threshold",), "a perplexity filter needs threshold: the perplexity above which a "
                             "document is removed (measure a sample first, e.g. 2-5x the median of clean text)"))
        elif f.threshold <= 1:
            problems.append((("threshold",), f"got {f.threshold:g}; expected a perplexity > 1 (every perplexity is "
                             ">= 1, so this removes everything)"))
    return problems


def executor_class(name: str) -> type:
    """The datatrove executor class for ``engine.executor``."""
    from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor

    return {"local": LocalPipelineExecutor, "slurm": SlurmPipelineExecutor, "ray": RayPipelineExecutor}[name]


def _engine_checks(mix: MixRecipe) -> list[tuple[tuple, str]]:
    """What the engine cannot run yet, and executor options its datatrove executor does not take."""
    import inspect

    problems = []
    if mix.reweight is not None and mix.dedup is not None:
        problems.append(((), "the engine does not run reweight with dedup yet (its tasks filter before the dedup "
                         "features, reweight needs the filters after dedup); remove engine to build this mix in this "
                         "process (num_proc workers), or remove reweight or dedup"))
    if mix.dedup is not None and "clusters" in mix.dedup.methods and mix.dedup.embedder != "hashed":
        problems.append(((), f"the engine's tasks compute hashed embeddings only, not dedup.embedder "
                         f"{mix.dedup.embedder!r}; remove engine, or use embedder: hashed"))
    cls = executor_class(mix.engine.executor)
    params = inspect.signature(cls.__init__).parameters
    for key in mix.engine.options:
        if key in ENGINE_RESERVED:
            problems.append((("options", key), f"{key} is set by the build; remove it"))
        elif key not in params:
            known = sorted(p for p in params if p not in ("self", *ENGINE_RESERVED))
            problems.append((("options", key), f"{cls.__name__} takes no {key!r}; it takes {', '.join(known)}"))
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.name not in ("self", *ENGINE_RESERVED) and p.kind is p.POSITIONAL_OR_KEYWORD
               and p.name not in mix.engine.options]
    if missing:
        problems.append((("options",), f"the {mix.engine.executor} executor needs {', '.join(missing)}; add them "
                         "under options"))
    return problems


def _dedup_checks(d: Dedup) -> list[tuple[tuple, str]]:
    problems = []
    if len(set(d.methods)) < len(d.methods):
        problems.append((("methods",), f"{d.methods} names a method twice; list each once"))
    for key, method in (("num_perm", "minhash"), ("num_clusters", "clusters"), ("clusterings", "clusters"),
                        ("embedder", "clusters"), ("candidate_cosine", "clusters")):
        if key in d.model_fields_set and method not in d.methods:
            problems.append(((key,), f"{key} is a setting of the {method} method; add {method} to methods or remove "
                             f"{key}"))
    if d.embedder != "hashed":
        name, sep, rest = d.embedder.partition(":")
        if not (sep and name and rest):
            problems.append((("embedder",), f"got {d.embedder!r}; expected 'hashed', "
                             "'sentence-transformers:<model>' or 'package.module:function'"))
        elif "clusters" in d.methods and d.candidate_cosine is None:
            problems.append((("candidate_cosine",), f"embedder {d.embedder!r} needs candidate_cosine: the cosine "
                             "above which pairs in a cluster are checked (e.g. 0.8 for sentence embeddings)"))
    return problems


def load_mix(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> MixRecipe:
    """Read and validate a data-mix recipe.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings applied before validation.
        check_paths: False validates the schema only (data not downloaded yet).

    Raises:
        RecipeError: every problem, with file, line and YAML path.
    """
    return load_validated(path, MixRecipe, overrides, context={"check_paths": check_paths}, checks=_checks)


def inline_mix(data: DataConfig) -> MixRecipe:
    """The data mix that ``data.sources`` in a training recipe stands for: every source whole, once (natural
    shares), with the recipe's packing, held-out fraction, EOS, bad-record policy and validation sources. Each
    source is named after its file or dataset (``source-2`` etc. when two share a name)."""
    names: list[str] = []
    for spec in data.sources:
        base = (spec.path.name.split(".")[0] if spec.path is not None else str(spec.hub).split("/")[-1]) or "source"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return MixRecipe(packing=data.packing, validation_fraction=data.validation_fraction, on_error=data.on_error,
                     add_eos=data.add_eos, shares="natural", validation_sources=data.validation,
                     sources=[MixSource(name=n, source=s) for n, s in zip(names, data.sources)])


def resolve_lengths(mix: MixRecipe, seq_len: int | None, tokenizer: str | None, where: str) -> tuple[int, str]:
    """The row length and tokenizer to build with: the caller's (a training recipe's) or the mix's own.

    Raises:
        RecipeError: neither gives one, or they disagree.
    """
    errors = []
    if seq_len and mix.seq_len and seq_len != mix.seq_len:
        errors.append(f"{where}: seq_len is {mix.seq_len} but the model trains at {seq_len}; remove seq_len "
                      "from the data recipe or make them equal")
    if tokenizer and mix.tokenizer and tokenizer != mix.tokenizer:
        errors.append(f"{where}: tokenizer is {mix.tokenizer!r} but the model uses {tokenizer!r}; remove it from "
                      "the data recipe or make them equal")
    final_len, final_tok = seq_len or mix.seq_len, tokenizer or mix.tokenizer
    if final_len is None:
        errors.append(f"{where}: seq_len is not set; add seq_len: <tokens> (or build from a training recipe)")
    if final_tok is None:
        errors.append(f"{where}: tokenizer is not set; add tokenizer: <hub id or directory>")
    if errors:
        raise RecipeError(errors)
    return final_len, final_tok
