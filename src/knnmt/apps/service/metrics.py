"""Service metrics in the Prometheus text exposition format, by ``prometheus_client`` (one registry per
service: no global state; values printed exactly, e.g. 2,123,457 entries as ``2.123457e+06``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Request latency histogram buckets, seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Sentences per generate call, histogram buckets.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Thread-safe metrics of the service; :meth:`render` gives the ``/metrics`` text.

    Args:
        gauges: name -> (help, callable) read at render time (datastore size, queue length...).
        window_s: tokens/s is measured over the batches of the last ``window_s`` seconds.
    """

    def __init__(
        self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None, window_s: float = 60.0
    ) -> None:
        self._lock = threading.Lock()
        self.window_s = window_s
        self._recent: deque[tuple[float, int, float]] = deque()  # (time, tokens, seconds)
        self.started = time.time()
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "knnmt_requests", "HTTP requests by method, route and status code.",
            ["method", "route", "code"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "knnmt_request_duration_seconds", "HTTP request latency by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_sizes = Histogram(
            "knnmt_batch_sentences", "Sentences per generate call (dynamic batching).",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.sentences = Counter("knnmt_translated_sentences", "Sentences translated.", registry=r)
        self.tokens = Counter("knnmt_generated_tokens", "Target tokens generated.", registry=r)
        self.generate_seconds = Counter("knnmt_generate_seconds", "Seconds spent in generate.", registry=r)
        throughput = f"Generated tokens per generate-second, last {window_s:g}s."
        Gauge("knnmt_tokens_per_second", throughput, registry=r).set_function(self.tokens_per_second)
        Gauge("knnmt_uptime_seconds", "Seconds since the service started.", registry=r).set_function(
            lambda: time.time() - self.started
        )
        for name, (text, read) in sorted((gauges or {}).items()):
            Gauge(name, text, registry=r).set_function(read)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, sentences: int, tokens: int, seconds: float) -> None:
        now = time.time()
        self.batch_sizes.observe(sentences)
        self.sentences.inc(sentences)
        self.tokens.inc(tokens)
        self.generate_seconds.inc(seconds)
        with self._lock:
            self._recent.append((now, tokens, seconds))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Target tokens per second of generate time over the recent window (0 when idle)."""
        with self._lock:
            tokens = sum(t for _, t, _ in self._recent)
            seconds = sum(s for _, _, s in self._recent)
        return tokens / seconds if seconds > 0 else 0.0

    def render(self) -> str:
        """All metrics as Prometheus text (exposition format 0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")
