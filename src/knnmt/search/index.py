"""faiss indexes over a datastore's keys: choose, train, fill in chunks, save, load, search.

Conventions follow faiss: an index is named by a factory string (``"Flat"``,
``"IVF4096,PQ64x4fs"``, ``"OPQ64,IVF4096,PQ64"``, ``"HNSW32"``), metric is squared L2, and search
returns ``(D, I)`` float32/int64 arrays of shape ``[n_queries, k]`` with ``I == -1`` where fewer
than ``k`` neighbours were found. The index is saved with its settings (``index.json``) and the
fingerprint of the datastore it was built for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..core.config import IndexConfig
from ..core.durable import atomic_path, write_json_atomic
from ..core.errors import DatastoreError, IncompatibleError, UsageError
from ..store.datastore import Datastore
from ..store.writelock import WriteLock

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
SETTINGS_FILE = "index.json"
#: Below this many entries the automatic choice is exact search.
EXACT_UP_TO = 100_000


def auto_factory(count: int, dim: int) -> str:
    """The default index for ``count`` keys of dimension ``dim``.

    Exact ``Flat`` search up to :data:`EXACT_UP_TO` entries; beyond, IVF with about
    ``4·sqrt(count)`` lists (a power of two, at least 39 training points per list) and fast-scan PQ
    codes of 4 bits per sub-vector of 4 dimensions (``dim/8`` bytes, at most 64): faiss scores those
    codes with SIMD look-up tables held in registers, which at 2.1M keys and 32 queries per step
    searched 2.4x faster than 8-bit PQ of the same size, at the same recall after re-ranking
    (docs/BENCHMARKS.md, "Speed").
    """
    if count <= EXACT_UP_TO:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
    nlist = int(max(64, min(nlist, 65536, 2 ** math.floor(math.log2(count / 39)))))
    if dim % 2:  # fast-scan packs codes in pairs: an odd dimension gets 8-bit PQ of dim/8 bytes
        m = min(64, max(1, dim // 8))
        while dim % m:
            m -= 1
        return f"IVF{nlist},PQ{m}"
    m = min(128, max(2, dim // 4))
    while dim % m or m % 2:  # sub-vectors must tile the key (m = 2 always does for an even dim)
        m -= 1
    return f"IVF{nlist},PQ{m}x4fs"


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


def _set_search_params(index: Any, nprobe: int, ef_search: int) -> None:
    params = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        with contextlib.suppress(RuntimeError):  # the index has no such parameter (e.g. nprobe on Flat)
            params.set_index_parameter(index, name, value)


#: Links per node of the HNSW graph over an IVF index's coarse centroids.
COARSE_HNSW_M = 32


def _coarse_graph(index: Any, ef_search: int) -> tuple[Any, ...]:
    """Search the coarse centroids of an IVF ``index`` with an HNSW graph (``ef_search`` > 0) instead of
    an exact scan; returns the faiss objects that must outlive ``index``.

    The lists stay as they are (the graph holds the same centroids, so a query still probes the lists
    of its nearest centroids, found approximately); only flat (exact) quantizers of CPU indexes are
    replaced, an HNSW one just gets the new ``efSearch``.
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
    graph = faiss.IndexHNSWFlat(ivf.d, COARSE_HNSW_M)
    graph.hnsw.efConstruction = 2 * COARSE_HNSW_M
    with omp_threads(0):
        graph.add(quantizer.reconstruct_n(0, quantizer.ntotal))
    graph.hnsw.efSearch = ef_search
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

    def save(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        with atomic_path(out / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
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
            index = faiss.read_index(str(index_file))
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
        return result


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
) -> SearchIndex:
    """Train ``config.factory`` on a sample of keys and fill it from the shards chunk by chunk.

    Memory: the training sample (``train_size × dim`` float32) plus one chunk plus the index itself.
    Saved to ``out`` (default ``<datastore>/index``) when given or defaulted.
    """
    with WriteLock(datastore.path, "index"):  # one writer at a time, wherever the index goes
        return _build_index(datastore, config or IndexConfig(), out, progress, force)


def _build_index(
    datastore: Datastore, config: IndexConfig, out: str | Path | None, progress: bool, force: bool
) -> SearchIndex:
    target = Path(out) if out is not None else datastore.path / "index"
    if (target / INDEX_FILE).exists() and not force:
        raise DatastoreError(f"an index already exists at {target}; pass --force to rebuild it")
    if datastore.count == 0:
        raise DatastoreError(f"datastore {datastore.path} is empty: nothing to index")
    factory = auto_factory(datastore.count, datastore.dim) if config.factory == "auto" else config.factory
    try:
        index = faiss.index_factory(datastore.dim, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise UsageError(
            f"faiss cannot build index {factory!r} for dimension {datastore.dim}: {exc}"
        ) from None
    start = time.perf_counter()
    if config.use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        if "fs" in factory.split(",")[-1]:
            logger.info("faiss has no GPU version of fast-scan PQ (%s): building on the CPU", factory)
        else:
            index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        sample = datastore.sample_keys(config.train_size, seed=config.seed)
        logger.info("training %s on %d keys", factory, len(sample))
        index.train(sample)
        del sample
    bar = tqdm(
        total=datastore.count, unit="key", desc=f"index {factory}", disable=not progress, dynamic_ncols=True
    )
    for _, keys in datastore.iter_keys(config.add_chunk):
        index.add(keys)
        bar.update(len(keys))
    bar.close()
    settings = {
        "factory": factory,
        "metric": "L2",
        "dim": datastore.dim,
        "ntotal": int(index.ntotal),
        "nprobe": config.nprobe,
        "ef_search": config.ef_search,
        "rerank": config.rerank,
        "search_threads": config.search_threads,
        "coarse_ef_search": config.coarse_ef_search,
        "config": config.to_dict(),
        "datastore_fingerprint": datastore.fingerprint,
        "build_seconds": round(time.perf_counter() - start, 3),
        "faiss_version": getattr(faiss, "__version__", "unknown"),
    }
    result = SearchIndex(index, settings)
    result.set_params()
    check = round(self_recall(result, datastore, seed=config.seed), 3)
    settings["self_recall@8"] = check
    if check < SELF_RECALL_WARNING:
        logger.warning(
            "index %s finds only %.0f%% of stored keys among their own 8 nearest neighbours: its search is "
            "poor for this data (try a larger nprobe, more PQ bytes, or another factory string)",
            factory,
            100 * check,
        )
    result.save(target)
    logger.info(
        "index %s: %d keys in %.1fs, self-recall@8 %.3f",
        factory,
        index.ntotal,
        settings["build_seconds"],
        check,
    )
    return result


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
