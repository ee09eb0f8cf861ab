"""Dynamic batching: one worker thread owns the model; requests that arrive together share a
``generate`` call.

Request threads put jobs on a queue and wait on a :class:`concurrent.futures.Future`. The worker
takes the first job, then keeps collecting for at most ``max_wait_ms`` (or until ``max_batch``
sentences), groups the translation jobs by their generation options and runs one
:meth:`KNNMT.translate` per group. When a group's call fails, each of its jobs is run again on its
own, so a request that breaks generation fails alone and the others get their translations. Other
work that needs the model (adding memory pairs) is queued as a plain callable and runs on the same
thread, in arrival order relative to the batches.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from ...core.config import KNNConfig, require
from ...core.errors import KnnmtError
from ...pipeline.translator import KNNMT, Translation

logger = logging.getLogger(__name__)


class Overloaded(KnnmtError):
    """The request queue is full."""


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How requests are batched.

    ``max_batch`` sentences per ``generate`` call; the worker waits at most ``max_wait_ms`` after the
    first queued request for others to join it. ``max_batch=1, max_wait_ms=0`` turns batching off.
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    #: Jobs waiting at most; beyond, requests are refused with 503.
    max_queue: int = 1024
    #: torch intra-op (OpenMP) threads of the model thread; 0 = as many as the thread creating the worker
    #: has (OpenMP settings are per thread: a new thread would otherwise start with all cores).
    threads: int = 0

    def __post_init__(self) -> None:
        require(1 <= self.max_batch <= 1024, f"max_batch must be in [1, 1024], got {self.max_batch}")
        require(0 <= self.max_wait_ms <= 1000, f"max_wait_ms must be in [0, 1000], got {self.max_wait_ms}")
        require(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        require(self.threads >= 0, f"threads must be >= 0 (0 = the creating thread's), got {self.threads}")


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Per-request options; jobs with equal options can share a ``generate`` call."""

    knn: KNNConfig | None
    num_beams: int = 1
    max_new_tokens: int = 128


@dataclasses.dataclass
class _TranslateJob:
    sources: list[str]
    options: GenerationOptions
    explain: bool
    future: Future[list[Translation]]


@dataclasses.dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future[Any]


_STOP = object()


class BatchWorker:
    """The thread that owns ``translator``'s model.

    Args:
        translator: the :class:`KNNMT` to run.
        config: batching settings.
        on_batch: called after each ``generate`` with ``(sentences, target_tokens, seconds)``.
    """

    def __init__(
        self,
        translator: KNNMT,
        config: BatchConfig | None = None,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.translator = translator
        self.config = config or BatchConfig()
        self.on_batch = on_batch
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.config.max_queue)
        self._pending: list[Any] = []
        self._special = set(translator.tokenizer.all_special_ids)
        self._threads = self.config.threads or torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="knnmt-model", daemon=True)
        self._thread.start()

    # ---- submitting (any thread) ------------------------------------------------------------
    def _put(self, job: Any) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                f"the server is busy ({self.config.max_queue} requests waiting); retry shortly"
            ) from None

    def translate(
        self, sources: list[str], options: GenerationOptions, explain: bool = False
    ) -> Future[list[Translation]]:
        """Queue a translation; the future gives one :class:`Translation` per source, in order."""
        future: Future[list[Translation]] = Future()
        self._put(_TranslateJob(list(sources), options, explain, future))
        return future

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn()`` on the model thread (e.g. teacher forcing for new memory pairs)."""
        future: Future[Any] = Future()
        self._put(_CallJob(fn, future))
        return future

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued work and stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ---- the worker ---------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._pending:
            return self._pending.pop(0)
        return (
            self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        )

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            job = self._next(None)
            if job is _STOP:
                return
            if isinstance(job, _CallJob):
                self._run_call(job)
                continue
            batch = [job]
            sentences = len(job.sources)
            deadline = time.perf_counter() + self.config.max_wait_ms / 1000
            while sentences < self.config.max_batch:
                try:
                    nxt = self._next(deadline - time.perf_counter())
                except queue.Empty:
                    break
                if not isinstance(nxt, _TranslateJob):  # calls and stop keep their place in line
                    self._pending.insert(0, nxt)
                    break
                batch.append(nxt)
                sentences += len(nxt.sources)
            self._run_batch(batch)

    @staticmethod
    def _run_call(job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:
            job.future.set_exception(exc)

    def _run_batch(self, batch: list[_TranslateJob]) -> None:
        groups: dict[GenerationOptions, list[_TranslateJob]] = {}
        for job in batch:
            if job.future.set_running_or_notify_cancel():
                groups.setdefault(job.options, []).append(job)
        for options, jobs in groups.items():
            try:
                self._run_group(options, jobs)
            except Exception as exc:
                left = [job for job in jobs if not job.future.done()]
                if len(left) == 1:
                    logger.error("translation request failed: %s: %s", type(exc).__name__, exc, exc_info=True)
                    left[0].future.set_exception(exc)
                    continue
                # one request may have failed the whole group: run each one alone, so only the
                # culprit gets the error and the others their translations
                logger.warning(
                    "translation batch of %d request(s) failed (%s: %s); running them one by one",
                    len(left),
                    type(exc).__name__,
                    exc,
                )
                for job in left:
                    self._run_alone(options, job)
            except BaseException as exc:  # not an Exception: fail the waiting requests, keep serving
                logger.exception("translation batch of %d request(s) failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _run_alone(self, options: GenerationOptions, job: _TranslateJob) -> None:
        """Run one request in a ``generate`` call of its own; its failure goes to its future only."""
        try:
            self._run_group(options, [job])
        except Exception as exc:
            logger.error("translation request failed: %s: %s", type(exc).__name__, exc, exc_info=True)
            if not job.future.done():
                job.future.set_exception(exc)

    def _run_group(self, options: GenerationOptions, jobs: list[_TranslateJob]) -> None:
        sources = [s for job in jobs for s in job.sources]
        start = time.perf_counter()
        results = self.translator.translate(
            sources,
            knn=options.knn or False,
            batch_size=self.config.max_batch,
            num_beams=options.num_beams,
            max_new_tokens=options.max_new_tokens,
        )
        seconds = time.perf_counter() - start
        if self.on_batch is not None:
            tokens = sum(sum(1 for i in t.token_ids if i not in self._special) for t in results)
            self.on_batch(len(sources), tokens, seconds)
        at = 0
        for job in jobs:
            mine = results[at : at + len(job.sources)]
            at += len(job.sources)
            if job.explain:
                config = options.knn or self.translator.config
                for result in mine:
                    result.explanation = self.translator.explain(result.source, result.token_ids, config)
            job.future.set_result(mine)
