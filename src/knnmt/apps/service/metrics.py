"""Service metrics in the Prometheus text exposition format (version 0.0.4), without dependencies."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable

#: Request latency histogram buckets, seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Sentences per generate call, histogram buckets.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out = []
        running = 0
        sep = "," if labels else ""
        for bound, count in zip([*self.buckets, float("inf")], self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        brace = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{brace} {self.sum:.6f}")
        out.append(f"{name}_count{brace} {self.count}")
        return out


class Metrics:
    """Thread-safe counters of the service; :meth:`render` gives the ``/metrics`` text.

    Args:
        gauges: name -> (help, callable) read at render time (datastore size, queue length...).
        window_s: tokens/s is measured over the batches of the last ``window_s`` seconds.
    """

    def __init__(
        self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None, window_s: float = 60.0
    ) -> None:
        self._lock = threading.Lock()
        self.gauges = gauges or {}
        self.window_s = window_s
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_sizes = _Histogram(BATCH_BUCKETS)
        self.sentences = 0
        self.tokens = 0
        self.generate_seconds = 0.0
        self._recent: deque[tuple[float, int, float]] = deque()  # (time, tokens, seconds)
        self.started = time.time()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, sentences: int, tokens: int, seconds: float) -> None:
        now = time.time()
        with self._lock:
            self.batch_sizes.observe(sentences)
            self.sentences += sentences
            self.tokens += tokens
            self.generate_seconds += seconds
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
        """All metrics as Prometheus text."""
        lines: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("knnmt_requests_total", "counter", "HTTP requests by method, route and status code.")
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'knnmt_requests_total{{method="{method}",route="{route}",code="{status}"}} {n}')
            head("knnmt_request_duration_seconds", "histogram", "HTTP request latency by route.")
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("knnmt_request_duration_seconds", f'route="{route}"')
            head("knnmt_batch_sentences", "histogram", "Sentences per generate call (dynamic batching).")
            lines += self.batch_sizes.lines("knnmt_batch_sentences")
            head("knnmt_translated_sentences_total", "counter", "Sentences translated.")
            lines.append(f"knnmt_translated_sentences_total {self.sentences}")
            head("knnmt_generated_tokens_total", "counter", "Target tokens generated.")
            lines.append(f"knnmt_generated_tokens_total {self.tokens}")
            head("knnmt_generate_seconds_total", "counter", "Seconds spent in generate.")
            lines.append(f"knnmt_generate_seconds_total {self.generate_seconds:.6f}")
        head(
            "knnmt_tokens_per_second",
            "gauge",
            f"Generated tokens per generate-second, last {self.window_s:g}s.",
        )
        lines.append(f"knnmt_tokens_per_second {self.tokens_per_second():.3f}")
        head("knnmt_uptime_seconds", "gauge", "Seconds since the service started.")
        lines.append(f"knnmt_uptime_seconds {time.time() - self.started:.3f}")
        for name, (text, read) in sorted(self.gauges.items()):
            head(name, "gauge", text)
            lines.append(f"{name} {float(read()):g}")
        return "\n".join(lines) + "\n"
