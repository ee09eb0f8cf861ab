"""Distributed search on Ray: an IVF index's inverted lists split into parts held by Ray actors.

The driver (the translating process) keeps the coarse quantizer (the HNSW graph over the centroids
that :meth:`SearchIndex.set_params` installs) and, for ``OPQ…`` indexes, the input transform. At every
decoding step it transforms the live queries, finds their ``nprobe`` nearest lists once
(``Dq, Iq [n, nprobe]``), and sends all of them to every part in one call; each part
(:class:`IndexPart`, a Ray actor) scans only the probed lists it holds with faiss's
``IndexIVF.search_preassigned`` and returns its own top-``k``; the driver merges the parts' lists into
one top-``k`` (:func:`merge_results`) and re-ranks exactly as :class:`IndexRetriever` does. The lists
scanned and the distances computed are the single index's, so the result is the same (up to the order
of neighbours at equal distance).

Parts are contiguous ranges of list numbers holding about the same number of entries
(:func:`split_lists`): k-means numbers its lists in no spatial order, so a query's probed lists fall in
all parts alike, while a contiguous range is one contiguous region of an on-disk ``.ivfdata`` file
(each part pages in only its own region) and equal entries give the parts equal memory and work.

Every part loads the same index directory: on one machine the memory-mapped lists of an on-disk index
are shared through the page cache and each part touches only its own; on a cluster the directory must
be at the same path on every node (a shared filesystem, or a copy). An index with its lists in RAM is
read whole by every part (each part still scans only its own lists). Ray is an optional dependency
(``pip install 'knnmt[ray]'``), imported only when a distributed retriever is made.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..core.errors import DatastoreError, IncompatibleError, KnnmtError, UsageError
from ..store.datastore import Datastore
from .index import INDEX_FILE, SearchIndex, omp_threads
from .retriever import IndexRetriever

logger = logging.getLogger(__name__)

#: Distance faiss reports where fewer than ``k`` neighbours were found (with id ``-1``).
MISSING_DISTANCE = float(np.finfo(np.float32).max)
#: Queries larger than this (bytes) are put in Ray's object store once instead of sent with each call.
PUT_FROM_BYTES = 100_000


#: How to get Ray (an optional dependency).
INSTALL_HINT = "pip install 'knnmt[ray]'"


def import_ray(what: str = "distributed search (--retrieval ray)") -> Any:
    """The ``ray`` module, or :class:`UsageError` saying that ``what`` needs it and how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(
            f"{what} needs Ray, which is not installed here: {INSTALL_HINT} (on every machine of the cluster)"
        ) from None
    return ray


#: The Ray address that starts a local Ray instance or connects to the one already running here.
AUTO = "auto"


def _probe(address: str, what: str) -> None:
    """Fail fast, with a clear message, when nothing listens at a ``host:port`` address (``ray.init``
    itself retries for minutes and then exits the process)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(
            f"{what} {address!r}: expected 'auto', HOST:PORT of a Ray cluster's head (e.g. head:6379) or a "
            "Ray Client address (ray://head:10001)"
        )
    host = host.removeprefix("ray://") or "127.0.0.1"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise KnnmtError(
            f"cannot connect to the Ray cluster at {address}: {exc}; is it running (`ray start --head` "
            "on its head node), and is this the head's address and port?"
        ) from None


def connect_ray(address: str = AUTO, what: str = "--ray", quiet: bool = False) -> bool:
    """Connect this process to Ray unless it already is: ``auto`` connects to the Ray instance running on
    this machine (or ``$RAY_ADDRESS``) or starts a local one (``ray.init()``); anything else is a
    cluster's address (``head:6379``, or ``ray://head:10001`` for Ray Client). The one way knnmt
    connects, for the distributed build and index fill (``--ray``) and the distributed search.

    Args:
        what: what needs Ray, for messages.
        quiet: keep the workers' log lines out of this process's output (and start a local instance
            without its dashboard).

    Returns:
        whether this call connected (the caller then disconnects with ``ray.shutdown()``).

    Raises:
        UsageError: Ray is not installed, or the address is malformed.
        KnnmtError: nothing answers at ``address``, or Ray fails to connect.
    """
    ray = import_ray(what)
    if ray.is_initialized():
        logger.info("this process is already connected to Ray: %s uses that cluster (not %r)", what, address)
        return False
    if address != AUTO:
        _probe(address, what)
    options: dict[str, Any] = {"log_to_driver": False} if quiet else {}
    try:
        if address == AUTO:
            if quiet and not os.environ.get("RAY_ADDRESS"):
                options["include_dashboard"] = False  # only when this call starts the instance
            ray.init(**options)
        else:
            ray.init(address=address, **options)
    except (Exception, SystemExit) as exc:  # Ray ends a failed connection with sys.exit
        raise KnnmtError(f"cannot connect to Ray at {address!r}: {type(exc).__name__}: {exc}") from None
    return True


def unwrap_ivf(index: Any) -> tuple[Any | None, list[Any]]:
    """``(IndexIVF or None, input transforms)`` of a faiss index: an ``IndexIVF``, or one behind an
    ``IndexPreTransform`` (``OPQ…``, PCA); ``None`` for any other index."""
    top: Any = faiss.downcast_index(index)
    transforms: list[Any] = []
    if isinstance(top, faiss.IndexPreTransform):
        chain: Any = top.chain  # a SWIG vector of VectorTransform pointers
        transforms = [faiss.downcast_VectorTransform(chain.at(i)) for i in range(chain.size())]
        top = faiss.downcast_index(top.index)
    return (top if isinstance(top, faiss.IndexIVF) else None), transforms


def ivf_of(index: SearchIndex) -> tuple[Any, list[Any]]:
    """``(IndexIVF, input transforms)`` of an IVF index (optionally behind ``OPQ``/PCA transforms);
    :class:`UsageError` for any other index (exact, HNSW, GPU)."""
    ivf, transforms = unwrap_ivf(index.index)
    if ivf is None:
        raise UsageError(
            f"distributed search splits the inverted lists of an IVF index; index {index.factory!r} has "
            "none (build one with e.g. `knnmt index --factory IVF4096,PQ64`, or use --retrieval index)"
        )
    return ivf, transforms


def split_lists(sizes: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Cut ``nlist`` lists of ``sizes [nlist]`` entries into ``parts`` contiguous ranges
    ``[(first, last), ...]`` of about equal entries (every range holds at least one list)."""
    nlist = len(sizes)
    if not 1 <= parts <= nlist:
        raise UsageError(f"cannot split {nlist} inverted lists into {parts} parts (1 to {nlist})")
    cumulative = np.cumsum(np.asarray(sizes, dtype=np.int64))
    total = int(cumulative[-1]) if nlist else 0
    bounds = [0]
    for i in range(1, parts):
        target = total * i / parts
        after = int(np.searchsorted(cumulative, target, side="left"))  # first list reaching the target
        below = float(cumulative[after - 1]) if after > 0 else 0.0
        cut = after if target - below <= float(cumulative[after]) - target else after + 1  # nearer end
        cut = max(cut, bounds[-1] + 1)  # at least one list per range
        bounds.append(min(cut, nlist - (parts - i)))
    bounds.append(nlist)
    return list(itertools.pairwise(bounds))


def merge_results(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """One top-``k`` from the parts' ``(D [n, k_p], I [n, k_p])``, nearest first (faiss conventions:
    ``-1`` with :data:`MISSING_DISTANCE` where missing, which sort last). Equal distances keep the
    order of ``results``. Returns ``(D [n, k] float32, I [n, k] int64)``."""
    distances = np.concatenate([d for d, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1)
    if distances.shape[1] < k:
        pad = k - distances.shape[1]
        distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=MISSING_DISTANCE)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return (
        np.take_along_axis(distances, order, axis=1).astype(np.float32, copy=False),
        np.take_along_axis(ids, order, axis=1).astype(np.int64, copy=False),
    )


def list_sizes(ivf: Any) -> np.ndarray:
    """Entries in each inverted list of ``ivf``: ``[nlist]`` int64."""
    lists = ivf.invlists
    return np.fromiter((lists.list_size(i) for i in range(ivf.nlist)), dtype=np.int64, count=ivf.nlist)


class IndexPart:
    """Lists ``[first, last)`` of the IVF index in ``index_file``: one part of a distributed index (a
    Ray actor of :class:`RayIndexRetriever`, or a plain object in one process).

    It reads the faiss index itself (the lists memory-mapped when ``on_disk``; no coarse graph: the
    driver finds the lists) and answers :meth:`search` for the probed lists in its range with
    ``threads`` OpenMP threads. It uses only faiss, numpy and the standard library, so Ray ships this
    module to the workers by value: a worker imports neither knnmt nor torch (seconds less to start,
    and the nodes of a cluster need faiss and numpy, not knnmt).
    """

    def __init__(self, index_file: str, on_disk: bool, first: int, last: int, threads: int = 1) -> None:
        faiss.omp_set_num_threads(max(1, threads))
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
        self.index = faiss.read_index(index_file, flags if on_disk else 0)
        ivf, _ = unwrap_ivf(self.index)
        if ivf is None:
            raise ValueError(f"{index_file} is not an IVF index")
        if on_disk and hasattr(ivf, "use_precomputed_table"):  # as SearchIndex.load: no private table
            ivf.use_precomputed_table = -1
        if not 0 <= first < last <= ivf.nlist:
            raise ValueError(f"lists [{first}, {last}) are not lists of {index_file} ({ivf.nlist} lists)")
        self.ivf = ivf
        self.first, self.last = first, last

    def info(self) -> dict[str, Any]:
        """What this part holds, for the driver's consistency check and logs."""
        lists = faiss.downcast_InvertedLists(self.ivf.invlists)
        return {
            "ntotal": int(self.ivf.ntotal),
            "nlist": int(self.ivf.nlist),
            "ivfdata": os.path.basename(lists.filename) if hasattr(lists, "filename") else None,
            "first": self.first,
            "last": self.last,
            "entries": int(list_sizes(self.ivf)[self.first : self.last].sum()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def search(
        self, queries: np.ndarray, lists: np.ndarray, coarse: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scan the probed lists of this part.

        Args:
            queries: ``[n, d]`` float32, already transformed (the IVF's input space).
            lists: ``[n, nprobe]`` int64 probed list numbers (``-1``: not probed); lists outside this
                part are skipped.
            coarse: ``[n, nprobe]`` float32 distances of the queries to those lists' centroids.
            k: neighbours wanted.

        Returns:
            ``(D [n, k] float32, I [n, k] int64)`` over this part's lists, faiss conventions.
        """
        mine = np.where((lists >= self.first) & (lists < self.last), lists, -1).astype(np.int64)
        self.ivf.nprobe = mine.shape[1]  # search_preassigned reads nprobe columns of ``mine``
        distances, ids = self.ivf.search_preassigned(
            np.ascontiguousarray(queries, dtype=np.float32),
            k,
            np.ascontiguousarray(mine),
            np.ascontiguousarray(coarse, dtype=np.float32),
        )
        return distances, ids


class RayIndexRetriever(IndexRetriever):
    """Vanilla kNN-MT over an IVF index whose lists are split into ``parts`` Ray actors.

    Same results as :class:`~knnmt.search.retriever.IndexRetriever` over ``index`` (module docstring),
    whose :meth:`search` (with the exact re-rank of ``index.rerank·k`` candidates against the datastore's
    keys, on the driver) it keeps; only :meth:`search_index` goes to the parts.

    Args:
        index: the loaded index (from a directory: the actors load that directory). Its coarse
            quantizer and search parameters (``nprobe``, ``rerank``, ``search_threads``) are used here.
        datastore: the datastore the index belongs to (exact re-rank).
        parts: number of actors the lists are split into.
        address: Ray cluster to use when Ray is not yet initialised in this process: ``None`` starts a
            local Ray without dashboard (or connects to ``RAY_ADDRESS`` when set; a local Ray listens on
            the machine's address, not only on loopback; Ray's token authentication guards it when set
            up), ``"auto"`` the cluster started on this machine with ``ray start``, else
            ``ray://host:port`` or ``host:port``.
        part_cpus: CPUs Ray reserves for each actor (it searches with ``part_threads`` threads).
        part_threads: OpenMP threads of faiss in each actor.
        release_lists: drop the driver's own copy of the lists (it then only finds the probed lists;
            ``index.search`` returns nothing). Leave ``False`` when ``index`` is used elsewhere.
        timeout: seconds to wait for the actors to load the index, and for each step's answers.
    """

    def __init__(
        self,
        index: SearchIndex,
        datastore: Datastore,
        parts: int = 2,
        address: str | None = None,
        part_cpus: float = 1.0,
        part_threads: int = 1,
        release_lists: bool = False,
        timeout: float = 600.0,
    ) -> None:
        if index.path is None:
            raise UsageError("distributed search needs an index saved in a directory (SearchIndex.load)")
        self.ivf, self.transforms = ivf_of(index)
        if parts < 1:
            raise UsageError(f"the number of Ray parts must be >= 1, got {parts}")
        super().__init__(index, datastore)
        self.timeout = timeout
        self.ranges = split_lists(list_sizes(self.ivf), parts)
        self._ray = import_ray()
        self._actors: list[Any] = []
        self._started_ray = connect_ray(address or AUTO, "distributed search (--retrieval ray)", quiet=True)
        try:
            self._start_parts(Path(index.path), part_cpus, part_threads)
        except BaseException:
            self.close()
            raise
        if release_lists:
            empty = faiss.ArrayInvertedLists(self.ivf.nlist, self.ivf.code_size)
            self.ivf.replace_invlists(empty, True)
            empty.this.disown()  # type: ignore[attr-defined]  # the index owns it now

    def _start_parts(self, directory: Path, cpus: float, threads: int) -> None:
        ray = self._ray
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # IndexPart: faiss + numpy only
        actor_class = ray.remote(IndexPart).options(num_cpus=cpus)
        index_file = str((directory / INDEX_FILE).resolve())
        on_disk = self.index.storage == "disk"
        self._actors = [
            actor_class.remote(index_file, on_disk, first, last, threads) for first, last in self.ranges
        ]
        try:
            infos = ray.get([a.info.remote() for a in self._actors], timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise DatastoreError(
                f"{len(self._actors)} Ray actors did not load index {directory} within {self.timeout:g}s "
                "(does the cluster have a free CPU for each part? see --ray-parts)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise DatastoreError(
                f"a Ray actor could not load index {directory} ({str(exc).strip().splitlines()[-1]}); on a "
                "cluster every node must see the index directory at the same path (shared filesystem or "
                "a copy), and have faiss-cpu and numpy installed"
            ) from None
        expected = {
            "ntotal": int(self.ivf.ntotal),
            "nlist": int(self.ivf.nlist),
            "ivfdata": self.index.settings.get("ivfdata") if on_disk else None,
        }
        for info in infos:
            seen = {name: info[name] for name in expected}
            if seen != expected:
                raise IncompatibleError(
                    f"a Ray actor on {info['host']} loaded another index from {directory} ({seen}; this "
                    f"process has {expected}): was the index rebuilt, or does that node hold another copy?"
                )
        logger.info(
            "distributed search: %d parts of %s on Ray, entries per part %s",
            len(infos),
            self.index.factory,
            [info["entries"] for info in infos],
        )

    @property
    def parts(self) -> int:
        return len(self.ranges)

    def describe(self) -> str:
        rerank = self.index.rerank
        return f"ray({self.parts} parts, {self.index.factory}" + (
            f", rerank={rerank})" if rerank > 0 else ")"
        )

    def search_index(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """What ``index.search(queries, k)`` returns, computed by the parts: ``queries [n, dim]`` ->
        ``(D [n, k] float32, I [n, k] int64)``."""
        if not self._actors:
            raise UsageError("this distributed retriever is closed")
        x = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(x)
        if n == 0:
            return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
        nprobe = min(int(self.ivf.nprobe), int(self.ivf.nlist))
        with omp_threads(int(self.index.settings.get("search_threads", 1))):
            for transform in self.transforms:
                x = transform.apply(x)
            coarse, lists = self.ivf.quantizer.search(x, nprobe)
        ray = self._ray
        calls = [
            (actor, np.where((lists >= first) & (lists < last), lists, -1))
            for actor, (first, last) in zip(self._actors, self.ranges, strict=True)
        ]
        calls = [(actor, mine) for actor, mine in calls if (mine >= 0).any()]
        if not calls:  # no list probed (cannot happen with a full coarse quantizer)
            return np.full((n, k), MISSING_DISTANCE, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
        shared = ray.put(x) if len(calls) > 1 and x.nbytes >= PUT_FROM_BYTES else x
        futures = [actor.search.remote(shared, mine, coarse, k) for actor, mine in calls]
        results = ray.get(futures, timeout=self.timeout)
        return merge_results(results, k)

    def close(self) -> None:
        """Stop the actors (and Ray, if this retriever started it)."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayIndexRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
