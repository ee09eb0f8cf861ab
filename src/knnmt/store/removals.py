"""Sentences removed from retrieval (deletions): ``<datastore>/memory/tombstones.json``.

A deletion keeps the pair's entries on disk (ids stay stable, shards immutable) and lists its sentence
id here; every reading path (vanilla and Subset search, sentence search, the domain gate, and so
translate, evaluate, tune and explain) skips the entries and sentences listed, through
:attr:`knnmt.store.datastore.Datastore.removed` and the search layer's one filter
(:func:`knnmt.search.retriever.search_excluding`).

File: ``{"sentences": [sorted global sentence ids]}``, replaced atomically and durably; written by the
datastore's one writer (the service, or ``knnmt memory delete``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.durable import fsync_dir, write_json_atomic
from ..core.errors import DatastoreError

MEMORY_DIR = "memory"
TOMBSTONES = "tombstones.json"


def tombstones_file(path: Path) -> Path:
    return Path(path) / MEMORY_DIR / TOMBSTONES


def read_tombstones(path: Path) -> frozenset[int]:
    """The removed sentence ids of the datastore at ``path`` (empty when nothing was removed).

    Raises:
        DatastoreError: the file is not a list of sentence ids (names the file).
    """
    file = tombstones_file(path)
    if not file.is_file():
        return frozenset()
    try:
        sentences = json.loads(file.read_text(encoding="utf-8"))["sentences"]
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sentences):
            raise ValueError("not a list of sentence ids")
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DatastoreError(
            f"{file}: corrupt list of removed sentences ({exc}); restore it from a backup, or delete it to "
            "bring every removed sentence back"
        ) from None
    return frozenset(sentences)


def write_tombstones(path: Path, sentences: Iterable[int]) -> None:
    """Replace the removed sentence ids of the datastore at ``path`` (atomic, durable). The caller holds
    the datastore's write lock."""
    directory = Path(path) / MEMORY_DIR
    if not directory.is_dir():
        directory.mkdir()
        fsync_dir(path)
    write_json_atomic(directory / TOMBSTONES, {"sentences": sorted(sentences)})


@dataclass(frozen=True)
class Removed:
    """What retrieval must skip: sentence ids and their entry ids, both sorted int64 arrays (memory
    grows with what was removed, not with the datastore)."""

    sentences: np.ndarray
    entries: np.ndarray

    @classmethod
    def none(cls) -> Removed:
        empty = np.zeros(0, dtype=np.int64)
        return cls(empty, empty)

    def __bool__(self) -> bool:
        return bool(self.sentences.size)

    @property
    def entry_count(self) -> int:
        return int(self.entries.size)

    def entry_mask(self, ids: np.ndarray) -> np.ndarray:
        """bool, shaped like ``ids``: which entry ids are removed (``-1`` never is)."""
        return _member(ids, self.entries)

    def has_sentence(self, sentence_id: int) -> bool:
        """Whether one sentence id is removed."""
        return bool(self.sentence_mask(np.array([sentence_id]))[0])

    def sentence_mask(self, ids: np.ndarray) -> np.ndarray:
        """bool, shaped like ``ids``: which sentence ids are removed (``-1`` never is)."""
        return _member(ids, self.sentences)


def _member(ids: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if not sorted_set.size:
        return np.zeros(ids.shape, dtype=bool)
    at = np.clip(np.searchsorted(sorted_set, ids), 0, sorted_set.size - 1)
    return (sorted_set[at] == ids) & (ids >= 0)
