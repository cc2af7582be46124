"""House rules a reader relies on, checked on the source: every public function that raises says so in a
``Raises:`` section (ruff's DOC501 then checks the section names each exception), and no module is over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "llmft"
MAX_LINES = 600


def _raises_directly(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A ``raise`` with an exception in the function's own body (not a bare re-raise, not in a nested function)."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _public_functions(tree: ast.Module):
    """(qualified name, function, its class or None) for module-level functions and methods of module-level classes
    whose names (and class names) do not start with an underscore; ``__init__`` counts as public."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node, None
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        (item.name == "__init__" or not item.name.startswith("_")):
                    yield f"{node.name}.{item.name}", item, node


def missing_raises(root: Path) -> list[str]:
    """``file:line name`` for each public function under ``root`` that raises but has no ``Raises:`` section (for
    ``__init__``, the class docstring's counts)."""
    missing = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, fn, cls in _public_functions(tree):
            if not _raises_directly(fn):
                continue
            docs = [ast.get_docstring(fn) or ""]
            if cls is not None and fn.name == "__init__":
                docs.append(ast.get_docstring(cls) or "")
            if not any("Raises:" in d for d in docs):
                missing.append(f"{path.relative_to(root.parent)}:{fn.lineno} {name}")
    return missing


def test_public_raising_functions_document_raises():
    assert missing_raises(PACKAGE) == []


def test_the_checker_finds_an_undocumented_raise(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        'def ok(x):\n    """Doc.\n\n    Raises:\n        ValueError: bad x.\n    """\n    raise ValueError(x)\n\n'
        'def bad(x):\n    """Doc."""\n    if x:\n        raise ValueError(x)\n\n'
        'def _private(x):\n    raise ValueError(x)\n\n'
        'def reraise(x):\n    try:\n        return 1 / x\n    except ZeroDivisionError:\n        raise\n\n'
        'class C:\n    """Doc.\n\n    Raises:\n        TypeError: bad.\n    """\n'
        '    def __init__(self):\n        raise TypeError\n\n    def m(self):\n        raise KeyError\n')
    assert missing_raises(pkg) == ["pkg/m.py:9 bad", "pkg/m.py:32 C.m"]


def test_no_module_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
