"""The schema of one data source (an entry of a data mix, or of ``data.sources`` in a training recipe): its
format and which files (``path``) or which ``datasets`` dataset (``hub``) it reads, checked at load.

The formats and their layouts are described in ``llmft/data/sources.py``, which reads them. Here is what a
spec names: :func:`list_files` resolves it to files (a file, every file of the format in a directory, or a
glob), the same resolution the validator checks.
"""

from __future__ import annotations

import difflib
import glob
import json
import re
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from llmft.config.loading import Strict

Format = Literal[
    "text", "jsonl", "parquet", "arrow", "redpajama", "oig", "natural_instructions", "p3", "pile", "pg19",
    "csv", "sqlite", "html", "prompt_completion", "chat", "long_data_collections", "booksum", "lost_in_the_middle",
]

# The subsets as RedPajama-1T names them (its ``red_pajama_subset`` values and top-level directories).
REDPAJAMA_SUBSETS = ("arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia")
# The 22 ``meta.pile_set_name`` values of The Pile.
PILE_SETS = (
    "ArXiv", "BookCorpus2", "Books3", "DM Mathematics", "Enron Emails", "EuroParl", "FreeLaw", "Github",
    "Gutenberg (PG-19)", "HackerNews", "NIH ExPorter", "OpenSubtitles", "OpenWebText2", "PhilPapers", "Pile-CC",
    "PubMed Abstracts", "PubMed Central", "StackExchange", "USPTO Backgrounds", "Ubuntu IRC", "Wikipedia (en)",
    "YoutubeSubtitles",
)

_JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
# Which files of a directory belong to a source, by (lower-case) name ending.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "text": TEXT_SUFFIXES,
    "jsonl": _JSONL,
    "parquet": (".parquet",),
    "arrow": (".arrow", ".feather", ".ipc"),
    "redpajama": _JSONL,
    "oig": _JSONL,
    "natural_instructions": (".json",),
    "p3": _JSONL,
    "pile": _JSONL,
    "pg19": TEXT_SUFFIXES + _JSONL + (".parquet",),
    "csv": (".csv", ".csv.gz"),
    "sqlite": (".sqlite", ".sqlite3", ".db"),
    "html": (".html", ".htm"),
    "prompt_completion": _JSONL,
    "chat": _JSONL,
    "long_data_collections": _JSONL,
    "booksum": _JSONL,
    "lost_in_the_middle": _JSONL,
}
TEXT_FIELD_FORMATS = ("jsonl", "parquet", "arrow", "csv")
_SUBSET_FORMATS = ("redpajama", "pile")
# The record formats: each row becomes a document by the same function whether it came from a file or a hub.
HUB_FORMATS = ("jsonl", "parquet", "arrow", "redpajama", "oig", "p3", "pile", "pg19", "prompt_completion", "chat",
               "long_data_collections", "booksum", "lost_in_the_middle")
# `datasets` packaged builders: `hub: json` etc. read data_files (usually local) and are not Hub repositories.
PACKAGED_BUILDERS = ("json", "parquet", "arrow", "csv", "text")
_HUB_ONLY_FIELDS = ("hub_config", "split", "revision", "data_files", "streaming")
_GLOB_CHARS = re.compile(r"[*?\[]")


# ------------------------------------------------------------------------------------------------ spec


class SourceSpec(Strict):
    """One source of a data mix: a format and where its files are (``path``) or which dataset (``hub``)."""

    format: Format = Field(description="The layout of the files; see llmft/data/sources.py for each one.")
    path: Path | None = Field(
        default=None,
        description="A file, a directory (every file of the format inside it, recursively, sorted) or a glob "
        "pattern such as data/*.jsonl.gz. Relative paths start at the current directory. Give path or hub.",
    )
    hub: str | None = Field(
        default=None, min_length=1,
        description="A `datasets` Hub id (e.g. deepmind/pg19, bigscience/P3), or a packaged builder (json, parquet, "
        "arrow, csv, text) reading data_files; streamed through datasets.load_dataset. Record formats only "
        "(jsonl, parquet, arrow, redpajama, oig, p3, pile, pg19, prompt_completion). Give path or hub.",
    )
    hub_config: str | None = Field(
        default=None, min_length=1,
        description="hub: the dataset's config (subset) name, e.g. a P3 prompt such as "
        "adversarial_qa_dbert_answer_the_following_q.",
    )
    split: str = Field(default="train", min_length=1, description="hub: the split to read.")
    revision: str | None = Field(
        default=None, min_length=1,
        description="hub: the commit (or tag/branch) to read. Pin a commit sha: the build cache knows a hub "
        "source by its spec only, so an unpinned one is re-used after the dataset changes upstream.",
    )
    data_files: list[str] | None = Field(
        default=None, min_length=1,
        description="hub: the files to read, as datasets.load_dataset takes them (globs allowed): paths inside "
        "the Hub repository, or local paths for a packaged builder (relative to the current directory).",
    )
    streaming: bool = Field(
        default=True,
        description="hub: stream the rows instead of downloading and preparing the whole dataset first.",
    )
    text_field: str = Field(
        default="text", min_length=1, description="jsonl/parquet/arrow/csv: the field or column holding the text."
    )
    subsets: list[str] = Field(
        default_factory=list,
        description="redpajama: keep only these red_pajama_subset values (e.g. [book]); pile: only these "
        "pile_set_name values (e.g. ['Gutenberg (PG-19)']). Empty keeps all.",
    )
    exclude_subsets: list[str] = Field(
        default_factory=list,
        description="redpajama/pile: drop these subsets (e.g. [book, arxiv] for the rest of RedPajama).",
    )
    template: str | None = Field(
        default=None,
        description="csv: a str.format template over column names, e.g. '{title}\\n\\n{body}' (instead of "
        "text_field).",
    )
    query: str | None = Field(
        default=None,
        description="sqlite: a SELECT returning a column named text; its other columns go into meta.",
    )
    prompt_field: str = Field(default="prompt", min_length=1, description="prompt_completion: the prompt field.")
    completion_field: str = Field(
        default="completion", min_length=1, description="prompt_completion: the completion (trained-on) field."
    )
    ni_positive_examples: int = Field(
        default=2, ge=0, description="natural_instructions: positive examples shown in each prompt."
    )
    chat_template: Literal["chatml", "llama2"] | None = Field(
        default=None, description="chat: render conversations with this named template (default: the tokenizer's "
        "own chat template; a base model's tokenizer has none)."
    )
    train_on: Literal["all", "last"] = Field(
        default="all", description="chat: train on every assistant turn, or on the last one only."
    )
    answer_marker: str | None = Field(
        default=None, min_length=1, description="long_data_collections: the cue before the answer (default: the "
        "last '\\nA:' or '\\nAnswer:' of each text)."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_remote_code(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError("trust_remote_code is not supported: llmft never runs a dataset's loading script "
                             "(datasets 5 dropped them); remove it, and use a dataset published as parquet/jsonl "
                             "or download the files and use path:")
        return data

    @field_validator("path")
    @classmethod
    def _path_has_files(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return None
        v = v.expanduser()
        if info.context and info.context.get("check_paths") is False:
            return v  # schema-only validation (e.g. a shipped data recipe whose corpus is not downloaded)
        fmt = info.data.get("format")
        if v.exists() or not _GLOB_CHARS.search(str(v)):
            if not v.exists():
                raise ValueError(f"{str(v)!r} does not exist (relative paths start at {Path.cwd()})")
            files = _files_in_dir(v, fmt) if v.is_dir() and fmt is not None else []
            if v.is_dir() and fmt is not None and not files:
                raise ValueError(f"directory {str(v)!r} holds no {_describe_files(fmt)} files for format {fmt!r}")
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"state.json lists shards that do not exist: {', '.join(missing[:3])}")
        elif not _glob_files(v):
            raise ValueError(f"glob pattern {str(v)!r} matches no files (relative paths start at {Path.cwd()})")
        return v

    @field_validator("data_files")
    @classmethod
    def _local_data_files_exist(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        hub = info.data.get("hub")
        if v is None or hub is None or (info.context and info.context.get("check_paths") is False):
            return v
        root = hub_local_root(hub)
        if root is None:
            return v  # paths inside a Hub repository: datasets resolves them when loading
        for entry in v:
            if "://" not in entry and not _local_matches(root, entry):
                where = f"in {str(root)!r}" if root != Path(".") else f"(relative paths start at {Path.cwd()})"
                raise ValueError(f"data_files entry {entry!r} matches no files {where}")
        return v

    @field_validator("template")
    @classmethod
    def _template_names_columns(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                names = template_fields(v)
            except ValueError as e:
                raise ValueError(
                    f"template {v!r} is not a valid str.format string ({e}); write literal braces as {{{{ and }}}}"
                ) from None
            if not names:
                raise ValueError("template names no column; write column names in braces, e.g. '{title}\\n\\n{body}'")
            if any(n == "" or n.isdigit() for n in names):
                raise ValueError("template fields must be column names like {title}, not {} or {0}")
        return v

    @model_validator(mode="after")
    def _fields_match_format(self) -> SourceSpec:
        fmt, given = self.format, self.explicit()
        if self.path is not None and self.hub is not None:
            raise ValueError("give either path or hub, not both; path reads local files, hub a datasets Hub id")
        if self.path is None and self.hub is None:
            raise ValueError("give path (local files, e.g. path: data/pg19/train) or hub (a datasets Hub id, "
                             "e.g. hub: deepmind/pg19)")
        if self.hub is None:
            stray = [name for name in _HUB_ONLY_FIELDS if name in given]
            if stray:
                raise ValueError(f"{'/'.join(stray)} apply only to hub sources, not to path; remove them")
        else:
            hub = self.hub
            if fmt not in HUB_FORMATS:
                raise ValueError(f"format {fmt!r} reads local files only; hub applies to formats "
                                 f"{', '.join(HUB_FORMATS)}; download the files and use path:")
            if hub in PACKAGED_BUILDERS:
                if not self.data_files:
                    raise ValueError(f"hub {hub!r} is a datasets packaged builder and reads data_files; add them, "
                                     "e.g. data_files: [data/*.jsonl.gz]")
                named = [name for name in ("hub_config", "revision") if getattr(self, name) is not None]
                if named:
                    raise ValueError(f"{'/'.join(named)} apply to Hub datasets, not to the packaged builder {hub!r}; "
                                     "remove them")
            if self.streaming and "[" in self.split:
                raise ValueError(f"split {self.split!r} is a slice, which a stream cannot take; set streaming: false "
                                 "or read the whole split")
            if self.data_files and self.split.split("[")[0] != "train":
                raise ValueError(f"data_files form the 'train' split (datasets puts a list of files there), not "
                                 f"{self.split!r}; remove split")
        if self.template is not None and fmt != "csv":
            raise ValueError(f"template applies only to format csv, not {fmt!r}; remove it")
        if self.template is not None and "text_field" in given:
            raise ValueError("csv takes either text_field or template, not both; remove one")
        if "text_field" in given and fmt not in TEXT_FIELD_FORMATS:
            raise ValueError(f"text_field applies to formats {', '.join(TEXT_FIELD_FORMATS)}, not {fmt!r}; remove it")
        if fmt == "sqlite" and self.query is None:
            raise ValueError("format sqlite needs query, e.g. query: SELECT body AS text FROM posts")
        if self.query is not None:
            if fmt != "sqlite":
                raise ValueError(f"query applies only to format sqlite, not {fmt!r}; remove it")
            if not self.query.lstrip().lower().startswith(("select", "with")):
                raise ValueError(f"query must be a SELECT (or WITH ... SELECT), got {self.query[:40]!r}")
        if (self.subsets or self.exclude_subsets) and fmt not in _SUBSET_FORMATS:
            raise ValueError(f"subsets/exclude_subsets apply to formats redpajama and pile, not {fmt!r}; remove them")
        if fmt in _SUBSET_FORMATS:
            known = REDPAJAMA_SUBSETS if fmt == "redpajama" else PILE_SETS
            for name in [*self.subsets, *self.exclude_subsets]:
                if name not in known:
                    close = difflib.get_close_matches(name, known, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(f"{name!r} is not a {fmt} subset; {hint}known: {', '.join(known)}")
            both = set(self.subsets) & set(self.exclude_subsets)
            if both:
                raise ValueError(f"{sorted(both)} are in both subsets and exclude_subsets; keep them in one")
        if {"prompt_field", "completion_field"} & given and fmt != "prompt_completion":
            raise ValueError(f"prompt_field/completion_field apply only to format prompt_completion, not {fmt!r}")
        if self.prompt_field == self.completion_field:
            raise ValueError("prompt_field and completion_field must differ")
        if "ni_positive_examples" in given and fmt != "natural_instructions":
            raise ValueError(f"ni_positive_examples applies only to format natural_instructions, not {fmt!r}")
        if "answer_marker" in given and fmt != "long_data_collections":
            raise ValueError(f"answer_marker applies only to format long_data_collections, not {fmt!r}")
        if {"chat_template", "train_on"} & given and fmt != "chat":
            raise ValueError(f"chat_template/train_on apply only to format chat, not {fmt!r}")
        return self


def template_fields(template: str) -> list[str]:
    """The column names a ``str.format`` template uses (``{a.b}`` and ``{a[0]}`` count as ``a``)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            names.append(re.split(r"[.\[]", name, maxsplit=1)[0])
    return names


def _describe_files(fmt: str) -> str:
    return "task*.json" if fmt == "natural_instructions" else "/".join(_SUFFIXES[fmt])


def _belongs(path: Path, fmt: str) -> bool:
    name = path.name.lower()
    if fmt == "natural_instructions":
        return name.startswith("task") and name.endswith(".json")
    return name.endswith(_SUFFIXES[fmt])


def _files_in_dir(root: Path, fmt: str) -> list[Path]:
    files = _files_in_tree(root)
    if fmt == "arrow":
        # A `datasets` save_to_disk directory lists its shards in state.json; other *.arrow files beside them
        # (map() caches) are not part of the dataset.
        states = sorted(p for p in files if p.name == "state.json")
        if states:
            shards = []
            for state in states:
                entries = json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])
                shards += [state.parent / e["filename"] for e in entries]
            return shards
    return sorted((p for p in files if _belongs(p, fmt)), key=lambda p: p.relative_to(root).as_posix())


def _glob_files(pattern: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())


def _files_in_tree(root: Path) -> list[Path]:
    """Every non-hidden file under ``root``, sorted by relative path."""
    return sorted((p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts)), key=lambda p: p.relative_to(root).as_posix())


def hub_local_root(hub: str) -> Path | None:
    """Where a hub source's data_files lie on local disk: the current directory for a packaged builder, the
    directory itself when ``hub`` is a local dataset directory, None for a Hub repository."""
    if hub in PACKAGED_BUILDERS:
        return Path(".")
    local = Path(hub).expanduser()
    return local if local.is_dir() else None


def _local_matches(root: Path, entry: str) -> list[Path]:
    """The local files one data_files entry (a path, a directory or a glob, relative to ``root``) names."""
    path = root / Path(entry).expanduser()  # an absolute entry replaces root
    if _GLOB_CHARS.search(entry):
        return _glob_files(path)
    if path.is_dir():
        return _files_in_tree(path)
    return [path] if path.is_file() else []


def list_files(spec: SourceSpec) -> list[Path]:
    """The files a source reads, in reading order.

    Args:
        spec: the source.

    Returns:
        The file itself; the files of the format inside a directory (recursively, sorted by relative path,
        hidden files skipped; for a ``save_to_disk`` directory the shards its state.json lists); or the
        files a glob pattern matches, sorted. For a hub source only its local files, which the build cache
        hashes: the files data_files names for a packaged builder (json, parquet, ...) or a local dataset
        directory (all its files when data_files is not set); [] for a Hub repository, which the cache knows by
        its id, config, split, revision and data_files only.
    """
    if spec.hub is not None:
        root = hub_local_root(spec.hub)
        if root is None:
            return []
        if spec.data_files is None:
            return _files_in_tree(root)
        return [f for entry in spec.data_files if "://" not in entry for f in _local_matches(root, entry)]
    path = spec.path
    if path.is_file():
        return [path]
    if path.is_dir():
        return _files_in_dir(path, spec.format)
    return _glob_files(path)
