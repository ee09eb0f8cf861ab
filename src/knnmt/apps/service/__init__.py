"""``knnmt serve``: an HTTP translation-memory service over :class:`knnmt.KNNMT`.

* :mod:`.app` — :class:`Service` and the FastAPI app (:func:`create_app`);
* :mod:`.batching` — the model thread and dynamic batching;
* live memory (append shards, side index, deletions, compaction, idempotency): :mod:`knnmt.pipeline.memory`,
  shared with `knnmt memory`;
* :mod:`.metrics` — Prometheus text metrics;
* ``static/index.html`` — the web page.

FastAPI and uvicorn are imported only here, so ``import knnmt`` stays light.
"""

from __future__ import annotations

from ...pipeline.memory import LiveMemory, LiveRetriever
from .app import ServeConfig, Service, bind_socket, create_app, read_token, run_server
from .batching import BatchConfig, BatchWorker, GenerationOptions

__all__ = [
    "BatchConfig",
    "BatchWorker",
    "GenerationOptions",
    "LiveMemory",
    "LiveRetriever",
    "ServeConfig",
    "Service",
    "bind_socket",
    "create_app",
    "read_token",
    "run_server",
]
