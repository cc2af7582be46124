"""Publishing files atomically: a reader (or a resumed run) sees the old file or the whole new one, never half."""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary sibling of ``path`` and rename it over ``path`` (creating the parents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_figure(fig, path: Path, **savefig) -> Path:
    """``fig.savefig`` to a temporary sibling of ``path`` (PNG), then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", **savefig)
    os.replace(tmp, path)
    return path
