"""Run ``knnmt serve`` as a subprocess on a free loopback port (crash tests, load benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ...core.errors import KnnmtError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_server(
    model: str | Path, datastore: str | Path, extra: Sequence[str], log: Path, timeout: float = 120.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m knnmt.apps.cli serve`` (this interpreter, this copy of knnmt) and wait for
    ``/health``.

    Args:
        extra: further ``serve`` arguments (``--token-file``, ``--read-only``, batching...).
        log: the server's stdout and stderr are appended here.

    Returns:
        the process and its base URL ``http://127.0.0.1:PORT``.
    """
    port = free_port()
    package_root = str(Path(__file__).resolve().parents[3])  # the directory that holds knnmt/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "knnmt.apps.cli", "-q", "serve", "--model", str(model)]
    command += ["--datastore", str(datastore), "--port", str(port), *extra]
    with log.open("ab") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise KnnmtError(f"knnmt serve exited with code {process.returncode}: {tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    process.kill()
    process.wait()
    raise KnnmtError(f"knnmt serve did not answer {url}/health within {timeout:g} s; see {log}")
