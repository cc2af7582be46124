"""Remove evaluation text from training data by word n-gram overlap.

RedPajama's Book subset contains the PG-19 test and validation books, and instruction mixes overlap with
benchmark items (Together decontaminated LLaMA-2-7B-32K's instruction data against HELM core scenarios with
n-gram overlap). Training on the text a model is later scored on inflates the score, so every training
document is checked against an index of the evaluation texts before it is used.

Normalization (the same for evaluation and training text)::

    "“Hello,” she said—quietly."  --lower-->  drop Unicode punctuation (category P*)  --split on whitespace-->
    ["hello", "she", "saidquietly"]

An n-gram is n consecutive normalized words (default n = 13; Together used 10 for HELM). A training
document *overlaps* an evaluation item when one of its n-grams is one of the item's n-grams.

Index. Each distinct word of the evaluation text gets a fixed pseudo-random 64-bit value (blake2b of its
UTF-8 bytes); an n-gram's key is the polynomial hash of its word values modulo 2**64, computed for all
positions at once with numpy. Keys live in one sorted ``uint64`` array with the index of the first target
that produced each (12 bytes per distinct n-gram, about 1 GB for 10^8 n-grams), and lookup is
``np.searchsorted``. A training word outside the evaluation vocabulary cannot be part of a match, so its
windows are skipped without hashing, and the vocabulary does not grow with the training data.

Targets (:meth:`Decontaminator.add_target_path`, one per ``decontaminate.targets`` entry):

- a HELM data directory (``data/helm``: one folder per scenario ``path`` of ``llmft/eval/helm/core.yaml``, or a copy
  of a scenario's hub dataset) or one scenario's folder (``data/helm/mmlu``): read through the same scenario loaders
  as ``llmft eval --helm`` (:func:`llmft.eval.helm.load_subsets`), so every field a prompt or a reference is built
  from is indexed (MMLU/TruthfulQA/CivilComments CSV, MS MARCO TSV, CNN/DM ``article``, XSum ``document``,
  HellaSwag ``ctx`` and endings, NaturalQuestions ``question_text`` and the long-answer passage, RAFT fields,
  ...). Indexed: the instances each scenario scores (its eval split); the train split only supplies in-context
  examples, which the prompt shows anyway. Targets are named ``helm/<scenario>/<subset>#<i>``.
- PG-19-style books (``.txt``), HELM instance files (``.jsonl``/``.json`` with ``input.text``/``references``) or a
  directory of them (:meth:`Decontaminator.add_files`).

A target that yields no n-gram is an error (:class:`DecontamTargetError`), never a silent no-op; what each target
gave (files, instances, n-grams, scenarios read or skipped, documents removed per training source) is its
:class:`TargetReport`. A text shorter than n words cannot be matched and is counted as ``short_texts``.

Two ways to clean a document (:meth:`Decontaminator.clean`):

- ``document``: drop the whole document if it has any hit.
- ``span``: cut out the characters of the overlapping words (plus ``margin`` words each side), keeping every
  other character of the original text, whitespace included::

      words:  w0 w1 [w2 ... w14] w15          hit at word 2 (n = 13), margin 0
      text:   "w0 w1 w2 ... w14 w15"  ->  "w0 w1  w15"
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmft.data.sources import strip_gutenberg

# Every Unicode punctuation code point (categories Pc Pd Pe Pf Pi Po Ps) mapped to None for str.translate.
# Built once at import (~0.2 s); a dict lookup per character is the fastest pure-Python way we measured
# (a regex class sub was 3x slower on a book with curly quotes and em dashes).
_PUNCT = dict.fromkeys(c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P"))
_PUNCT[0xFEFF] = None  # a byte-order mark glued to the first word would hide that word's n-grams

# \s and str.split() agree on what whitespace is (both use Py_UNICODE_ISSPACE), so the tokens below are
# exactly the pieces normalize_words splits, in the same order.
_TOKEN = re.compile(r"\S+")

# Multiplier of the polynomial n-gram hash: odd (invertible mod 2**64), the 64-bit golden-ratio constant.
_BASE = np.uint64(0x9E3779B97F4A7C15)

DEFAULT_TEXT_FIELDS = ("text", "input", "question", "passage", "context", "references", "output")
MAX_EXAMPLES = 20


def normalize_words(text: str) -> list[str]:
    """Lowercase, drop every Unicode punctuation character, split on whitespace.

    Args:
        text: any text.

    Returns:
        The normalized words; a token made only of punctuation disappears.
    """
    return text.lower().translate(_PUNCT).split()


def _words_with_offsets(text: str) -> tuple[list[str], list[int], list[int]]:
    """Normalized words with the character range ``[start, end)`` of the whitespace token each came from.

    Equal to :func:`normalize_words` word for word: lowercasing and deleting punctuation never create or
    remove whitespace, so normalizing token by token gives the same words as normalizing the whole text.
    """
    words, starts, ends = [], [], []
    for m in _TOKEN.finditer(text):
        word = m.group().lower().translate(_PUNCT)
        if word:  # a punctuation-only token ("—", "...") is not a word, as in normalize_words
            words.append(word)
            starts.append(m.start())
            ends.append(m.end())
    return words, starts, ends


@dataclass
class Hit:
    """One n-gram of a training document that also occurs in an evaluation item."""

    ngram: str  # the overlapping n-gram, normalized words joined by spaces
    target: str  # the first evaluation item indexed with it, e.g. "pg19_test/12345.txt" or "helm/boolq.jsonl:17"
    start_word: int  # index of its first word among the document's normalized words


class DecontamTargetError(ValueError):
    """A ``decontaminate.targets`` entry that yields no n-gram (wrong path, or a layout not understood)."""


@dataclass
class TargetReport:
    """What one ``decontaminate.targets`` entry indexed, and the training documents it removed."""

    path: str
    kind: str  # "helm" (scenario loaders) or "files" (.txt/.jsonl/.json)
    files: int = 0  # files under the target that were read
    instances: int = 0  # evaluation items indexed: books, records, HELM instances
    texts: int = 0  # distinct strings indexed (an instance's input and each reference are indexed apart)
    short_texts: int = 0  # strings with fewer than n words: no n-gram, cannot be matched
    ngrams: int = 0  # distinct n-grams this target added
    scenarios: dict[str, int] = field(default_factory=dict)  # helm: instances indexed per scenario
    skipped: list[str] = field(default_factory=list)  # helm: scenarios present whose data could not be read
    missing_subsets: dict[str, list[str]] = field(default_factory=dict)  # helm: subsets without files, per scenario
    hits_by_source: dict[str, int] = field(default_factory=dict)  # documents (or spans) removed per source

    def describe(self) -> str:
        what = (f"{len(self.scenarios)} HELM scenarios ({', '.join(f'{k} {v}' for k, v in self.scenarios.items())})"
                if self.kind == "helm" else f"{self.files} files")
        missing = "; ".join(f"{k}: {len(v)} subsets without files" for k, v in self.missing_subsets.items())
        return (f"{self.path}: {what}; {self.instances} items, {self.texts} texts ({self.short_texts} shorter than "
                f"n words), {self.ngrams} n-grams" + (f"; skipped: {' | '.join(self.skipped)}" if self.skipped else "")
                + (f"; {missing}" if missing else ""))


@dataclass
class DecontamReport:
    """Counts over all documents passed to :meth:`Decontaminator.clean`, with the first few hits.

    ``words_removed`` counts normalized words: all words of a dropped document, or the words of the cut
    spans. ``hits_by_source`` counts documents removed (mode ``document``) or spans removed (mode ``span``)
    per training source. ``documents_removed`` also counts span-mode documents left with only whitespace.
    """

    documents_checked: int = 0
    documents_removed: int = 0
    spans_removed: int = 0
    words_removed: int = 0
    hits_by_source: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # first 20: {"source", "where", "target", "ngram"}
    targets: list[TargetReport] = field(default_factory=list)  # per decontaminate.targets entry

    def to_dict(self) -> dict:
        return asdict(self)

    def merge(self, other: dict) -> None:
        """Add the counts of another report over other documents (``to_dict()`` without ``targets``, plus
        ``target_hits``: {target position: {source: hits}}), e.g. one file's report from the data engine."""
        for key in ("documents_checked", "documents_removed", "spans_removed", "words_removed"):
            setattr(self, key, getattr(self, key) + other[key])
        for source, k in other["hits_by_source"].items():
            self.hits_by_source[source] = self.hits_by_source.get(source, 0) + k
        self.examples += other["examples"][: max(0, MAX_EXAMPLES - len(self.examples))]
        for position, hits in other.get("target_hits", {}).items():
            entry = self.targets[int(position)]
            for source, k in hits.items():
                entry.hits_by_source[source] = entry.hits_by_source.get(source, 0) + k

    def _count(self, source: str, entry: TargetReport | None, k: int = 1) -> None:
        self.hits_by_source[source] = self.hits_by_source.get(source, 0) + k
        if entry is not None:
            entry.hits_by_source[source] = entry.hits_by_source.get(source, 0) + k

    def _example(self, source: str, where: str, hit: Hit) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"source": source, "where": where, "target": hit.target, "ngram": hit.ngram})


class Decontaminator:
    """Index of every word n-gram of the evaluation texts; finds and removes overlaps in training documents.

    Args:
        n: words per n-gram (13 by default; 10 matches Together's HELM decontamination).
        margin: words also cut on each side of an overlap in ``span`` mode.

    Raises:
        ValueError: ``n < 1`` or ``margin < 0``.
    """

    def __init__(self, n: int = 13, margin: int = 0):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if margin < 0:
            raise ValueError(f"margin must be 0 or more, got {margin}")
        self.n, self.margin = n, margin
        self.targets: list[str] = []  # target index -> name
        self._vocab: dict[str, int] = {}  # evaluation word -> its 64-bit value
        self._keys = np.zeros(0, dtype=np.uint64)  # sorted distinct n-gram hashes
        self._first = np.zeros(0, dtype=np.int32)  # target index that first produced each key
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (hashes, target ids) not yet merged
        self.entries: list[TargetReport] = []  # one per add_target_path call
        self._entry_of: list[int] = []  # target index -> index into entries (-1: added directly)

    # ------------------------------------------------------------------------------------------ indexing

    def add_target(self, name: str, text: str) -> None:
        """Index one evaluation item (a book, a HELM instance) under ``name``."""
        self._new_target(name)
        self._index(len(self.targets) - 1, text)

    def _new_target(self, name: str) -> None:
        self.targets.append(name)
        self._entry_of.append(len(self.entries) - 1 if self._current is not None else -1)

    _current: TargetReport | None = None  # the add_target_path entry being indexed

    def _index(self, target_id: int, text: str) -> None:
        words = normalize_words(text)
        if self._current is not None:
            self._current.texts += 1
            self._current.short_texts += len(words) < self.n
        if len(words) < self.n:
            return
        vocab = self._vocab
        for w in set(words).difference(vocab):
            digest = hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            vocab[w] = int.from_bytes(digest, "little") or 1  # 0 marks "not in the evaluation text" in lookups
        values = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
        hashes = self._ngram_hashes(values)
        self._pending.append((hashes, np.full(len(hashes), target_id, dtype=np.int32)))

    def _ngram_hashes(self, values: np.ndarray) -> np.ndarray:
        """sum_k values[i + k] * BASE**(n - 1 - k) mod 2**64 for every start i (uint64 wraps silently)."""
        count = len(values) - self.n + 1
        h = values[:count].copy()
        for k in range(1, self.n):
            h *= _BASE
            h += values[k : k + count]
        return h

    def _merge(self) -> None:
        """Fold pending n-grams into the sorted key array, keeping the earliest target of a repeated key."""
        if not self._pending:
            return
        hashes = np.concatenate([self._keys] + [h for h, _ in self._pending])
        ids = np.concatenate([self._first] + [t for _, t in self._pending])
        # np.unique sorts stably when asked for indices, so return_index gives each key's first occurrence.
        self._keys, first = np.unique(hashes, return_index=True)
        self._first = ids[first]
        self._pending = []

    def add_files(self, paths: list[Path], text_fields: tuple[str, ...] = DEFAULT_TEXT_FIELDS) -> int:
        """Index evaluation files.

        - ``.txt``: one target per file. A BOM and a Project Gutenberg header/footer are stripped.
        - ``.jsonl``: one target per non-blank line, named ``path:line`` (1-based). Every string found under
          a key in ``text_fields``, at any depth through lists and dicts, is indexed; so HELM instances
          (``"input": {"text": ...}``, ``"references": [{"output": {"text": ...}}]``) work as they are.
          Each string is indexed on its own, so no n-gram spans two fields.
        - ``.json``: a list of such records, or an object with the list under ``instances``/``Instances``/
          ``data``; targets are named ``path[i]`` (0-based).
        - a directory: every ``.txt``/``.jsonl``/``.json`` file below it, in sorted order, named
          ``<directory name>/<relative path>`` (e.g. ``pg19_test/12345.txt``).

        Any of these may be gzipped (``.txt.gz``). Files given directly are named by the path as given.
        Invalid UTF-8 is replaced (U+FFFD) rather than rejected: indexing a bit too much is the safe side.

        Args:
            paths: files and directories.
            text_fields: keys whose string values (recursively) are evaluation text in JSON records.

        Returns:
            The number of targets added (records without any text are not counted).

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: an unsupported file type, malformed JSON, or a ``.json`` file of another shape.
        """
        added = 0
        for path in map(Path, paths):
            if not path.exists():
                raise FileNotFoundError(f"evaluation data not found: {path}")
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
                for f in files:
                    added += self._add_file(f, f"{path.name}/{f.relative_to(path).as_posix()}", text_fields)
            else:
                if _kind(path) is None:
                    raise ValueError(f"{path}: unsupported evaluation file type; expected .txt, .jsonl or .json "
                                     "(optionally .gz), or a directory of them")
                added += self._add_file(path, path.as_posix(), text_fields)
        return added

    def _add_file(self, path: Path, name: str, text_fields: tuple[str, ...]) -> int:
        kind = _kind(path)
        if self._current is not None:
            self._current.files += 1
        opener = gzip.open if path.suffix.lower() == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            content = f.read()
        if kind == "txt":
            self.add_target(name, strip_gutenberg(content))
            return 1
        fields = frozenset(text_fields)
        if kind == "jsonl":
            records = []
            for lineno, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    records.append((f"{name}:{lineno}", _loads(line, f"{path}:{lineno}")))
        else:
            data = _loads(content, str(path))
            if isinstance(data, dict):
                data = next((data[k] for k in ("instances", "Instances", "data") if isinstance(data.get(k), list)),
                            None)
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of records, or an object with the list under "
                                 "'instances', 'Instances' or 'data'")
            records = [(f"{name}[{i}]", r) for i, r in enumerate(data)]
        added = 0
        for target, record in records:
            texts: list[str] = []
            _collect(record, fields, isinstance(record, str), texts)
            if texts:
                self._new_target(target)
                for text in texts:
                    self._index(len(self.targets) - 1, text)
                added += 1
        return added

    def add_target_path(self, path: str | Path) -> TargetReport:
        """Index one ``decontaminate.targets`` entry: a HELM data directory or scenario folder (read with the
        scenario loaders of ``llmft eval --helm``), or books / instance files (:meth:`add_files`).

        Returns:
            The entry's :class:`TargetReport` (also in ``entries``); documents it removes are counted there.

        Raises:
            FileNotFoundError: the path does not exist.
            DecontamTargetError: the entry yields no n-gram (the message lists the layouts understood).
            ValueError: a malformed file (as :meth:`add_files`).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"decontaminate.targets: {path} does not exist")
        found = _helm_layout(path)
        entry = TargetReport(str(path), "helm" if found else "files")
        self.entries.append(entry)
        self._current, pending = entry, len(self._pending)
        try:
            if found:
                self._add_helm(*found)
            else:
                entry.instances = self.add_files([path])
        finally:
            self._current = None
        new = [h for h, _ in self._pending[pending:]]
        entry.ngrams = len(np.unique(np.concatenate(new))) if new else 0
        if entry.ngrams == 0:
            skipped = f" Scenarios present but unreadable: {' | '.join(entry.skipped)}." if entry.skipped else ""
            raise DecontamTargetError(
                f"decontaminate.targets: {path} yields no {self.n}-word n-gram ({entry.files} files read, "
                f"{entry.instances} items, {entry.short_texts} texts shorter than {self.n} words).{skipped} "
                "Understood: a HELM data directory with one folder per scenario path of llmft/eval/helm/core.yaml "
                "(mmlu, boolq, narrative_qa, natural_qa, quac, hellaswag, openbookqa, truthful_qa, msmarco, "
                "summarization_cnndm, summarization_xsum, imdb, raft, civil_comments) or one such folder, each in its "
                "public layout (docs/eval.md, HELM core scenarios); PG-19-style .txt books; HELM instance "
                ".jsonl/.json files; or a directory of those (.gz allowed). Fix: point it at one of these, or remove "
                "the entry")
        return entry

    def _add_helm(self, data_dir: Path, specs: list) -> None:
        """Index the eval-split instances of each scenario in ``specs`` found under ``data_dir``."""
        from llmft.eval.helm import TRAIN, HelmDataError, load_subsets

        entry = self._current
        seen: set[str] = set()  # scenarios share files (NQ, MS MARCO) and CivilComments' subsets share rows
        files: set[Path] = set()
        for spec in specs:
            try:
                subsets, skipped = load_subsets(spec, data_dir)
            except (HelmDataError, OSError, ValueError, KeyError) as e:
                entry.skipped.append(f"{spec.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            loaded = {sub.name for sub in subsets}
            if missing := [name for name in spec.subsets or [] if name not in loaded]:
                entry.missing_subsets[spec.name] = missing
            folder = data_dir / spec.path
            files.update(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else None
            count = 0
            for subset in subsets:
                for i, inst in enumerate(subset.instances):
                    if inst.split == TRAIN:
                        continue  # in-context examples only
                    texts = [t for t in (inst.input, *(r.text for r in inst.references)) if t not in seen]
                    count += 1
                    if not texts:
                        continue
                    seen.update(texts)
                    self._new_target(f"helm/{spec.name}/{subset.name}#{i}")
                    for text in texts:
                        self._index(len(self.targets) - 1, text)
            entry.scenarios[spec.name] = count
            entry.instances += count
        entry.files = len(files)

    @property
    def num_ngrams(self) -> int:
        """Distinct n-grams indexed (by hash)."""
        self._merge()
        return len(self._keys)

    # ------------------------------------------------------------------------------------------ lookup

    def _hit_positions(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(start word of every overlapping n-gram, ascending; index into ``self._keys`` of each)."""
        none = np.zeros(0, dtype=np.int64)
        self._merge()
        if len(words) < self.n or len(self._keys) == 0:
            return none, none
        get = self._vocab.get
        values = np.fromiter((get(w, 0) for w in words), dtype=np.uint64, count=len(words))
        # A window can only match if all of its words occur in the evaluation text.
        unknown_before = np.concatenate([[0], np.cumsum(values == 0)])
        valid = unknown_before[self.n :] == unknown_before[: len(words) - self.n + 1]
        starts = np.flatnonzero(valid)
        if len(starts) == 0:
            return none, none
        hashes = self._ngram_hashes(values)[starts]
        slot = np.searchsorted(self._keys, hashes)
        slot[slot == len(self._keys)] = 0
        found = self._keys[slot] == hashes
        return starts[found], slot[found]

    def _entry_for_slot(self, slot: int) -> TargetReport | None:
        """The add_target_path entry whose item first produced the n-gram at ``slot`` of the sorted keys."""
        k = self._entry_of[self._first[slot]] if self._entry_of else -1
        return self.entries[k] if k >= 0 else None

    def _hits(self, words: list[str], starts: np.ndarray, slots: np.ndarray) -> list[Hit]:
        return [Hit(" ".join(words[s : s + self.n]), self.targets[self._first[k]], int(s))
                for s, k in zip(starts.tolist(), slots.tolist())]

    def find(self, text: str) -> list[Hit]:
        """Every n-gram of ``text`` that occurs in the evaluation index.

        Args:
            text: a training document.

        Returns:
            One hit per overlapping position (so a 20-word quote gives 20 - n + 1 hits), sorted by start_word.
        """
        words = normalize_words(text)
        return self._hits(words, *self._hit_positions(words))

    def clean(self, text: str, mode: Literal["document", "span"], source: str, where: str,
              report: DecontamReport) -> str | None:
        """Check one training document, update ``report``, and return what may be trained on.

        Args:
            text: the document.
            mode: ``document`` drops a document with any hit; ``span`` cuts the overlapping words out of the
                original text (each overlap widened by ``margin`` words, overlapping or touching ones
                merged), leaving every other character as it was.
            source: training source name, the key of ``report.hits_by_source``.
            where: location for the report's examples, e.g. ``"books.jsonl:812"``.
            report: counts to update.

        Returns:
            The text to keep, or None when the document is dropped or only whitespace remains.

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in ("document", "span"):
            raise ValueError(f"mode must be 'document' or 'span', got {mode!r}")
        report.documents_checked += 1
        words = normalize_words(text)
        starts, slots = self._hit_positions(words)
        if len(starts) == 0:
            return text
        if mode == "document":
            report.documents_removed += 1
            report.words_removed += len(words)
            report._count(source, self._entry_for_slot(int(slots[0])))
            report._example(source, where, self._hits(words, starts[:1], slots[:1])[0])
            return None

        # Character offsets are only needed once there is something to cut; they index the same words.
        offset_words, char_start, char_end = _words_with_offsets(text)
        assert offset_words == words, "normalize_words and _words_with_offsets disagree"
        # Word ranges [first, last], widened by the margin, merged when they overlap or touch.
        spans: list[list[int]] = []  # [first word, last word, index of the span's first hit]
        for i, start in enumerate(starts.tolist()):
            first = max(start - self.margin, 0)
            last = min(start + self.n - 1 + self.margin, len(words) - 1)
            if spans and first <= spans[-1][1] + 1:
                spans[-1][1] = max(spans[-1][1], last)
            else:
                spans.append([first, last, i])
        pieces, cursor = [], 0
        for first, last, i in spans:
            pieces.append(text[cursor : char_start[first]])
            cursor = char_end[last]
            report.words_removed += last - first + 1
            report._count(source, self._entry_for_slot(int(slots[i])))
            if len(report.examples) < MAX_EXAMPLES:
                report._example(source, where, self._hits(words, starts[i : i + 1], slots[i : i + 1])[0])
        pieces.append(text[cursor:])
        report.spans_removed += len(spans)
        kept = "".join(pieces)
        if kept.strip():
            return kept
        report.documents_removed += 1
        return None


def _kind(path: Path) -> Literal["txt", "jsonl", "json"] | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    return {".txt": "txt", ".jsonl": "jsonl", ".json": "json"}.get(ext)


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _collect(obj: Any, fields: frozenset[str], wanted: bool, out: list[str]) -> None:
    """Append to ``out`` every string in ``obj`` that lies under a key in ``fields`` (``wanted``: already under one)."""
    if isinstance(obj, str):
        if wanted:
            out.append(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _collect(value, fields, wanted or key in fields, out)
    elif isinstance(obj, list):
        for value in obj:
            _collect(value, fields, wanted, out)


def _helm_layout(path: Path) -> tuple[Path, list] | None:
    """(data directory, scenario specs) when ``path`` is a HELM data directory or one scenario's folder, else None.

    A HELM data directory holds a folder named by a scenario's ``path`` (or a copy of its hub dataset); a scenario
    folder is one whose name is a scenario's ``path`` and whose parent is then the data directory.
    """
    if not path.is_dir():
        return None
    from llmft.eval.helm import load_helm_suite

    scenarios = load_helm_suite().scenarios
    inside = [s for s in scenarios if (path / s.path).is_dir()
              or (s.hf_dataset is not None and (path / s.hf_dataset.name).is_dir())]
    if inside:
        return path, inside
    named = [s for s in scenarios if s.path == path.name]
    return (path.parent, named) if named else None
