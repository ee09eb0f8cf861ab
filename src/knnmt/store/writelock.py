"""One writer at a time: the write lock of a datastore directory.

Every process that changes a datastore (``knnmt build`` in all its forms, ``knnmt index`` and
``index --subset``, ``knnmt tune`` saving its choice, a writable ``knnmt serve``) holds
:class:`WriteLock` on it while it writes. The lock is an advisory ``flock`` on
``<datastore>/.knnmt-write.lock``; the file also says who holds it (pid, host, command, since when),
so that a second writer is told whom it is waiting for.

The kernel drops an ``flock`` when its holder exits, however it exits (``kill -9`` included), so a
lock left by a dead process is recovered simply by taking it again: the next writer finds the file
with the dead holder's description but no lock on it, logs that it recovers it, and writes its own.
Readers never lock: they see the manifest before or after an atomic replace.

``flock`` locks belong to an open file, not to a process: two :class:`WriteLock` objects on the same
datastore exclude each other even within one process (a test's in-process server and a build).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from ..core.errors import DatastoreError

logger = logging.getLogger(__name__)

LOCK_FILE = ".knnmt-write.lock"


class DatastoreLocked(DatastoreError):
    """Another writer holds the datastore's write lock; ``holder`` is its description (may be empty)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _read_holder(handle: Any) -> dict[str, Any]:
    handle.seek(0)
    text = handle.read()
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h (knnmt serve ...) since 2026-...`` from a lock file's description."""
    if not holder:
        return "an unknown process"
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host") and holder.get("host") != socket.gethostname():
        parts.append(f"on host {holder['host']}")
    if holder.get("purpose"):
        parts.append(f"({holder['purpose']}: `{holder.get('command', '')}`)")
    elif holder.get("command"):
        parts.append(f"(`{holder['command']}`)")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return " ".join(parts)


class WriteLock:
    """The exclusive write lock of the datastore directory ``path`` (see the module docstring).

    Args:
        path: the datastore directory; created if missing (a new build takes the lock before it
            writes anything else).
        purpose: what the holder does, shown to a writer that has to wait (``"build"``, ``"serve"``...).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Not re-entrant.

    Raises:
        DatastoreLocked: from :meth:`acquire` when another writer holds the lock.
    """

    def __init__(self, path: str | Path, purpose: str) -> None:
        self.path = Path(path)
        self.purpose = purpose
        self._handle: Any = None

    @property
    def file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> WriteLock:
        """Take the lock now or raise :class:`DatastoreLocked` naming the holder (never waits)."""
        if self._handle is not None:
            raise RuntimeError(f"the write lock of {self.path} is already held by this object")
        if self.path.exists() and not self.path.is_dir():
            raise DatastoreError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.file, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(handle)
            handle.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DatastoreError(f"cannot lock {self.file}: {exc.strerror}") from None
            raise DatastoreLocked(
                f"datastore {self.path} is being written by {describe_holder(holder)}; a datastore has one "
                f"writer at a time: wait for it to finish or stop it"
                + (
                    " (a running server adds pairs through its POST /memory)"
                    if holder.get("purpose") == "serve"
                    else ""
                )
                + f". Lock file: {self.file}",
                holder,
            ) from None
        stale = _read_holder(handle)
        if stale:  # its holder died without releasing (the kernel dropped the flock), or this is a copy
            logger.warning(
                "recovering the write lock of %s left by %s, which no longer holds it (it ended without "
                "releasing it, or the datastore was copied)",
                self.path,
                describe_holder(stale),
            )
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "command": _command_line(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(mine) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    def release(self) -> None:
        """Clear the holder's description and drop the lock (harmless when not held)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.flush()
        except OSError:  # the directory may be gone (a failed first build removes it)
            pass
        finally:
            handle.close()  # closing drops the flock

    def __enter__(self) -> WriteLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def holder_of(path: str | Path) -> dict[str, Any] | None:
    """The description of the process holding ``path``'s write lock, or ``None`` when nobody does.

    For a writer that wants to fail early (before a long computation) rather than at its first write.
    """
    file = Path(path) / LOCK_FILE
    if not file.is_file():
        return None
    with open(file, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(handle)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None
