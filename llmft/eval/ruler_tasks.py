"""RULER's tasks, generated offline with the model's tokenizer (NVIDIA/RULER, ``scripts/data/synthetic/``): the
templates, the 13 task configurations, the haystacks (noise, local books, distractor needles), the word lists
(wonderwords, as RULER), the SQuAD / HotpotQA readers, and the fitting of each prompt to a length. Scoring, runs and
reports are in llmft/eval/ruler.py, which also lists where llmft differs from RULER.
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmft.config.eval import RULER_TASKS
from llmft.config.loading import shipped_path
from llmft.config.sources import SourceSpec
from llmft.data.sources import read_source

log = logging.getLogger(__name__)

DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # RULER's needle depths (%)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DOCUMENT_PROMPT = "Document {i}:\n{document}"
ASSETS = shipped_path("llmft/assets")
QA_FILES = {"squad": ("squad.json", "dev-v2.0.json"), "hotpotqa": ("hotpotqa.json", "hotpot_dev_distractor_v1.json")}

# RULER's templates (scripts/data/synthetic/constants.py): (template, answer prefix, tokens to generate)
TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "variable_tracking": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                          "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
                          "above.",
                          " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                          "variables are assigned the value {query}, they are: ", 30),
    "common_words_extraction": ("Below is a numbered list of words. In these words, some appear more often than "
                                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                                "the 10 most common words in the above list?",
                                " Answer: The top 10 words that appear most often in the list are:", 120),
    "freq_words_extraction": ("Read the following coded text and track the frequency of each coded word. Find the "
                              "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
                              "explanation. Please ignore the dots '....'. What are the three most frequently "
                              "appeared words in the above coded text?",
                              " Answer: According to the coded text above, the three most frequently appeared words "
                              "are:", 50),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
           "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
           " Answer:", 32),
}


@dataclass(frozen=True)
class Task:
    """One RULER task: its generator kind and arguments (RULER's scripts/synthetic.yaml)."""

    kind: str
    args: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "part" if self.kind == "qa" else "all"


def _niah(haystack, k, v, *, nk=1, nv=1, nq=1) -> Task:
    return Task("niah", {"type_haystack": haystack, "type_needle_k": k, "type_needle_v": v, "num_needle_k": nk,
                         "num_needle_v": nv, "num_needle_q": nq})


TASKS: dict[str, Task] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", nk=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", nv=4),
    "niah_multiquery": _niah("essay", "words", "numbers", nq=4),
    "vt": Task("variable_tracking", {"num_chains": 1, "num_hops": 4}),
    "cwe": Task("common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": Task("freq_words_extraction", {"alpha": 2.0}),
    "qa_1": Task("qa", {"dataset": "squad"}),
    "qa_2": Task("qa", {"dataset": "hotpotqa"}),
}
assert tuple(TASKS) == RULER_TASKS  # the recipe schema validates names against the same list


@dataclass(frozen=True)
class Sample:
    """One RULER prompt: ``input`` (ending before the answer prefix), the prefix, the references, its tokens."""

    task: str
    length: int
    index: int
    input: str
    answer_prefix: str
    outputs: list[str]
    tokens: int  # prompt tokens (input + answer prefix, special tokens included)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


class TooShort(ValueError):
    """The length cannot hold even the smallest prompt of a task."""


# ------------------------------------------------------------------------------------------------ word sources


def _wonderwords(name: str) -> list[str]:
    from wonderwords import random_word

    return random_word._get_words_from_text_file(name)  # the lists RULER reads (same private helper)


class Words:
    """The vocabularies of the tasks: wonderwords' nouns, adjectives, verbs (as RULER), loaded once."""

    def __init__(self):
        nouns, adjs, verbs = (_wonderwords(f) for f in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"))
        self.pairs_adjs, self.pairs_nouns = adjs, nouns  # niah keys: "adjective-noun", 6.2M of them
        self.cwe = sorted(set(nouns + adjs + verbs))

    def key(self, rng: random.Random) -> str:
        return f"{rng.choice(self.pairs_adjs)}-{rng.choice(self.pairs_nouns)}"


_WORDS: Words | None = None


def haystack_words() -> Words:
    """The word lists RULER draws needle keys from (loaded once; wonderwords' nouns and adjectives)."""
    global _WORDS
    if _WORDS is None:
        _WORDS = Words()
    return _WORDS


def read_haystack(path: str | Path | None = None) -> list[str]:
    """The essay haystack as words: every ``.txt`` / ``.txt.gz`` / ``.txt.zst`` of a directory (sorted) or one file,
    read by the data pipeline's text reader (a file that is not UTF-8 is skipped with a warning), whitespace
    collapsed; default the books shipped in llmft/assets.

    Raises:
        FileNotFoundError: the path does not exist or holds no text.
    """
    if path is None:
        files = sorted(ASSETS.glob("*.txt.gz"))
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"RULER haystack {p}: no such file or directory (give .txt books)")
        files = [p] if p.is_file() else sorted([*p.glob("*.txt"), *p.glob("*.txt.gz"), *p.glob("*.txt.zst")])
    texts = [d.text for f in files for d in read_source(SourceSpec(format="text", path=f), on_error="skip")]
    words = re.sub(r"\s+", " ", " ".join(texts)).strip().split(" ")
    if len(words) < 100:
        raise FileNotFoundError(f"RULER haystack {path}: {len(words)} words; give books (.txt or .txt.gz)")
    return words


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _random(kind: str, rng: random.Random) -> str:
    return {"numbers": _number, "words": lambda r: haystack_words().key(r), "uuids": _uuid}[kind](rng)


# ------------------------------------------------------------------------------------------------ generators
# each returns (input with the answer prefix, references) for a haystack size n; RULER's generate_input_output


def _insert_at_depths(words: list[str], n: int, items: list[str], rng: random.Random) -> str:
    """``n`` haystack words (repeated when short) as sentences, ``items`` inserted at RULER's random depths."""
    reps = -(-n // len(words))
    sents = _sentences(" ".join((words * reps)[:n]))
    cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(items))) + [len(sents)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(items):
            parts.append(items[i - 1])
    return " ".join(parts)


def gen_niah(a: dict, n: int, rng: random.Random, words: list[str]) -> tuple[str, list[str]]:
    """One needle-in-a-haystack prompt of the task with arguments ``a`` (``TASKS[name].args``) and haystack size
    ``n`` (noise lines, essay words or needle lines, by ``a["type_haystack"]``); returns (prompt, answers)."""
    nk = max(a["num_needle_k"], a["num_needle_q"])
    tv = a["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(nk):
        keys.append(_random(a["type_needle_k"], rng))
        vals = [_random(tv, rng) for _ in range(a["num_needle_v"])]
        values.append(vals)
        needles += [NEEDLE.format(type_needle_v=tv, key=keys[-1], value=v) for v in vals]
    rng.shuffle(needles)
    if a["type_haystack"] == "essay":
        context = _insert_at_depths(words, n, needles, rng)
    else:
        if a["type_haystack"] == "noise":
            sents = [NOISE] * n
        else:  # distractor needles with their own random keys and values
            sents = [NEEDLE.format(type_needle_v=tv, key=_random(a["type_needle_k"], rng), value=_random(tv, rng))
                     for _ in range(n)]
        for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            sents.insert(index, needle)
        context = "\n".join(sents)
    asked = rng.sample(range(nk), a["num_needle_q"])
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, _ = TEMPLATES["niah"]
    template += prefix
    if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER's singular wording
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
        tv = tv[:-1]
    return template.format(type_needle_v=tv, context=context, query=query), answers


def _vt_chain(rng: random.Random, hops: int, icl: bool) -> tuple[list[str], list[str]]:
    k = 3 if icl else 5
    names: list[str] = []
    while len(names) < hops + 1:  # distinct variable names
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in names:
            names.append(name)
    value = "12345" if icl else str(rng.randint(10000, 99998))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def _gen_vt_plain(a: dict, n: int, rng: random.Random, icl: bool) -> tuple[str, list[str]]:
    hops = min(10, a["num_hops"]) if icl else a["num_hops"]
    names, chain = _vt_chain(rng, hops, icl)
    value = chain[0].split("=")[-1].strip()
    sents = [NOISE] * n
    for j, pos in enumerate(sorted(rng.sample(range(n), len(chain)))):
        sents.insert(pos + j, chain[j])
    context = "\n".join(sents).replace(". \n", ".\n")
    template, prefix, _ = TEMPLATES["variable_tracking"]
    return (template + prefix).format(context=context, query=value, num_v=hops + 1), names


def _randomize_icl(example: str, hops: int, rng: random.Random) -> str:
    for item in example.strip().split()[-hops - 1 :]:
        example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return example.replace("12345", str(rng.randint(10000, 99998)))


def _cwe_example(n: int, common: int, uncommon: int, num_cw: int, rng: random.Random) -> tuple[str, list[str]]:
    words = haystack_words()
    if n <= len(words.cwe):
        pool = rng.sample(words.cwe, n)
    else:  # RULER: english_words.json; here distinct adjective-noun pairs
        pool_set: dict[str, None] = {}
        while len(pool_set) < n:
            pool_set[words.key(rng)] = None
        pool = list(pool_set)
    top, rest = pool[:num_cw], pool[num_cw:]
    listed = top * common + rest * uncommon
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top


def _gen_cwe(a: dict, n: int, rng: random.Random, length: int) -> tuple[str, list[str]]:
    template, prefix, _ = TEMPLATES["common_words_extraction"]
    template += prefix
    num_cw = a["num_cw"]
    if length < 4096:  # RULER's short-context settings
        ex, ans = _cwe_example(20, 3, 1, num_cw, rng)
        context, answer = _cwe_example(n, 6, 1, num_cw, rng)
    else:
        ex, ans = _cwe_example(40, 10, 3, num_cw, rng)
        context, answer = _cwe_example(n, a["freq_cw"], a["freq_ucw"], num_cw, rng)
    shot = template.format(context=ex, query="") + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans))
    return shot + "\n" + template.format(context=context, query=""), answer


def _zeta(alpha: float) -> float:
    from scipy.special import zeta

    return float(zeta(alpha))


def _gen_fwe(a: dict, n: int, rng: random.Random, vocab_size: int) -> tuple[str, list[str]]:
    vocab: list[str] = []
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise
    alpha = a["alpha"]
    counts = (n * np.arange(1, len(vocab) + 1, dtype=float) ** -alpha / _zeta(alpha)).astype(int)
    text = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(text)
    template, prefix, _ = TEMPLATES["freq_words_extraction"]
    return (template + prefix).format(context=" ".join(text), query=""), vocab[1:4]


@dataclass
class QaSet:
    """Questions (query, answers, indices of their documents, other documents of the same article) and the
    document pool of one QA dataset, read as RULER reads it."""

    questions: list[dict]
    docs: list[str]


def read_squad(path: Path) -> QaSet:
    """SQuAD v2.0 (``dev-v2.0.json``): answerable questions, their paragraph, the article's other paragraphs."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qs = []
    for d in data["data"]:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa.get("is_impossible", False):
                    qs.append({"query": qa["question"], "outputs": [x["text"] for x in qa["answers"]],
                               "context": [index[p["context"]]],
                               "more": [i for i in article if i != index[p["context"]]]})
    return QaSet(qs, docs)


def read_hotpotqa(path: Path) -> QaSet:
    """HotpotQA dev distractor (``hotpot_dev_distractor_v1.json``): each question with its 10 paragraphs."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qs = [{"query": d["question"], "outputs": [d["answer"]],
           "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]], "more": []} for d in data]
    return QaSet(qs, docs)


def find_qa(qa_dir: str | Path | None, dataset: str) -> Path | None:
    """The dataset's file in ``qa_dir`` (RULER's name or the original), or None."""
    if qa_dir is None:
        return None
    for name in QA_FILES[dataset]:
        if (Path(qa_dir) / name).is_file():
            return Path(qa_dir) / name
    return None


def _gen_qa(qa: QaSet, index: int, n: int, rng: random.Random) -> tuple[str, list[str]]:
    q = qa.questions[index % len(qa.questions)]
    own, more = q["context"], q["more"]
    if n < len(qa.docs):
        if n - len(own) > len(more):
            others = [i for i in range(len(qa.docs)) if i not in set(own + more)]
            chosen = own + more + rng.sample(others, max(0, n - len(own) - len(more)))
        else:
            chosen = own + rng.sample(more, max(0, n - len(own)))
        docs = [qa.docs[i] for i in chosen]
    else:
        docs = (qa.docs * -(-n // len(qa.docs)))[:n]
    rng.shuffle(docs)
    context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(docs))
    template, prefix, _ = TEMPLATES["qa"]
    return (template + prefix).format(context=context, query=q["query"]), q["outputs"]


# ------------------------------------------------------------------------------------------------ fitting


def _seed(seed: int, *parts) -> int:
    return zlib.crc32(repr((seed, *parts)).encode())


def _largest(fits: Callable[[int], bool], least: int, start: int) -> int | None:
    """The largest n >= ``least`` with ``fits(n)`` (fits is monotone: True up to some n); None if ``least`` does not
    fit. Doubling from ``start`` brackets it, bisection finds it: about 2 log2(n) calls."""
    if not fits(least):
        return None
    lo, hi = least, max(start, least + 1)
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class Generator:
    """Builds the samples of RULER tasks for one tokenizer (the essay haystack and QA sets loaded once)."""

    def __init__(self, tokenizer, haystack: str | Path | None = None, qa_dir: str | Path | None = None):
        self.tokenizer = tokenizer
        self.haystack_path, self.qa_dir = haystack, qa_dir
        self._essay: list[str] | None = None
        self._qa: dict[str, QaSet] = {}
        self._icl: dict[tuple, str] = {}

    def count(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    @property
    def essay(self) -> list[str]:
        if self._essay is None:
            self._essay = read_haystack(self.haystack_path)
        return self._essay

    def qa(self, dataset: str) -> QaSet:
        """The questions and documents of ``dataset`` (squad or hotpotqa), read once.

        Raises:
            FileNotFoundError: the dataset's file is not in ``qa_dir``.
        """
        if dataset not in self._qa:
            path = find_qa(self.qa_dir, dataset)
            if path is None:
                where = f"in {self.qa_dir}" if self.qa_dir else "(no QA directory given)"
                raise FileNotFoundError(f"the {dataset} file ({' or '.join(QA_FILES[dataset])}) is not there {where}. "
                                        "Fix: download it (see docs/eval.md) and pass its directory (--ruler-qa-data)")
            self._qa[dataset] = (read_squad if dataset == "squad" else read_hotpotqa)(path)
        return self._qa[dataset]

    def _maker(self, name: str, length: int, budget: int, index: int, seed: int) -> Callable[[int], tuple]:
        """``make(n)``: the (text, references) of sample ``index`` with a haystack of size ``n``; each call starts
        from the sample's own seed, so a smaller ``n`` redraws the same needles."""
        task = TASKS[name]
        a = task.args
        if task.kind == "niah":
            words = self.essay if a["type_haystack"] == "essay" else []
            return lambda n: gen_niah(a, n, random.Random(_seed(seed, name, length, index)), words)
        if task.kind == "variable_tracking":
            example = self._vt_icl(a, 500 if budget >= 2000 else None, seed, name, length)

            def make_vt(n: int):
                rng = random.Random(_seed(seed, name, length, index))
                text, answer = _gen_vt_plain(a, n, rng, icl=False)
                return _randomize_icl(example, min(10, a["num_hops"]), rng) + "\n" + text, answer

            return make_vt
        if task.kind == "common_words_extraction":
            return lambda n: _gen_cwe(a, n, random.Random(_seed(seed, name, length, index)), length)
        if task.kind == "freq_words_extraction":
            vocab = max(budget // 50, 5)
            return lambda n: _gen_fwe(a, n, random.Random(_seed(seed, name, length, index)), vocab)
        qa = self.qa(a["dataset"])
        return lambda n: _gen_qa(qa, index, n, random.Random(_seed(seed, name, length, index)))

    def _vt_icl(self, a: dict, budget: int | None, seed: int, name: str, length: int) -> str:
        """RULER's in-context example of vt, answered: a short chain (3-letter names, value 12345) in noise, the
        largest that fits ``budget`` tokens (None: the smallest, 5 noise lines); made once per (task, length).

        Raises:
            TooShort: not even the smallest example fits.
        """
        key = (name, length, seed, budget)
        if key not in self._icl:
            def make(n: int):
                return _gen_vt_plain(a, n, random.Random(_seed(seed, name, length, "icl")), icl=True)

            least = min(10, a["num_hops"]) + 1
            n = least if budget is None else _largest(lambda n: self.count(make(n)[0]) <= budget, least, 8)
            if n is None:
                raise TooShort(f"{name}: {length} tokens cannot hold the in-context example")
            text, names = make(n)
            self._icl[key] = text + " " + " ".join(names) + "\n"
        return self._icl[key]

    def samples(self, name: str, length: int, count: int, seed: int = 0,
                max_new_tokens: int | None = None) -> list[Sample]:
        """``count`` samples of task ``name`` whose prompt plus the generation budget fits ``length`` tokens.

        Raises:
            KeyError: an unknown task.
            TooShort: even the smallest haystack does not fit.
            FileNotFoundError: a QA task without its data file.
        """
        task = TASKS[name]
        gen = max_new_tokens or TEMPLATES[task.kind][2]
        budget = length - gen
        prefix_of = TEMPLATES[task.kind][1]
        # the smallest haystack that makes sense: room for the needles / chain; a frequency order that holds
        least = {"niah": 5, "variable_tracking": 5, "common_words_extraction": 11, "freq_words_extraction": 80,
                 "qa": 1}[task.kind]
        if task.kind == "niah" and task.args["type_haystack"] == "essay":
            least = 50
        if budget < 1:
            raise TooShort(f"{name}: {length} tokens leave no room for the prompt after {gen} generated tokens")

        def fits_for(index: int):
            make = self._maker(name, length, budget, index, seed)
            return make, lambda n: self.count(make(n)[0]) <= budget

        _, fits0 = fits_for(0)
        size = _largest(fits0, least, max(least, budget // 32))
        if size is None:
            raise TooShort(f"{name}: {length} tokens cannot hold the smallest prompt ({gen} tokens are kept for the "
                           "answer)")
        out = []
        for i in range(count):
            make, fits = fits_for(i)
            n = size
            while not fits(n):  # a longer draw (longer keys, other documents): shrink as RULER does
                n -= max(1, size // 50)
                if n < least:
                    raise TooShort(f"{name}: sample {i} does not fit {length} tokens")
            text, refs = make(n)
            cut = text.rfind(prefix_of[:10])  # RULER locates the answer prefix by its first 10 characters
            out.append(Sample(name, length, i, text[:cut], text[cut:], [str(r) for r in refs], self.count(text)))
        return out
