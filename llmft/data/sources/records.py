"""The record formats: one function per format turns one record (a JSON line, a table row or a hub row) into a
:class:`Document`, or reports why it cannot; the JSON-record file readers (jsonl, RedPajama, The Pile, OIG, P3,
prompt/completion, Natural Instructions)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft.config.sources import REDPAJAMA_SUBSETS, SourceSpec
from llmft.data.sources.applications import mdqa_prompt, split_at_answer, summary_prompt
from llmft.data.sources.base import Document, SourceReport
from llmft.data.sources.files import _decode_text, _json_lines, _json_type, _read_bytes, _string_field
from llmft.data.sources.text import strip_gutenberg


@dataclass
class _Rows:
    """What a record -> Document function needs besides the record."""

    spec: SourceSpec
    on_error: str
    report: SourceReport
    subset: str | None = None  # redpajama: the subset the rows' location implies, for records naming none
    no_subset: str = "the file's name and directories name no subset"  # redpajama: why `subset` is None


_RecordFn = Callable[[dict, str, _Rows], "Document | None"]


def _convert(records: Iterator[tuple[str, dict]], convert: _RecordFn, rows: _Rows) -> Iterator[Document]:
    for where, record in records:
        doc = convert(record, where, rows)
        if doc is not None:
            yield doc


def _jsonl_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, rows.spec.text_field, where, rows.on_error, rows.report)
    return None if text is None else Document(text=text, where=where)


def _table_record(record: dict, where: str, rows: _Rows) -> Document | None:
    column = rows.spec.text_field
    text = record.get(column)
    if isinstance(text, str) and text.strip():
        return Document(text=text, where=where)
    if text is None or isinstance(text, str):
        reason = f"{'null' if text is None else 'empty'} text in column {column!r}"
    else:  # a file's column type is checked up front; a hub row's value is not
        reason = f"column {column!r} holds {_json_type(text)}, expected a string"
    rows.report.bad(where, reason, rows.on_error)
    return None


def _merge_meta(meta: dict, original: Any, key: str) -> dict:
    """``meta`` plus the record's own metadata: merged when an object (or a JSON string of one), else kept
    under ``key`` (the RedPajama HF loader stores ``meta`` as a JSON string)."""
    if isinstance(original, str):
        try:
            original = json.loads(original)
        except json.JSONDecodeError:
            pass
    if isinstance(original, dict):
        return {**original, **meta}
    if original is not None:
        return {key: original, **meta}
    return meta


def _redpajama_subset_from_path(path: Path) -> str | None:
    """The subset a RedPajama file belongs to by its place: 1T keeps each subset in a directory of that name,
    the 1T-Sample in files named after it (arxiv_*.jsonl, book_*.jsonl, c4-train.*.jsonl, cc_*.jsonl, ...)."""
    for parent in path.parents:
        if parent.name in REDPAJAMA_SUBSETS:
            return parent.name
    prefixes = {"arxiv": "arxiv", "book": "book", "c4": "c4", "cc_": "common_crawl", "common_crawl": "common_crawl",
                "github": "github", "stackexchange": "stackexchange", "wiki": "wikipedia"}
    for prefix, subset in prefixes.items():
        if path.name.startswith(prefix):
            return subset
    return None


def _keep_subset(name: str, spec: SourceSpec) -> bool:
    return (not spec.subsets or name in spec.subsets) and name not in spec.exclude_subsets


def _redpajama_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    subset = record.get("red_pajama_subset")
    if subset is None:  # absent, or null in a hub row whose dataset has the column for other rows
        subset = rows.subset
    if not isinstance(subset, str):
        rows.report.bad(where, f"no red_pajama_subset field, and {rows.no_subset}", rows.on_error)
        return None
    if not _keep_subset(subset, rows.spec):
        rows.report.filtered += 1
        return None
    return Document(text=text, where=where, meta=_merge_meta({"red_pajama_subset": subset}, record.get("meta"), "meta"))


def _pile_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    meta = record.get("meta")
    name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        rows.report.bad(where, "no string meta.pile_set_name", rows.on_error)
        return None
    if not _keep_subset(name, rows.spec):
        rows.report.filtered += 1
        return None
    return Document(text=text, where=where, meta=dict(meta))


def _oig_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    # The dialogue stays one document with its "<human>:"/"<bot>:" turns, as OIG publishes it.
    return Document(text=text, where=where, meta=_merge_meta({}, record.get("metadata"), "metadata"))


def _pair_record(record: dict, where: str, rows: _Rows, prompt_field: str, completion_field: str) -> Document | None:
    prompt = _string_field(record, prompt_field, where, rows.on_error, rows.report, allow_empty=True)
    if prompt is None:
        return None
    completion = _string_field(record, completion_field, where, rows.on_error, rows.report)
    return None if completion is None else Document(text=completion, where=where, prompt=prompt)


def _p3_record(record: dict, where: str, rows: _Rows) -> Document | None:
    return _pair_record(record, where, rows, "inputs_pretokenized", "targets_pretokenized")


def _prompt_completion_record(record: dict, where: str, rows: _Rows) -> Document | None:
    return _pair_record(record, where, rows, rows.spec.prompt_field, rows.spec.completion_field)


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _chat_record(record: dict, where: str, rows: _Rows) -> Document | None:
    """A conversation: OpenAI ``{"messages": [{"role", "content"}]}`` or ShareGPT ``{"conversations": [{"from",
    "value"}]}`` (human/gpt/system), with at least one assistant turn."""
    if isinstance(record.get("messages"), list):
        turns, role_key, text_key, roles = record["messages"], "role", "content", {r: r for r in
                                                                                   ("system", "user", "assistant")}
    elif isinstance(record.get("conversations"), list):
        turns, role_key, text_key, roles = record["conversations"], "from", "value", _SHAREGPT_ROLES
    else:
        rows.report.bad(where, 'expected a "messages" list (OpenAI) or a "conversations" list (ShareGPT)',
                        rows.on_error)
        return None
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        content = turn.get(text_key) if isinstance(turn, dict) else None
        if role not in roles or not isinstance(content, str):
            rows.report.bad(where, f"turn {i}: expected {{{role_key!r}: one of {', '.join(sorted(roles))}, "
                            f"{text_key!r}: a string}}, got {json.dumps(turn)[:80]}", rows.on_error)
            return None
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        rows.report.bad(where, "no assistant turn: nothing to train on", rows.on_error)
        return None
    text = "\n".join(m["content"] for m in messages)
    return Document(text=text, where=where, messages=messages,
                    chat={"template": rows.spec.chat_template, "train_on": rows.spec.train_on})


def _ldc_record(record: dict, where: str, rows: _Rows) -> Document | None:
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    parts = split_at_answer(text, rows.spec.answer_marker)
    if parts is None:
        cue = repr(rows.spec.answer_marker) if rows.spec.answer_marker else "'\\nA:' or '\\nAnswer:'"
        rows.report.bad(where, f"no answer after a {cue} cue: nothing to train on", rows.on_error)
        return None
    return Document(text=parts[1], where=where, prompt=parts[0])


def _booksum_record(record: dict, where: str, rows: _Rows) -> Document | None:
    chapter_key = "chapter" if "chapter" in record else "text"
    summary_key = "summary_text" if "summary_text" in record else "summary"
    chapter = _string_field(record, chapter_key, where, rows.on_error, rows.report)
    if chapter is None:
        return None
    summary = _string_field(record, summary_key, where, rows.on_error, rows.report)
    return None if summary is None else Document(text=" " + summary.strip(), where=where,
                                                 prompt=summary_prompt(chapter))


def _lost_in_the_middle_record(record: dict, where: str, rows: _Rows) -> Document | None:
    question, answers, ctxs = record.get("question"), record.get("answers"), record.get("ctxs")
    if not isinstance(question, str) or not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) for a in answers) or not isinstance(ctxs, list) or \
            not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in ctxs):
        rows.report.bad(where, 'expected {"question": str, "answers": [str, ...], "ctxs": [{"title", "text"}, ...]}',
                        rows.on_error)
        return None
    return Document(text=" " + answers[0], where=where, prompt=mdqa_prompt(question, ctxs),
                    meta={"gold": next((i for i, c in enumerate(ctxs) if c.get("isgold")), -1)})


def _read_json_records(path: Path, spec: SourceSpec, on_error: str, report: SourceReport) -> Iterator[Document]:
    """The JSON-lines record formats (jsonl, redpajama, oig, p3, pile, prompt_completion): one record a line."""
    rows = _Rows(spec, on_error, report, subset=_redpajama_subset_from_path(path))
    yield from _convert(_json_lines(path, on_error, report), _RECORDS[spec.format], rows)


def _ni_text(value: Any) -> str | None:
    """An NI string field; outputs are lists in instances (the first is the reference) and strings in examples."""
    if isinstance(value, list) and value:
        value = value[0]
    return value.strip() if isinstance(value, str) and value.strip() else None


def _read_natural_instructions(path: Path, spec: SourceSpec, on_error: str,
                               report: SourceReport) -> Iterator[Document]:
    data = _read_bytes(path, on_error, report)
    text = None if data is None else _decode_text(data, str(path), on_error, report)
    if text is None:
        return
    try:
        task = json.loads(text)
    except json.JSONDecodeError as e:
        report.bad(str(path), f"malformed JSON ({e.msg}: line {e.lineno})", on_error)
        return
    if not isinstance(task, dict) or not isinstance(task.get("Instances"), list):
        report.bad(str(path), "not a Natural Instructions task: no 'Instances' list", on_error)
        return
    definition = task.get("Definition")
    # Older task files hold the definition as a string, newer ones as a list of strings.
    if isinstance(definition, list) and all(isinstance(d, str) for d in definition):
        definition = "\n".join(d.strip() for d in definition)
    if not isinstance(definition, str) or not definition.strip():
        report.bad(str(path), "no 'Definition' string (or list of strings)", on_error)
        return
    shots = []
    for i, example in enumerate(task.get("Positive Examples") or []):
        if len(shots) == spec.ni_positive_examples:
            break
        ex_in = _ni_text(example.get("input")) if isinstance(example, dict) else None
        ex_out = _ni_text(example.get("output")) if isinstance(example, dict) else None
        if ex_in is None or ex_out is None:
            report.bad(f"{path}#Positive Examples[{i}]", "needs a string input and output", on_error)
            continue
        shots.append(f"Input: {ex_in}\nOutput: {ex_out}\n\n")
    head = f"Definition: {definition.strip()}\n\n" + "".join(shots)
    name = path.name.removesuffix(".json")
    for i, instance in enumerate(task["Instances"]):
        where = f"{path}#instances[{i}]"
        inst_in = _ni_text(instance.get("input")) if isinstance(instance, dict) else None
        if inst_in is None:
            report.bad(where, "no string 'input'", on_error)
            continue
        answer = _ni_text(instance.get("output"))
        if answer is None:
            report.bad(where, "no 'output' (a non-empty list of strings)", on_error)
            continue
        # The full NI release gives every instance an id ("task085-..."); trimmed copies may not.
        # ni_head / ni_query let the few-shot transform put many instances of a task after one header
        meta = {"task": name, "id": instance.get("id", f"{name}-{i}"), "ni_head": head,
                "ni_query": f"Input: {inst_in}\nOutput: "}
        yield Document(text=answer, where=where, meta=meta, prompt=f"{head}Input: {inst_in}\nOutput: ")


_PG19_META = ["short_book_title", "publication_date", "url"]


def _pg19_record(record: dict, where: str, rows: _Rows) -> Document | None:
    """A book in the Hugging Face layout ``{short_book_title, publication_date, url, text}``."""
    text = _string_field(record, "text", where, rows.on_error, rows.report)
    if text is None:
        return None
    # The HF rows come without the Gutenberg header and footer; a copy that kept them is stripped like a .txt.
    text = strip_gutenberg(text)
    if not text:
        rows.report.bad(where, "no text between the Project Gutenberg header and footer", rows.on_error)
        return None
    meta = {k: record[k] for k in _PG19_META if record.get(k) is not None}
    book_id = re.search(r"(\d+)/?$", str(meta.get("url", "")))
    if book_id:
        meta["book_id"] = book_id.group(1)
    return Document(text=text, where=where, meta=meta)


_RECORDS: dict[str, _RecordFn] = {
    "jsonl": _jsonl_record,
    "parquet": _table_record,
    "arrow": _table_record,
    "redpajama": _redpajama_record,
    "oig": _oig_record,
    "p3": _p3_record,
    "pile": _pile_record,
    "pg19": _pg19_record,
    "prompt_completion": _prompt_completion_record,
    "chat": _chat_record,
    "long_data_collections": _ldc_record,
    "booksum": _booksum_record,
    "lost_in_the_middle": _lost_in_the_middle_record,
}
