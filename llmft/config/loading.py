"""Loading any YAML file the project reads (training recipes, data mixes, HELM suites) into its schema.

Overrides (``key=value``, value parsed as YAML) are applied before validation. Every error is reported at once,
naming the file, the YAML path (and line), the value received, what was expected and how to fix it::

    recipes/llama2_32k.yaml:14: model.rope.factor: got -8; expected a number greater than 1. Fix: set it
    to target_len / original_len, e.g. 8.0 for 4096 -> 32768.

A field carries its "how to fix it" sentence as ``json_schema_extra=hint(...)``.

Files shipped with llmft (``recipes/...``, ``data_recipes/...``, ``llmft/assets/...``) are named by their path in the
repository. Relative paths are read from the current directory; one that does not exist there but names a shipped
file is read from the installed package (:func:`shipped_path`), so the shipped recipes and the bundled model and
books work from any directory and after a wheel install, while a clone keeps reading its own files.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the installed llmft package (in a clone: REPO/llmft)
# repository path prefix -> where that directory is inside the installed package (recipes/ and data_recipes/ are
# linked into the package, so a wheel carries them)
SHIPPED = {"llmft/": PACKAGE_DIR, "recipes/": PACKAGE_DIR / "recipes", "data_recipes/": PACKAGE_DIR / "data_recipes"}


def shipped_path(name: str | Path) -> Path | None:
    """The installed copy of a file or directory shipped with llmft, named by its repository path (e.g.
    ``recipes/cpu/tiny_base.yaml``, ``llmft/assets/tiny-llama``); None if ``name`` names none."""
    text = Path(name).as_posix()
    for prefix, root in SHIPPED.items():
        if text.startswith(prefix) and (path := root / text[len(prefix):]).exists():
            return path
    return None


def resolve_shipped(name: str) -> str:
    """``name`` as given if it exists from the current directory (or names nothing shipped), else its installed
    copy: what a recipe's relative path means."""
    if Path(name).expanduser().exists():
        return name
    found = shipped_path(name)
    return name if found is None else str(found)


def _resolve_shipped_values(node: Any) -> Any:
    """Every string value of a parsed YAML tree resolved with :func:`resolve_shipped`, in place."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, str) and value.startswith(tuple(SHIPPED)):
            node[key] = resolve_shipped(value)
        elif isinstance(value, (dict, list)):
            _resolve_shipped_values(value)
    return node


class RecipeError(Exception):
    """A recipe (or an override) is invalid. ``messages`` holds one line per problem, ready to print."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))

    def __reduce__(self):  # pickled with its lines (raised in a worker process, re-raised in the parent)
        return type(self), (self.messages,)


def hint(text: str) -> dict:
    """Field metadata carrying the "how to fix it" sentence shown with an error on that field."""
    return {"hint": text}


class Strict(BaseModel):
    """The base of every schema: unknown keys are errors, and assigning a field validates the value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def explicit(self) -> set[str]:
        """The fields given a value other than their default: the settings that change something. The checks that
        refuse a setting where it has no effect use these, so that a recipe written out with every default filled
        in (a run's ``recipe.yaml``) reads back as the recipe it came from."""
        fields = type(self).model_fields
        return {n for n in self.model_fields_set
                if getattr(self, n) != fields[n].get_default(call_default_factory=True)}

# ------------------------------------------------------------------------------------------ loading


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place.

    Raises:
        RecipeError: an override is not of the form key=value, or walks through a non-mapping.
    """
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r}: expected key=value, e.g. train.lr=1e-5")
            continue
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                errors.append(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
                break
        else:
            last = parts[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                errors.append(f"override {item!r}: {'.'.join(parts[:-1])} is not a mapping")
    if errors:
        raise RecipeError(errors)
    return raw


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each YAML path (tuple of keys/indices) to its 1-based line number in ``text``."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,)) if not isinstance(v, yaml.ScalarNode) else None
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _field_for(loc: tuple, root: type[BaseModel]) -> Any:
    """The pydantic FieldInfo at ``loc`` in the ``root`` schema, or None."""
    model: Any = root
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        ann = info.annotation
        model = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None and hasattr(ann, "__args__"):
            inner = [a for x in ann.__args__ for a in getattr(x, "__args__", ())]
            model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return info


def _describe(err: dict, source: str, lines: dict[tuple, int], overridden: set[tuple],
              root: type[BaseModel]) -> str:
    """One human line for one pydantic error."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tuple["))))
    path = ".".join(str(p) for p in loc) or "(top level)"
    where = source
    probe = loc
    while probe and probe not in lines:
        probe = probe[:-1]
    if loc in overridden or any(loc[: len(o)] == o for o in overridden):
        where = f"{source} (command-line override)"
    elif probe in lines:
        where = f"{source}:{lines[probe]}"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _field_for(loc[:-1], root) if len(loc) > 1 else None
        parent_model = root
        if parent is not None:
            ann = parent.annotation
            parent_model = next(
                (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                None,
            )
        known = list(parent_model.model_fields) if parent_model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(known)}"
        return f"{where}: {path}: unknown key. Fix: remove it; {fix}"
    if kind == "missing":
        info = _field_for(loc, root)
        desc = f" ({info.description})" if info is not None and info.description else ""
        return f"{where}: {path}: required key is missing{desc}. Fix: add {path}: <value>"
    got = err.get("input")
    got_s = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    msg = err["msg"].removeprefix("Value error, ")
    info = _field_for(loc, root)
    hint = (
        (info.json_schema_extra or {}).get("hint")
        if info is not None and isinstance(info.json_schema_extra, dict)
        else None
    )
    if kind.startswith(("greater", "less")):
        msg = "a number " + msg.removeprefix("Input should be ")
    elif msg.startswith("Input should be"):
        msg = msg.removeprefix("Input should be ")
    if kind == "value_error" or kind == "assertion_error":
        line = f"{where}: {path}: {msg}"
    else:
        line = f"{where}: {path}: got {got_s}; expected {msg}"
    if hint:
        line += f". Fix: {hint}"
    return line


def load_validated(path: str | Path, schema: type[BaseModel], overrides: list[str] | None = None,
                   context: dict | None = None, checks=None) -> Any:
    """Read a YAML file, apply ``key=value`` overrides, validate it against ``schema``.

    Args:
        path: the YAML file.
        schema: the pydantic model of the whole file.
        overrides: ``key=value`` strings applied before validation.
        context: pydantic validation context (e.g. ``{"check_paths": False}``).
        checks: optional function of the validated object returning (yaml path, problem) pairs.

    Returns:
        The validated object.

    Raises:
        RecipeError: the file is missing or not YAML, or any field is invalid; holds every problem at once.
    """
    source = str(path)
    path = Path(resolve_shipped(source))
    if not path.is_file():
        raise RecipeError([f"{source}: file not found"])
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise RecipeError(
            [f"{where}: not valid YAML: {getattr(e, 'problem', e)}. Fix: check indentation and quoting"]
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{source}: expected a mapping of sections, got {type(raw).__name__}"])
    overrides = overrides or []
    apply_overrides(raw, overrides)
    _resolve_shipped_values(raw)
    overridden = {tuple(o.partition("=")[0].strip().split(".")) for o in overrides}
    overridden = {tuple(int(p) if p.isdigit() else p for p in o) for o in overridden}
    try:
        obj = schema.model_validate(raw, context=context)
    except ValidationError as e:
        lines = _yaml_lines(text)
        raise RecipeError([_describe(err, source, lines, overridden, schema) for err in e.errors()]) from None
    problems = checks(obj) if checks else []
    if problems:
        lines = _yaml_lines(text)
        raise RecipeError([_describe({"loc": loc, "type": "value_error", "msg": msg}, source, lines, overridden, schema)
                           for loc, msg in problems])
    return obj
