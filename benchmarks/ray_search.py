"""Per-step latency of distributed search on Ray against the in-process index (issue 18, item 4).

One command::

    .venv/bin/python benchmarks/ray_search.py            # 1M keys, dim 256, IVF1024,PQ32 on disk

makes a synthetic datastore of clustered random keys (``--entries`` x ``--dim``, fp16, in ``--workdir``,
reused when it is there), builds an on-disk index (``--factory``), and times ``--steps`` decoding steps
of ``--queries`` queries x ``--k`` neighbours (each step a new batch of stored keys plus noise): the
in-process :class:`IndexRetriever` against :class:`RayIndexRetriever` with each of ``--parts`` parts, on
a local Ray started here, with the index's own re-rank and without (``rerank 0``: the index search
alone). Prints one JSON object (median and 90th percentile milliseconds per step).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_datastore(path: Path, entries: int, dim: int, seed: int, shard: int = 100_000) -> Any:
    """A complete datastore of ``entries`` clustered random fp16 keys (``dim``), one entry per sentence."""
    from knnmt.store.datastore import MANIFEST, Datastore
    from knnmt.store.synthetic import write_synthetic_datastore

    if (path / MANIFEST).is_file():
        return Datastore.open(path)
    rng = np.random.default_rng(seed)
    centres = 3 * rng.standard_normal((4096, dim)).astype(np.float32)
    keys = np.empty((entries, dim), dtype=np.float16)
    for lo in range(0, entries, shard):  # in blocks: float32 noise for all keys at once would be 4x larger
        hi = min(lo + shard, entries)
        block = centres[rng.integers(0, len(centres), hi - lo)]
        keys[lo:hi] = block + rng.standard_normal((hi - lo, dim), dtype=np.float32)
    values = rng.integers(0, 32_000, entries).astype(np.int32)
    return write_synthetic_datastore(path, keys, values, shard)


def time_steps(retriever: Any, batches: list[np.ndarray], k: int) -> dict[str, float]:
    """Milliseconds per ``retriever.search`` over ``batches`` (after 10 warm-up steps)."""
    groups = np.zeros(len(batches[0]), dtype=np.int64)
    for queries in batches[:10]:
        retriever.search(queries, k, groups)
    times = []
    for queries in batches:
        start = time.perf_counter()
        retriever.search(queries, k, groups)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="/tmp/knnmt-ray-search", help="datastore and index (reused)")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--factory", default="IVF1024,PQ32")
    parser.add_argument("--storage", choices=["disk", "ram"], default="disk")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--rerank", type=int, default=8, help="the index's re-rank (also timed with 0)")
    parser.add_argument("--queries", type=int, default=32, help="queries per step")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--parts", default="1,2", help="comma-separated numbers of Ray parts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import faiss
    import ray

    from knnmt.core.config import IndexConfig
    from knnmt.search.distributed import RayIndexRetriever
    from knnmt.search.index import INDEX_FILE, SearchIndex, build_index
    from knnmt.search.retriever import IndexRetriever

    work = Path(args.workdir)
    start = time.perf_counter()
    store = make_datastore(work / "ds", args.entries, args.dim, args.seed)
    made = time.perf_counter() - start
    index_dir = work / f"index-{args.factory.replace(',', '_')}-{args.storage}"
    start = time.perf_counter()
    if not (index_dir / INDEX_FILE).is_file():
        config = IndexConfig(factory=args.factory, storage=args.storage, train_size=100_000)
        build_index(store, config, index_dir, progress=False)
    built = time.perf_counter() - start
    index = SearchIndex.load(index_dir, store, nprobe=args.nprobe)

    rng = np.random.default_rng(args.seed + 1)
    batches = []
    for _ in range(args.steps + 10):
        rows = np.sort(rng.choice(store.count, args.queries, replace=False))
        noise = 0.3 * rng.standard_normal((args.queries, store.dim), dtype=np.float32)
        batches.append((store.get_keys(rows) + noise).astype(np.float32))

    parts = [int(p) for p in args.parts.split(",")]
    report: dict[str, Any] = {
        "entries": store.count,
        "dim": store.dim,
        "factory": args.factory,
        "storage": args.storage,
        "nprobe": args.nprobe,
        "queries_per_step": args.queries,
        "k": args.k,
        "steps": args.steps,
        "datastore_seconds": round(made, 1),
        "index_seconds": round(built, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "ray": ray.__version__,
        "results": [],
    }
    ray.init(num_cpus=sum(parts), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        retrievers: list[tuple[str, Any]] = [("in-process", IndexRetriever(index, store))]
        for n in parts:
            retrievers.append((f"ray-{n}", RayIndexRetriever(index, store, parts=n)))
        for rerank in (args.rerank, 0):
            index.set_params(rerank=rerank)
            for name, retriever in retrievers:
                row = {"retriever": name, "rerank": rerank, **time_steps(retriever, batches, args.k)}
                report["results"].append(row)
                print(json.dumps(row), flush=True)
        for _, retriever in retrievers[1:]:
            retriever.close()
    finally:
        ray.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
