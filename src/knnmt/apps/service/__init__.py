"""``knnmt serve``: an HTTP translation-memory service over :class:`knnmt.KNNMT`.

* :mod:`.app` — :class:`Service` and the FastAPI app (:func:`create_app`);
* :mod:`.batching` — the model thread and dynamic batching;
* :mod:`.memory` — live memory: append shards, side index, tombstones, compaction, idempotency;
* :mod:`.metrics` — Prometheus text metrics;
* ``static/index.html`` — the web page.

FastAPI and uvicorn are imported only here, so ``import knnmt`` stays light.
"""

from __future__ import annotations

from .app import ServeConfig, Service, bind_socket, create_app, read_token, run_server
from .batching import BatchConfig, BatchWorker, GenerationOptions
from .memory import LiveMemory, LiveRetriever

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
