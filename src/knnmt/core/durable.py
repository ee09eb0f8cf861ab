"""Durable, atomic file writes: what every on-disk artefact of knnmt is written with.

A reader (or a process restarted after ``kill -9`` or a power cut) sees a file either as it was or as
it is meant to be, never torn: the new content goes to a temporary name beside the target, is
fsynced, renamed over the target, and the directory is fsynced so that the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush the content of the file ``path`` to stable storage."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(directory: str | Path) -> None:
    """fsync every file and directory under ``directory`` (itself included), e.g. before renaming a
    directory that a library (faiss, bm25s) filled into place."""
    root = Path(directory)
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(path)
    fsync_dir(root)


def temporary_name(path: Path) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under: same directory and extension (so
    ``np.save`` adds no second ``.npy``), e.g. ``index.faiss`` -> ``index.tmp.faiss``."""
    return path.with_name(f"{path.stem}.tmp{path.suffix}")


def replace_durably(tmp: str | Path, final: str | Path) -> None:
    """fsync ``tmp`` (a file, or a directory with everything in it), rename it to ``final`` and fsync
    the directory that holds ``final``."""
    source, target = Path(tmp), Path(final)
    if source.is_dir():
        fsync_tree(source)
    else:
        fsync_file(source)
    os.replace(source, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``
    durably (:func:`replace_durably`), on an exception it is removed and ``path`` is left as it was."""
    final = Path(path)
    tmp = temporary_name(final)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_durably(tmp, final)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: dict[str, Any], *, sort_keys: bool = False) -> None:
    """Write JSON to ``path`` so that readers see the old or the new file, never a torn one."""
    text = json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"
    write_text_atomic(path, text)
