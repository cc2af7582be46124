"""Publishing files atomically: a reader (or a resumed run) sees the old file or the whole new one, never half."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def publish_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of directory ``path`` to fill; when the block ends without an error it
    replaces ``path`` (an older ``path`` is moved aside first, then deleted), otherwise it is deleted.

    Raises:
        OSError: the directories cannot be created or renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
