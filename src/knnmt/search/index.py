"""faiss indexes over a datastore's keys: choose, train, fill in chunks, save, load, search.

Conventions follow faiss: an index is named by a factory string (``"Flat"``,
``"IVF4096,PQ64x4fs"``, ``"OPQ64,IVF4096,PQ64"``, ``"HNSW32"``), metric is squared L2, and search
returns ``(D, I)`` float32/int64 arrays of shape ``[n_queries, k]`` with ``I == -1`` where fewer
than ``k`` neighbours were found. The index is saved with its settings (``index.json``) and the
fingerprint of the datastore it was built for.

Two layouts of an IVF index's inverted lists (``IndexConfig.storage``):

* ``ram``: faiss's default; the whole index is read into memory at load (fast-scan PQ codes, the
  fastest to search at up to a few million keys).
* ``disk``: ``OnDiskInvertedLists`` in ``lists-<token>.ivfdata`` beside ``index.faiss``. Built in
  bounded memory (train once on a sample, fill one sub-index per group of shards, write it, merge the
  sub-indexes into the lists file), and memory-mapped when loaded: searching pages in the lists it
  probes, and the process's private memory holds only the coarse quantizer. 8-bit PQ or SQ codes
  (faiss cannot map fast-scan's block layout).

``index.json`` records the layout (``storage``) and its format ``version``; this code refuses versions
it does not know.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..core.config import IndexConfig
from ..core.durable import atomic_path, fsync_file, write_json_atomic
from ..core.errors import DatastoreError, IncompatibleError, UsageError
from ..store.datastore import Datastore, drop_shard_keys
from ..store.writelock import WriteLock
from .pq import pq_subquantizers

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
SETTINGS_FILE = "index.json"
#: ``index.json`` versions: 1 = lists in RAM (no ``version`` field before on-disk lists existed), 2 =
#: on-disk lists (``storage: disk`` and an ``ivfdata`` file).
INDEX_VERSIONS = (1, 2)
#: Below this many entries the automatic choice is exact search.
EXACT_UP_TO = 100_000
#: ``storage="auto"`` keeps the inverted lists in RAM while the in-RAM index (:func:`ram_index_bytes`)
#: takes at most this share of the machine's memory, and on disk (memory-mapped) beyond. In RAM they
#: searched 1.5x faster (10M entries, docs/BENCHMARKS.md "Scale"); on disk, translate's private
#: memory stays the plain model's plus the coarse quantizer at any size.
RAM_INDEX_SHARE = 0.25
#: Private bytes per entry of the automatic in-RAM index beyond its ``dim/8`` code bytes: the 8-byte id
#: and faiss's fast-scan block padding (measured: 52 bytes per entry at d=256, 10M entries).
RAM_INDEX_OVERHEAD = 20
#: Entries per sub-index when filling on-disk lists (its codes and ids are in RAM until written).
BLOCK_ENTRIES = 4_000_000
#: From this many IVF lists, keys are assigned to lists through an HNSW graph over the centroids
#: instead of an exact scan of all of them (the exact scan costs ``nlist·dim`` flops per key).
GRAPH_ASSIGN_FROM = 16_384
#: efSearch of that graph when assigning keys (only the nearest list is wanted). The assignment is most
#: of an on-disk fill's time; on 50k real keys and 32,768 centroids, efSearch 64 / 32 / 16 found the
#: exact nearest centroid for 98.9 / 97.6 / 95.0 % of keys at 1 / 0.55 / 0.37 of the time (a key put
#: in its second-nearest list is still found by a query probing both; docs/BENCHMARKS.md "Scale").
ASSIGN_EF_SEARCH = 32


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        if limit != "max":
            total = min(total, int(limit))
    return int(total)


def ram_index_bytes(count: int, dim: int) -> int:
    """Estimated private memory of the automatic in-RAM IVF index of ``count`` keys of dimension
    ``dim``: ``dim/8`` code bytes plus :data:`RAM_INDEX_OVERHEAD` per entry."""
    return count * (max(dim // 8, 1) + RAM_INDEX_OVERHEAD)


def is_on_disk(config: IndexConfig, count: int, dim: int, memory: int | None = None) -> bool:
    """Whether an index of ``count`` keys of dimension ``dim`` built with ``config`` keeps its lists on
    disk: ``storage="auto"`` decides by :data:`RAM_INDEX_SHARE` of ``memory`` (default: this machine's,
    :func:`machine_memory`)."""
    if config.storage != "auto":
        return config.storage == "disk"
    if count <= EXACT_UP_TO:
        return False
    available = memory if memory is not None else machine_memory()
    return ram_index_bytes(count, dim) > RAM_INDEX_SHARE * available


def auto_factory(count: int, dim: int, on_disk: bool = False) -> str:
    """The default index for ``count`` keys of dimension ``dim``.

    Exact ``Flat`` search up to :data:`EXACT_UP_TO` entries; beyond, IVF with about
    ``4·sqrt(count)`` lists (a power of two, at least 39 training points per list) and fast-scan PQ
    codes of 4 bits per sub-vector of 4 dimensions (``dim/8`` bytes, at most 64): faiss scores those
    codes with SIMD look-up tables held in registers, which at 2.1M keys and 32 queries per step
    searched 2.4x faster than 8-bit PQ of the same size, at the same recall after re-ranking
    (docs/BENCHMARKS.md, "Speed"). ``on_disk``: 8-bit PQ of the same size (``dim/8`` bytes), the
    codes faiss can memory-map, and never ``Flat``.
    """
    if count <= EXACT_UP_TO and not on_disk:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
    nlist = int(max(64, min(nlist, 65536, 2 ** math.floor(math.log2(max(count, 1) / 39)))))
    if dim % 2 or on_disk:  # fast-scan packs codes in pairs: an odd dimension gets 8-bit PQ of dim/8 bytes
        return f"IVF{nlist},PQ{pq_subquantizers(dim, 8)}"
    return f"IVF{nlist},PQ{pq_subquantizers(dim, 4)}x4fs"


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads inside the block (``n <= 0``: leave faiss's setting)."""
    if n <= 0:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


@contextlib.contextmanager
def _faiss_chatter_muted() -> Iterator[None]:
    """Discard what faiss's C++ prints to standard output inside the block (``OnDiskInvertedLists``
    reports each file resize and ``IO_FLAG_ONDISK_SAME_DIR`` each path it rewrites): our standard output
    carries translations and JSON reports."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)  # C stdio buffers what it printed; flush it into /dev/null, not the real stdout
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _set_search_params(index: Any, nprobe: int, ef_search: int) -> None:
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        with contextlib.suppress(RuntimeError):  # the index has no such parameter (e.g. nprobe on Flat)
            params.set_index_parameter(index, name, value)


#: Links per node of the HNSW graph over an IVF index's coarse centroids.
COARSE_HNSW_M = 32


def _centroid_graph(quantizer: Any, ef_search: int, threads: int = 0) -> Any:
    """An HNSW graph over the centroids of a flat coarse ``quantizer`` (same centroids, same list
    numbers), searched with ``ef_search``, built with ``threads`` OpenMP threads (1: the same graph in
    every run; 0: faiss's default, faster)."""
    graph = faiss.IndexHNSWFlat(quantizer.d, COARSE_HNSW_M)
    graph.hnsw.efConstruction = 2 * COARSE_HNSW_M
    with omp_threads(threads):
        graph.add(quantizer.reconstruct_n(0, quantizer.ntotal))
    graph.hnsw.efSearch = ef_search
    return graph


def _coarse_graph(index: Any, ef_search: int) -> tuple[Any, ...]:
    """Search the coarse centroids of an IVF ``index`` with an HNSW graph (``ef_search`` > 0) instead of
    an exact scan; returns ``(graph, flat_quantizer)``, the faiss objects that must outlive ``index``.

    The lists stay as they are (the graph holds the same centroids, so a query still probes the lists
    of its nearest centroids, found approximately); only flat (exact) quantizers of CPU indexes are
    replaced, an HNSW one just gets the new ``efSearch``. The graph is never saved:
    :meth:`SearchIndex.save` writes the flat quantizer back.
    """
    ivf = faiss.try_extract_index_ivf(index) if "Gpu" not in type(index).__name__ else None
    if ivf is None or ef_search <= 0:
        return ()
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = ef_search
        return ()
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal == 0:
        return ()
    graph = _centroid_graph(quantizer, ef_search)
    if ivf.own_fields:  # the flat quantizer was the index's; now Python owns it, and nobody the graph
        quantizer.this.own(True)  # type: ignore[attr-defined]
        ivf.own_fields = False
    ivf.quantizer = graph
    return (graph, quantizer)


class SearchIndex:
    """A loaded faiss index plus its settings; ``search`` follows faiss's ``(D, I)`` convention."""

    def __init__(self, index: Any, settings: dict[str, Any], path: Path | None = None) -> None:
        self.index = index
        self.settings = settings
        self.path = path
        self._keep_alive: tuple[Any, ...] = ()  # faiss objects the index points to (coarse graph)

    @property
    def factory(self) -> str:
        return str(self.settings["factory"])

    @property
    def is_exact(self) -> bool:
        return self.factory == "Flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def rerank(self) -> int:
        """Candidates per neighbour re-scored exactly (0 for exact indexes or when disabled)."""
        return 0 if self.is_exact else int(self.settings.get("rerank", 0))

    def set_params(
        self, nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None
    ) -> None:
        """Override the search parameters saved with the index."""
        if rerank is not None:
            if rerank < 0:
                raise UsageError(f"rerank must be >= 0, got {rerank}")
            self.settings["rerank"] = rerank
        if nprobe is not None:
            self.settings["nprobe"] = nprobe
        if ef_search is not None:
            self.settings["ef_search"] = ef_search
        _set_search_params(self.index, self.settings["nprobe"], self.settings["ef_search"])
        coarse = int(self.settings.get("coarse_ef_search", IndexConfig.coarse_ef_search))
        if coarse > 0:  # efSearch below nprobe would return fewer lists than asked for
            self._keep_alive = (
                _coarse_graph(self.index, max(coarse, self.settings["nprobe"])) or self._keep_alive
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest keys of ``queries`` (float32 ``[n, dim]``): ``(D [n, k] float32, I [n, k] int64)``."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        with omp_threads(int(self.settings.get("search_threads", 1))):
            distances, ids = self.index.search(q, k)
        return distances, ids

    @property
    def storage(self) -> str:
        """``"disk"`` when the inverted lists are a memory-mapped ``.ivfdata`` file, else ``"ram"``."""
        return str(self.settings.get("storage", "ram"))

    def save(self, directory: str | Path) -> None:
        """Write ``index.faiss`` (with its flat coarse quantizer, never the HNSW graph built over it at
        load) and ``index.json`` into ``directory``, atomically and durably. An on-disk index's lists
        file must already be in ``directory`` (the build writes it there)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        if self.storage == "disk" and not (out / str(self.settings["ivfdata"])).is_file():
            raise DatastoreError(f"cannot save an on-disk index to {out}: its lists file is elsewhere")
        ivf: Any = faiss.try_extract_index_ivf(index) if self._keep_alive else None
        graph = ivf.quantizer if ivf is not None else None
        try:
            if ivf is not None:
                ivf.quantizer = self._keep_alive[1]  # the flat quantizer the graph was built from
            with atomic_path(out / INDEX_FILE) as tmp:
                faiss.write_index(index, str(tmp))
        finally:
            if ivf is not None:
                ivf.quantizer = graph
        write_json_atomic(out / SETTINGS_FILE, self.settings)
        self.path = out

    @classmethod
    def load(
        cls,
        directory: str | Path,
        datastore: Datastore | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        rerank: int | None = None,
    ) -> SearchIndex:
        """Load an index directory; with ``datastore``, check it was built for that datastore."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and not value >= 1:  # faiss would fail at the first search
                raise UsageError(f"{name} must be >= 1, got {value!r}")
        path = Path(directory)
        settings_file, index_file = path / SETTINGS_FILE, path / INDEX_FILE
        if not settings_file.is_file() or not index_file.is_file():
            raise DatastoreError(
                f"no index at {path} (expected {SETTINGS_FILE} and {INDEX_FILE}); run `knnmt index`"
            )
        store = datastore.path if datastore is not None else "DATASTORE"
        out = "" if datastore is not None and path == datastore.path / "index" else f" --out {path}"
        rebuild = f"rebuild it with `knnmt index {store}{out} --force`"
        try:
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatastoreError(f"{settings_file}: corrupt index settings ({exc}); {rebuild}") from None
        if not isinstance(settings, dict) or not isinstance(settings.get("factory"), str):
            raise DatastoreError(
                f"{settings_file}: not the settings of a knnmt index (no 'factory'); {rebuild}"
            )
        if settings.get("version", 1) not in INDEX_VERSIONS:
            raise DatastoreError(
                f"{settings_file}: index format version {settings.get('version')} is not supported by this "
                f"knnmt (it reads versions {', '.join(map(str, INDEX_VERSIONS))}); upgrade knnmt, or "
                + rebuild
            )
        on_disk = settings.get("storage") == "disk"
        if on_disk and not (path / str(settings.get("ivfdata"))).is_file():
            raise DatastoreError(
                f"{path}: the on-disk index's lists file {settings.get('ivfdata')!r} is missing; {rebuild}"
            )
        if datastore is not None:
            if settings.get("datastore_fingerprint") != datastore.fingerprint:
                raise IncompatibleError(
                    f"index {path} was built for another datastore (fingerprint "
                    f"{settings.get('datastore_fingerprint')}, {settings.get('ntotal')} entries); datastore "
                    f"{datastore.path} has fingerprint {datastore.fingerprint} "
                    f"and {datastore.count} entries. "
                    "Rebuild it with `knnmt index --force`"
                )
            if settings.get("dim") != datastore.dim:
                raise IncompatibleError(
                    f"index {path} has dimension {settings.get('dim')}, datastore {datastore.dim}"
                )
        try:
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # (IO_FLAG_MMAP breaks "ilod")
            flags |= faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE  # see _no_precomputed_table
            with _faiss_chatter_muted():
                index = faiss.read_index(str(index_file), flags if on_disk else 0)
            if on_disk:
                _no_precomputed_table(index)
        except RuntimeError as exc:  # faiss says where in its C++ source, then what
            reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(exc).strip()) or "unreadable"
            raise DatastoreError(
                f"{index_file}: cannot read the faiss index: truncated, corrupt or from another faiss "
                f"version ({reason}); {rebuild}"
            ) from None
        if datastore is not None and index.ntotal != datastore.count:
            raise IncompatibleError(
                f"index {path} holds {index.ntotal} vectors, datastore has {datastore.count}"
            )
        result = cls(index, settings, path)
        result.set_params(nprobe, ef_search, rerank)
        if datastore is not None:
            result.fit_key_storage(datastore)
        return result

    def fit_key_storage(self, datastore: Datastore) -> None:
        """Turn the exact re-rank off (with a warning) when ``datastore`` no longer stores every key
        (key storage ``none``, :func:`drop_keys`): the index's own distances are all there is."""
        if self.rerank > 0 and not datastore.has_keys:
            logger.warning(
                "datastore %s stores no keys (key storage %s): searching by PQ distances, without the exact "
                "re-rank of %d x k candidates",
                datastore.path,
                datastore.key_storage,
                self.rerank,
            )
            self.settings["rerank"] = 0


def exact_index(datastore: Datastore) -> SearchIndex:
    """An in-memory exact (``Flat``) index of all keys, not saved: for small datastores and tests."""
    index = faiss.IndexFlatL2(datastore.dim)
    for _, keys in datastore.iter_keys():
        index.add(keys)
    settings = {
        "factory": "Flat",
        "metric": "L2",
        "dim": datastore.dim,
        "ntotal": int(index.ntotal),
        "nprobe": 1,
        "ef_search": 1,
        "datastore_fingerprint": datastore.fingerprint,
    }
    return SearchIndex(index, settings)


def build_index(
    datastore: Datastore,
    config: IndexConfig | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    block_runner: BlockRunner | None = None,
) -> SearchIndex:
    """Train ``config.factory`` on a sample of keys and fill it from the shards chunk by chunk.

    Memory: the training sample (``train_size × dim`` float32) plus one chunk plus the index itself
    (in RAM), or plus one sub-index of at most :data:`BLOCK_ENTRIES` entries (lists on disk).
    Saved to ``out`` (default ``<datastore>/index``) when given or defaulted. ``block_runner`` fills the
    sub-indexes of on-disk lists elsewhere (e.g. on Ray workers); the index is the same.
    """
    config = config or IndexConfig()
    with WriteLock(datastore.path, "index"):  # one writer at a time, wherever the index goes
        index = _build_index(datastore, config, out, progress, force, block_runner)
        if config.drop_keys:
            _drop_keys(datastore, index)
        return index


def drop_keys(datastore: Datastore, index: SearchIndex) -> dict[str, Any]:
    """Key storage ``none``: delete the datastore's stored keys, which ``index`` (saved, approximate,
    built over this datastore) makes redundant for search. Frees ``dim`` (sq8) or ``2·dim`` (fp16) bytes
    per entry; from then on the index searches by its own (PQ) distances, without exact re-rank, and
    neither it nor a Subset index can be built again from this datastore. Entries appended later keep
    their keys (the service's side index and compaction read them).

    Returns ``{"shards": dropped now, "bytes_freed": ...}``.

    Raises:
        DatastoreError: the index is not saved, or does not cover exactly this datastore.
    """
    with WriteLock(datastore.path, "drop keys"):
        return _drop_keys(datastore, index)


def _drop_keys(datastore: Datastore, index: SearchIndex) -> dict[str, Any]:
    where = index.path or "(not saved)"
    if index.path is None or not (index.path / INDEX_FILE).is_file():
        raise DatastoreError(f"index {where} is not saved: save it before dropping the keys it replaces")
    covers = index.settings.get("datastore_fingerprint") == datastore.fingerprint
    if not covers or index.ntotal != datastore.count:
        raise DatastoreError(
            f"index {where} holds {index.ntotal} entries of another version of datastore {datastore.path} "
            f"({datastore.count} entries): rebuild it (`knnmt index --force`) before dropping keys"
        )
    shards, freed = drop_shard_keys(datastore, datastore.count)
    if index.settings.get("rerank", 0):  # nothing left to re-rank against
        index.settings["rerank"] = 0
        write_json_atomic(index.path / SETTINGS_FILE, index.settings)
    return {"shards": shards, "bytes_freed": freed}


def _build_index(
    datastore: Datastore,
    config: IndexConfig,
    out: str | Path | None,
    progress: bool,
    force: bool,
    block_runner: BlockRunner | None = None,
) -> SearchIndex:
    target = Path(out) if out is not None else datastore.path / "index"
    if (target / INDEX_FILE).exists() and not force:
        raise DatastoreError(f"an index already exists at {target}; pass --force to rebuild it")
    if datastore.count == 0:
        raise DatastoreError(f"datastore {datastore.path} is empty: nothing to index")
    datastore.check_keys()  # before anything is trained or written
    on_disk = is_on_disk(config, datastore.count, datastore.dim)
    factory = (
        auto_factory(datastore.count, datastore.dim, on_disk) if config.factory == "auto" else config.factory
    )
    try:
        index = faiss.index_factory(datastore.dim, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise UsageError(
            f"faiss cannot build index {factory!r} for dimension {datastore.dim}: {exc}"
        ) from None
    _no_polysemous_training(index)
    if on_disk:
        _check_mappable(index, factory)
        _no_precomputed_table(index)
    elif block_runner is not None:
        raise UsageError("sub-indexes are filled elsewhere only for on-disk lists: build with --on-disk")
    start = time.perf_counter()
    if config.use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 and not on_disk:
        if "fs" in factory.split(",")[-1]:
            logger.info("faiss has no GPU version of fast-scan PQ (%s): building on the CPU", factory)
        else:
            index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        sample = datastore.sample_keys(config.train_size, seed=config.seed)
        logger.info("training %s on %d keys", factory, len(sample))
        index.train(sample)
        del sample
    target.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "version": 2 if on_disk else 1,
        "factory": factory,
        "storage": "disk" if on_disk else "ram",
        "metric": "L2",
        "dim": datastore.dim,
    }
    bar = tqdm(
        total=datastore.count, unit="key", desc=f"index {factory}", disable=not progress, dynamic_ncols=True
    )
    with _assigning_by_graph(index):
        if on_disk:
            index, settings["ivfdata"] = _fill_on_disk(
                index, datastore, config, target, bar, block_runner or _run_here
            )
        else:
            for first, keys in datastore.iter_keys(config.add_chunk):
                _add(index, keys, first)
                bar.update(len(keys))
    bar.close()
    settings.update(
        ntotal=int(index.ntotal),
        nprobe=config.nprobe,
        ef_search=config.ef_search,
        rerank=config.rerank,
        search_threads=config.search_threads,
        coarse_ef_search=config.coarse_ef_search,
        config=config.to_dict(),
        datastore_fingerprint=datastore.fingerprint,
        build_seconds=round(time.perf_counter() - start, 3),
        faiss_version=getattr(faiss, "__version__", "unknown"),
    )
    result = SearchIndex(index, settings)
    result.save(target)  # before set_params: the file keeps the flat coarse quantizer
    _remove_stale_lists(target, settings.get("ivfdata"))
    result.set_params()
    check = round(self_recall(result, datastore, seed=config.seed), 3)
    settings["self_recall@8"] = check
    write_json_atomic(target / SETTINGS_FILE, settings)
    if check < SELF_RECALL_WARNING:
        logger.warning(
            "index %s finds only %.0f%% of stored keys among their own 8 nearest neighbours: its search is "
            "poor for this data (try a larger nprobe, more PQ bytes, or another factory string)",
            factory,
            100 * check,
        )
    logger.info(
        "index %s (%s): %d keys in %.1fs, self-recall@8 %.3f",
        factory,
        settings["storage"],
        index.ntotal,
        settings["build_seconds"],
        check,
    )
    return result


def _ivf_of(index: Any) -> Any:
    """The IVF index inside ``index``, downcast to its class (``IndexIVFPQ``…), or ``None``."""
    found = faiss.try_extract_index_ivf(index)
    return faiss.downcast_index(found) if found is not None else None


def _no_precomputed_table(index: Any) -> None:
    """Make an IVF-PQ index compute its distance tables per query instead of keeping faiss's precomputed
    table: ``nlist·M·256`` floats (32 times the coarse quantizer; 1 GiB at 32,768 lists and 32 bytes
    per code) that an on-disk index would hold privately in RAM. At 1M entries (4,096 lists) searching
    was no slower without it (docs/BENCHMARKS.md, "Scale")."""
    ivf = _ivf_of(index)
    if ivf is not None and hasattr(ivf, "use_precomputed_table"):
        ivf.use_precomputed_table = -1
        ivf.precomputed_table.clear()


def _no_polysemous_training(index: Any) -> None:
    """Skip faiss's polysemous training of IVF-PQ codes, which ``index_factory`` switches on for
    ``PQ<m>`` unless the string ends in ``np``: it reorders each codebook for Hamming-distance
    filtering, which our search never enables (``polysemous_ht`` stays 0), and took three quarters of
    the training time (100k keys, IVF256,PQ32: 75 s with it, 19 s without; docs/BENCHMARKS.md)."""
    ivf = _ivf_of(index)
    if ivf is not None and hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False


def _check_mappable(index: Any, factory: str) -> None:
    """On-disk lists need an IVF index with plain (not fast-scan) codes: raise :class:`UsageError`."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise UsageError(f"{factory!r} has no inverted lists to keep on disk: use an IVF index (or --in-ram)")
    if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):
        raise UsageError(
            f"faiss cannot memory-map the fast-scan codes of {factory!r}: use 8-bit PQ (e.g. "
            f"'{re.sub(r'x4fs(r?)$', '', factory)}') or SQ8 codes on disk, or keep this index in RAM"
        )


def _add(index: Any, keys: np.ndarray, first: int) -> None:
    """Add ``keys [n, dim]`` as entries ``first..first+n-1`` (IVF indexes keep the ids; others number
    them in order, which is the same when filled in order)."""
    if faiss.try_extract_index_ivf(index) is not None and "Gpu" not in type(index).__name__:
        index.add_with_ids(keys, np.arange(first, first + len(keys), dtype=np.int64))
    else:
        index.add(keys)


@contextlib.contextmanager
def _assigning_by_graph(index: Any) -> Iterator[None]:
    """While filling an IVF index of at least :data:`GRAPH_ASSIGN_FROM` lists, assign keys to lists
    through an HNSW graph over the centroids (near-exact at ``efSearch`` 64: a few thousand distance
    computations per key instead of ``nlist``); the flat quantizer is put back afterwards."""
    ivf = faiss.try_extract_index_ivf(index) if "Gpu" not in type(index).__name__ else None
    flat = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if ivf is None or ivf.nlist < GRAPH_ASSIGN_FROM or not isinstance(flat, faiss.IndexFlat):
        yield
        return
    graph = _centroid_graph(flat, ASSIGN_EF_SEARCH, threads=1)  # one thread: every build assigns alike
    ivf.quantizer = graph
    try:
        yield
    finally:
        ivf.quantizer = flat


@dataclasses.dataclass(frozen=True)
class BlockJob:
    """One sub-index of an on-disk fill: the keys of whole shards of a datastore added, with their global
    ids, to a copy of the trained index, written to ``out`` (then merged by the process that builds the
    index). Runs in that process or on a worker that sees the same files (:class:`BlockRunner`)."""

    datastore: str
    #: positions of the shards in the datastore's manifest, consecutive
    shards: tuple[int, ...]
    out: str
    add_chunk: int

    def run(self, trained: np.ndarray, progress: Callable[[int], None] | None = None) -> int:
        """Fill and write the sub-index; ``trained`` is ``faiss.serialize_index`` of the empty trained
        index (with the assignment graph as its quantizer when it has one). Returns its entry count."""
        store = Datastore.open(self.datastore, verify=False)
        # without its precomputed IVF-PQ table: adding never reads it (1 GiB at 32,768 lists)
        block = faiss.deserialize_index(trained, faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
        for position in self.shards:
            shard = store.shards[position]
            keys = shard.load("keys.npy")
            for lo in range(0, shard.count, self.add_chunk):
                chunk = store.codec.decode(keys[lo : lo + self.add_chunk])
                _add(block, chunk, shard.start + lo)
                if progress is not None:
                    progress(len(chunk))
        faiss.write_index(block, self.out)
        return int(block.ntotal)


class BlockRunner(Protocol):
    """Runs the :class:`BlockJob` of an on-disk fill: here, one after the other (the default), or on Ray
    workers (:class:`knnmt.pipeline.distributed.RayBlockRunner`). The sub-indexes are the same."""

    def __call__(self, jobs: Sequence[BlockJob], trained: np.ndarray, bar: Any) -> list[int]:
        """Run every job (``trained``: see :meth:`BlockJob.run`), advancing ``bar`` by the entries added;
        returns each job's entry count, in the order of ``jobs``."""
        ...


def _run_here(jobs: Sequence[BlockJob], trained: np.ndarray, bar: Any) -> list[int]:
    return [job.run(trained, bar.update) for job in jobs]


def _fill_on_disk(
    trained: Any, datastore: Datastore, config: IndexConfig, target: Path, bar: Any, runner: BlockRunner
) -> tuple[Any, str]:
    """Fill ``trained`` (an empty trained IVF index) with every key into on-disk lists in ``target``.

    One sub-index per group of whole shards (at most about :data:`BLOCK_ENTRIES` entries, so memory
    is bounded by one group's codes and ids) is filled by ``runner`` and written to a temporary file;
    faiss then merges the memory-mapped sub-indexes list by list into ``lists-<token>.ivfdata``. Returns
    the index with those lists and the lists file's name.
    """
    ivf: Any = faiss.try_extract_index_ivf(trained)
    blocks_dir = target / f".blocks-{secrets.token_hex(4)}"
    blocks_dir.mkdir()
    name = f"lists-{secrets.token_hex(6)}.ivfdata"
    lists_tmp = target / (name + ".tmp")
    try:
        jobs = [
            BlockJob(str(datastore.path), group, str(blocks_dir / f"{i:05d}.faiss"), config.add_chunk)
            for i, group in enumerate(_shard_groups(datastore, BLOCK_ENTRIES))
        ]
        counts = runner(jobs, faiss.serialize_index(trained), bar)
        if sum(counts) != datastore.count:
            raise DatastoreError(
                f"the sub-indexes hold {sum(counts)} entries, the datastore {datastore.count}"
            )
        # without SKIP_PRECOMPUTE_TABLE faiss gives every sub-index read its own precomputed IVF-PQ
        # table (nlist·M·256 floats: 1 GiB at 32,768 lists), which at 100M entries (27 sub-indexes)
        # ran the merge out of 24 GiB of memory
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
        parts = [faiss.read_index(job.out, flags) for job in jobs]
        with _faiss_chatter_muted():
            lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_tmp))
        inputs = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]
        for part in parts:
            inputs.push_back(faiss.extract_index_ivf(part).invlists)
        with omp_threads(0), _faiss_chatter_muted():
            total = lists.merge_from_multiple(inputs.data(), inputs.size(), False, False)
        del inputs, parts
        lists.filename = name  # where the saved index looks for it (beside itself, IO_FLAG_ONDISK_SAME_DIR)
        fsync_file(lists_tmp)
        os.replace(lists_tmp, target / name)  # index.faiss, written next, is the commit point
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # type: ignore[attr-defined]  # the index owns the lists now
        ivf.ntotal = trained.ntotal = total
        return trained, name
    finally:
        shutil.rmtree(blocks_dir, ignore_errors=True)
        lists_tmp.unlink(missing_ok=True)


def _shard_groups(datastore: Datastore, max_entries: int) -> Iterator[tuple[int, ...]]:
    """Positions of the datastore's shards in order, grouped so that each group holds at most
    ``max_entries`` entries (or one shard, when a shard alone is larger)."""
    group: list[int] = []
    size = 0
    for position, shard in enumerate(datastore.shards):
        if group and size + shard.count > max_entries:
            yield tuple(group)
            group, size = [], 0
        group.append(position)
        size += shard.count
    if group:
        yield tuple(group)


def _remove_stale_lists(directory: Path, keep: str | None) -> None:
    """Delete lists files of earlier on-disk builds in ``directory`` (the new ``index.faiss`` no longer
    refers to them; a process that still maps one keeps reading it until it closes)."""
    for stale in directory.glob("lists-*.ivfdata"):
        if stale.name != keep:
            stale.unlink(missing_ok=True)


#: Below this self-recall a freshly built index is reported as suspicious.
SELF_RECALL_WARNING = 0.5


def self_recall(index: SearchIndex, datastore: Datastore, n: int = 256, k: int = 8, seed: int = 0) -> float:
    """Sanity check of an index: the fraction of ``n`` sampled stored keys that find themselves (or an
    identical key) among their ``k`` nearest neighbours, using the index's own distances (no re-ranking).

    An exact index scores 1.0; a working approximate one is close; a broken one (wrong metric, bad
    training, a factory string that does not suit the data) scores near 0.
    """
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(datastore.count, size=min(n, datastore.count), replace=False))
    queries = datastore.get_keys(ids)
    _, found = index.search(queries, k)
    found_keys = datastore.get_keys(found)  # [n, k, dim]
    same = np.all(found_keys == queries[:, None, :], axis=-1) & (found >= 0)
    hits = (found == ids[:, None]).any(axis=1) | same.any(axis=1)
    return float(hits.mean())


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact ``k`` nearest ids that the approximate search also returned."""
    k = exact_ids.shape[1]
    hits = sum(len(set(a[a >= 0]) & set(e[e >= 0])) for a, e in zip(approx_ids, exact_ids, strict=True))
    return hits / (len(exact_ids) * k)
