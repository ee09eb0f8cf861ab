"""Exceptions with messages written for people: what went wrong, where, expected vs found."""

from __future__ import annotations


class KnnmtError(Exception):
    """Base class of every error knnmt raises on purpose (the CLI exits 1 on these)."""


class UsageError(KnnmtError):
    """Invalid arguments or configuration (the CLI exits 2 on these)."""


class CorpusError(KnnmtError):
    """A parallel corpus cannot be read as asked: names the file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class DatastoreError(KnnmtError):
    """A datastore directory is missing, incomplete, corrupt or already exists."""


class IncompatibleError(KnnmtError):
    """Two artefacts (model, tokenizer, datastore, index) were not made for each other."""


class UnsupportedModelError(KnnmtError):
    """The model architecture is not in the registry of :mod:`knnmt.hf.registry`."""
