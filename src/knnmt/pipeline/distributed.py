"""Datastore build on a Ray cluster (``knnmt build --ray auto|ADDRESS``): :func:`build_datastore_ray`;
and the fill of an index's on-disk lists (``knnmt index --on-disk --ray``): :func:`build_index_ray`.

The process that calls it (the *driver*) does everything :func:`~knnmt.pipeline.build.build_datastore`
does except teacher forcing: it holds the datastore's write lock for the whole build, reads and
tokenises the corpus into the same shards (``BuildConfig.shard_sentences`` kept pairs each, in corpus
order), and alone writes the manifest. A pool of Ray actors (:class:`ShardWorker`), each with its own
copy of the model loaded once by :meth:`ModelSource.load`, teacher-forces whole shards and publishes
them under the datastore directory with :func:`~knnmt.pipeline.build.write_shard`, the same code as
the single-process build. So the datastore is the same, byte for byte (only the manifest's
timestamps differ).

Shards finish in any order; the driver lists shard ``i`` in the manifest only once shards ``0..i`` are
all written (:class:`RayShardRunner`), so the manifest always lists a prefix and an interrupted build
resumes like any other: rerun the same command. A worker that dies (its process killed, a crashed
node) is restarted by Ray and redoes the shard it was writing (``max_retries`` times).

Workers write the shard files themselves: on a cluster of several machines the datastore directory
must be on a filesystem every node shares with the driver, at the same path, and every node needs
knnmt and the model (same files: the workers check the model's fingerprint against the driver's).

Ray is imported only here and only when a build asks for it (``pip install 'knnmt[ray]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import socket
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..core.config import BuildConfig, IndexConfig
from ..core.errors import DatastoreError, IncompatibleError, KnnmtError, UsageError
from ..hf.registry import model_fingerprint, set_languages, tokenizer_fingerprint
from ..search.distributed import AUTO, connect_ray
from ..search.distributed import import_ray as search_import_ray
from ..search.index import BlockJob, SearchIndex, build_index, is_on_disk
from ..store.corpus import CorpusSpec
from ..store.datastore import Datastore
from ..store.keycodec import KeyCodec
from .build import BuildRate, ShardJob, build_datastore
from .translator import load_model

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a worker loads the model from: what ``knnmt build`` loads it with (``--model``,
    ``--device``, ``--src-lang``, ``--tgt-lang``); loaded by :meth:`load` the way the command line does."""

    name_or_path: str
    device: str | None = None
    dtype: str | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None

    def load(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``: :func:`~knnmt.pipeline.translator.load_model` with the languages set."""
        model, tokenizer = load_model(self.name_or_path, self.device, self.dtype)
        set_languages(model, tokenizer, self.src_lang, self.tgt_lang)
        return model, tokenizer

    @property
    def gpu(self) -> bool:
        """Whether the model runs on a GPU (each worker then asks Ray for one)."""
        return bool(self.device) and str(self.device).startswith("cuda")


def import_ray() -> ModuleType:
    """The ``ray`` module, or :class:`UsageError` saying how to install it (``--ray`` of build/index)."""
    module: ModuleType = search_import_ray("--ray")
    return module


class ShardWorker:
    """A Ray actor's state: the model, loaded once, and :meth:`write` to write one shard with it.

    Plain Python (``ray.remote`` wraps it when a build starts); a subclass may be passed to
    :class:`RayShardRunner` to prepare each worker's environment.

    Args:
        source: the model to load.
        expect: ``(model fingerprint, tokenizer fingerprint)`` the driver's model has; a worker that
            loads anything else refuses to write.
        threads: torch (and OpenMP) threads of this worker.
    """

    def __init__(self, source: ModelSource, expect: tuple[str, str] | None = None, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.host = socket.gethostname()
        self.error: KnnmtError | None = None  # raised by every write: the driver reports it
        self.model: Any = None
        self.tokenizer: Any = None
        try:
            self.model, self.tokenizer = source.load()
        except KnnmtError as exc:
            self.error = KnnmtError(f"Ray worker on host {self.host}: {exc}")
            return
        if expect is not None:
            loaded = (model_fingerprint(self.model), tokenizer_fingerprint(self.tokenizer))
            if loaded != expect:
                self.error = IncompatibleError(
                    f"the Ray worker on host {self.host} loaded {source.name_or_path!r} with fingerprints "
                    f"{loaded}, but the driver's model has {expect}: every machine needs the same model files"
                )

    def write(self, job: ShardJob, key: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Teacher-force and publish ``job``'s shard (:meth:`ShardJob.write`) with the key codec of the
        manifest ``key`` object; returns its entry count and the codec's manifest fields (an untrained
        codec has learnt from this shard)."""
        if self.error is not None:
            raise self.error
        if not job.out.is_dir():
            raise DatastoreError(
                f"the datastore directory {job.out} does not exist on host {self.host}: Ray workers write "
                "the shards themselves, so the datastore must be on a filesystem the driver and every worker "
                "share, at the same path"
            )
        codec = KeyCodec.from_manifest(key)
        count = job.write(self.model, self.tokenizer, codec)
        return count, codec.manifest_fields()


class RayShardRunner:
    """A :class:`~knnmt.pipeline.build.ShardRunner` writing shards on a pool of Ray actors.

    Actors are started when the first shards are ready (none for a build with nothing left to do), at
    most ``workers``, each given one shard at a time; no more than ``2 × workers`` shards are read ahead
    of the last one listed in the manifest. Ray must be connected (:func:`connect_ray`).

    Args:
        source: the model every worker loads.
        expect: the driver model's ``(model, tokenizer)`` fingerprints (checked by each worker).
        workers: actors in the pool (default: the cluster's CPUs, or GPUs for a ``cuda`` device, divided
            by ``cpus_per_worker``).
        cpus_per_worker: CPUs Ray reserves per actor, also its torch/OpenMP threads.
        max_retries: how often a dead worker is restarted and its shard redone.
        worker_class: :class:`ShardWorker` or a subclass.
    """

    def __init__(
        self,
        source: ModelSource,
        expect: tuple[str, str] | None = None,
        *,
        workers: int | None = None,
        cpus_per_worker: int = 1,
        max_retries: int = 3,
        worker_class: type[ShardWorker] = ShardWorker,
    ) -> None:
        if workers is not None and workers < 1:
            raise UsageError(f"Ray workers must be at least 1, got {workers}")
        if cpus_per_worker < 1:
            raise UsageError(f"CPUs per Ray worker must be at least 1, got {cpus_per_worker}")
        if max_retries < 0:
            raise UsageError(f"max_retries must be >= 0, got {max_retries}")
        self.source = source
        self.expect = expect
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.max_retries = max_retries
        self.worker_class = worker_class

    def pool_size(self, ray: ModuleType) -> int:
        """The number of actors: ``workers``, or what the cluster's resources allow."""
        if self.workers is not None:
            return self.workers
        resources = ray.cluster_resources()
        if self.source.gpu:
            return max(1, int(resources.get("GPU", 0)))
        return max(1, int(resources.get("CPU", 1)) // self.cpus_per_worker)

    def _actor_class(self, ray: ModuleType) -> Any:
        threads = str(self.cpus_per_worker)
        return ray.remote(
            num_cpus=self.cpus_per_worker,
            num_gpus=1 if self.source.gpu else 0,
            max_restarts=self.max_retries,
            max_task_retries=self.max_retries,
            runtime_env={
                "env_vars": {
                    "OMP_NUM_THREADS": threads,
                    "MKL_NUM_THREADS": threads,
                    "TOKENIZERS_PARALLELISM": "false",
                }
            },
        )(self.worker_class)

    def __call__(
        self, jobs: Iterator[ShardJob], bar: Any, rate: BuildRate, key: dict[str, Any]
    ) -> Generator[tuple[ShardJob, int, dict[str, Any]], None, None]:
        """Write ``jobs`` on the pool; yield each with its entry count and key fields in the order of
        ``jobs``. While the key codec is untrained (sq8, first shard of the datastore) the first shard is
        written alone, and the ranges it learns go with every later shard."""
        ray = import_ray()
        size = self.pool_size(ray)
        actor_class = self._actor_class(ray)
        actors: list[Any] = []
        idle: list[Any] = []
        running: dict[Any, tuple[int, ShardJob, Any]] = {}  # ObjectRef -> (job number, job, actor)
        finished: dict[int, tuple[ShardJob, int, dict[str, Any]]] = {}  # written, not yet yielded
        key = dict(key)
        trained = KeyCodec.from_manifest(key).trained
        planned = iter(jobs)
        submitted = listed = 0
        exhausted = False
        logger.info(
            "writing shards on up to %d Ray worker(s), %d CPU(s) each%s",
            size,
            self.cpus_per_worker,
            " and 1 GPU" if self.source.gpu else "",
        )
        try:
            while True:
                while (
                    not exhausted
                    and (idle or len(actors) < size)
                    and submitted < listed + 2 * size
                    and (trained or not running)  # an untrained codec learns from one shard, alone
                ):
                    job = next(planned, None)
                    if job is None:
                        exhausted = True
                        break
                    if idle:
                        actor = idle.pop()
                    else:
                        actor = actor_class.remote(self.source, self.expect, self.cpus_per_worker)
                        actors.append(actor)
                    portable = dataclasses.replace(job, out=job.out.resolve())  # workers have other cwds
                    running[actor.write.remote(portable, key)] = (submitted, job, actor)
                    submitted += 1
                if not running:  # then nothing is left unyielded: the first shard not listed is running
                    return
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    number, job, actor = running.pop(ref)
                    count, fields = self._result(ray, ref, job)
                    idle.append(actor)
                    finished[number] = (job, count, fields)
                    if not trained:
                        key.update(fields)
                        trained = KeyCodec.from_manifest(key).trained
                    logger.debug("shard %s written by a Ray worker (%d entries)", job.name, count)
                    rate.tokens += count
                    bar.update(len(job.encoded))
                    bar.set_postfix(tok_s=f"{rate.per_second():,.0f}", refresh=False)
                while listed in finished:
                    yield finished.pop(listed)
                    listed += 1
        finally:
            for actor in actors:  # stops the shards still being written (a failure or an interrupt)
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if running:  # let the killed writes end before their files are removed
                with contextlib.suppress(Exception):
                    ray.wait(list(running), num_returns=len(running), timeout=10)
            unlisted = [job for _, job, _ in running.values()] + [job for job, _, _ in finished.values()]
            for job in unlisted:  # the manifest lists a prefix: a rerun writes these again
                for directory in (job.out / "shards" / job.name, job.out / "shards" / f"{job.name}.tmp"):
                    shutil.rmtree(directory, ignore_errors=True)

    def _result(self, ray: ModuleType, ref: Any, job: ShardJob) -> tuple[int, dict[str, Any]]:
        """What the worker returned for ``job`` (entry count, key fields), or its failure as a
        :class:`KnnmtError`."""
        try:
            count, fields = ray.get(ref)
            return int(count), dict(fields)
        except ray.exceptions.RayTaskError as exc:  # the shard's code raised: report that error
            cause = exc.cause
            if isinstance(cause, KnnmtError):
                raise cause from None
            raise KnnmtError(
                f"writing shard {job.name} failed on a Ray worker: {type(cause).__name__}: {cause}"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise KnnmtError(
                f"the Ray worker writing shard {job.name} died (Ray restarts a dead worker up to "
                f"{self.max_retries} time(s)): {_summary(exc)}. The finished shards are kept: rerun the same "
                "command to resume"
            ) from None
        except ray.exceptions.RayError as exc:
            raise KnnmtError(f"Ray failed while writing shard {job.name}: {_summary(exc)}") from None


def _summary(exc: BaseException, limit: int = 300) -> str:
    """A Ray error's first line and, when it ends with a traceback, the error that line ends with."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first, last = lines[0][:limit], lines[-1][:limit]
    return first if len(lines) == 1 else f"{first} ... {last}"


def build_datastore_ray(
    source: ModelSource | str,
    corpus: CorpusSpec,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    address: str = AUTO,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    max_retries: int = 3,
    append: bool = False,
    force: bool = False,
    source_prefix: str = "",
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    worker_class: type[ShardWorker] = ShardWorker,
) -> Datastore:
    """:func:`~knnmt.pipeline.build.build_datastore` with the shards teacher-forced on Ray workers.

    The result is the datastore the single-process build makes (same shards, byte for byte; same
    manifest but for timestamps), and resuming, appending and ``force`` work the same (see the module
    docstring for what a cluster of several machines needs).

    Args:
        source: the model (a name or path, or a :class:`ModelSource` with device and languages); every
            worker loads it, and so does this process (for the datastore's identity and tokenisation)
            unless ``model`` and ``tokenizer`` are given (they must be that model).
        address: ``auto`` (a local Ray, started if none runs) or a cluster's address; ignored when this
            process is already connected to Ray (:func:`connect_ray`).
        workers, cpus_per_worker, max_retries, worker_class: the pool (:class:`RayShardRunner`).
        config, append, force, source_prefix, progress: as for ``build_datastore``.

    Raises:
        UsageError: Ray is not installed.
        KnnmtError: Ray cannot be reached, or a worker failed (finished shards are kept for a rerun).
    """
    source = ModelSource(source) if isinstance(source, str) else source
    ray = import_ray()
    started = connect_ray(address)
    try:
        if model is None or tokenizer is None:
            model, tokenizer = source.load()
        runner = RayShardRunner(
            source,
            (model_fingerprint(model), tokenizer_fingerprint(tokenizer)),
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            max_retries=max_retries,
            worker_class=worker_class,
        )
        return build_datastore(
            model,
            tokenizer,
            corpus,
            out,
            config,
            append=append,
            force=force,
            model_name=source.name_or_path,
            source_prefix=source_prefix,
            progress=progress,
            shard_runner=runner,
        )
    finally:
        if started:
            ray.shutdown()


# ---- on-disk index fill ----------------------------------------------------------------------------


def _run_block(job: BlockJob, trained: Any) -> int:
    """A Ray task: fill and write one sub-index (one OpenMP thread, as its CPU reservation says)."""
    import faiss

    faiss.omp_set_num_threads(1)
    return job.run(trained)


@dataclasses.dataclass(frozen=True)
class RayBlockRunner:
    """A :class:`~knnmt.search.index.BlockRunner` filling the sub-indexes of on-disk lists as Ray tasks
    (one per group of shards, a CPU each, retried ``max_retries`` times when a worker dies). The trained
    index is put in Ray's object store once; each task reads its shards' keys from the datastore and
    writes its sub-index beside the index being built, so on a cluster both must be on a filesystem every
    node shares. The process building the index merges the sub-indexes, as without Ray."""

    max_retries: int = 3

    def __call__(self, jobs: Sequence[BlockJob], trained: Any, bar: Any) -> list[int]:
        ray = import_ray()
        task = ray.remote(num_cpus=1, max_retries=self.max_retries)(_run_block)
        shared = ray.put(trained)
        pending = {task.remote(job, shared): i for i, job in enumerate(jobs)}
        counts = [0] * len(jobs)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        counts[i] = int(ray.get(ref))
                    except Exception as exc:  # a task that failed max_retries times, or raised
                        raise KnnmtError(
                            f"sub-index {i} (shards {jobs[i].shards}) failed on Ray: {_summary(exc)}"
                        ) from None
                    bar.update(counts[i])
        finally:
            for ref in pending:  # a failure (or Ctrl-C) stops the others
                ray.cancel(ref, force=True)
        return counts


def build_index_ray(
    datastore: Datastore,
    config: IndexConfig | None = None,
    out: str | Path | None = None,
    *,
    address: str = AUTO,
    max_retries: int = 3,
    progress: bool = True,
    force: bool = False,
) -> SearchIndex:
    """:func:`~knnmt.search.index.build_index` of an index with on-disk lists whose sub-indexes (one per
    group of shards) are filled on Ray workers (:class:`RayBlockRunner`); this process trains the index,
    holds the datastore's write lock and merges. The index is the one a single process builds.

    Raises:
        UsageError: Ray is not installed, or ``config`` keeps the lists in RAM.
        KnnmtError: Ray cannot be reached, or a sub-index failed.
    """
    config = config or IndexConfig(storage="disk")
    if not is_on_disk(config, datastore.count, datastore.dim):
        raise UsageError("--ray fills the sub-indexes of on-disk lists: build the index with --on-disk")
    ray = import_ray()
    started = connect_ray(address)
    try:
        return build_index(
            datastore, config, out, progress=progress, force=force, block_runner=RayBlockRunner(max_retries)
        )
    finally:
        if started:
            ray.shutdown()
