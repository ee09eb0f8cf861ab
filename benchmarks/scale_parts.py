"""Two parts of the scale work timed on their own (issue 18): how keys are assigned to IVF lists when an
index is filled, and how Subset kNN-MT scores a batch's subsets at each decoding step.

One command each (prints one JSON object)::

    .venv/bin/python benchmarks/scale_parts.py assign   # HNSW efSearch 64/32/16 against exact assignment
    .venv/bin/python benchmarks/scale_parts.py scorer   # 8-bit IndexPQ against 4-bit fast-scan, per step

``assign``: ``--centroids`` (32,768) keys of the real memory (``runs/scale/real``, made by
``benchmarks/scale.py``) stand in for the coarse centroids, ``--keys`` (50,000) others are assigned to
their nearest one exactly (flat) and through the HNSW graph the index fill uses (built with one thread,
as there), at each efSearch: seconds and the share of keys given their exact nearest centroid.

``scorer``: ``--batch`` (32) random sets of ``--sentences`` (512) sentences of ``--datastore`` (default
``runs/scale/ds-1000000``), one query each (a stored key), ``rerank·k`` = 128 candidates per query:
milliseconds per step for faiss's ``IndexPQ`` over 8-bit codes (PQ32, the former default), one
``IndexIVFPQ.search_preassigned`` call over all subsets (each query sent to its own list), and
``IndexPQFastScan`` over 4-bit codes of the same size (PQ64x4, the default now).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from scale import cpu_name  # noqa: E402  (benchmarks/scale.py, beside this file)

from knnmt.search.index import _centroid_graph, omp_threads  # noqa: E402
from knnmt.search.pq import PQCodebook, pq_subquantizers  # noqa: E402
from knnmt.store.datastore import Datastore  # noqa: E402


def per_call_ms(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return round((time.perf_counter() - start) / repeats * 1000, 2)


def assign(args: argparse.Namespace) -> dict[str, Any]:
    store = Datastore.open(args.datastore or ROOT / "runs" / "scale" / "real", verify=False)
    sample = store.sample_keys(args.centroids + args.keys, seed=1)
    centroids, keys = sample[: args.centroids].copy(), sample[args.centroids :].copy()
    flat = faiss.IndexFlatL2(store.dim)
    flat.add(centroids)
    start = time.perf_counter()
    _, exact = flat.search(keys, 1)
    result: dict[str, Any] = {"exact_seconds": round(time.perf_counter() - start, 2)}
    graph = _centroid_graph(flat, 64, threads=1)
    for ef in (64, 32, 16):
        graph.hnsw.efSearch = ef
        start = time.perf_counter()
        _, found = graph.search(keys, 1)
        result[f"ef{ef}"] = {
            "seconds": round(time.perf_counter() - start, 2),
            "exact_share": round(float((found[:, 0] == exact[:, 0]).mean()), 4),
        }
    return result


def one_call_ms(
    book: PQCodebook,
    codes: list[np.ndarray],
    entries: list[np.ndarray],
    queries: np.ndarray,
    k: int,
    threads: int,
    repeats: int,
) -> float:
    """Milliseconds per step when every subset is a list of one IVF-PQ and each query scans its own."""
    lists: Any = faiss.IndexIVFPQ(faiss.IndexFlatL2(book.dim), book.dim, len(codes), book.m, book.nbits)
    lists.by_residual = False
    faiss.copy_array_to_vector(book.centroids.numpy().reshape(-1), lists.pq.centroids)
    lists.is_trained = True
    for row, (c, e) in enumerate(zip(codes, entries, strict=True)):
        lists.invlists.add_entries(row, len(c), faiss.swig_ptr(e.astype(np.int64)), faiss.swig_ptr(c))
    lists.nprobe = 1
    own = np.arange(len(codes), dtype=np.int64)[:, None]
    zero = np.zeros((len(codes), 1), dtype=np.float32)

    def step() -> None:
        with omp_threads(threads):
            lists.search_preassigned(queries, k, own, zero)

    return per_call_ms(step, repeats)


def scorer(args: argparse.Namespace) -> dict[str, Any]:
    store = Datastore.open(args.datastore or ROOT / "runs" / "scale" / "ds-1000000", verify=False)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(store.provenance(np.arange(store.count))[0]))])
    rng = np.random.default_rng(0)
    sets = [np.sort(rng.choice(len(offsets) - 1, args.sentences, replace=False)) for _ in range(args.batch)]
    entries = [np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in chosen]) for chosen in sets]
    queries = store.get_keys(rng.choice(store.count, args.batch)).astype(np.float32)
    sample = store.sample_keys(50_000, seed=3)
    k = args.candidates
    result: dict[str, Any] = {"entries_per_subset": int(np.mean([len(e) for e in entries]))}
    for label, nbits in (("indexpq_8bit", 8), ("fastscan_4bit", 4)):
        book = PQCodebook.train(sample, pq_subquantizers(store.dim, nbits), nbits)
        codes = [book.encode(store.get_keys(e)) for e in entries]
        per = [book.faiss_index(c, fast_scan=True) for c in codes]

        def step(per: list[Any] = per) -> None:
            with omp_threads(1):
                for row, index in enumerate(per):
                    index.search(queries[row : row + 1], k)

        result[label] = {"ms_per_step": per_call_ms(step, args.repeats), "index": type(per[0]).__name__}
        if nbits == 8:  # the same 8-bit codes as lists of one IVF-PQ, all queries in one call
            for threads in (1, 2):
                result[f"ivf_one_call_8bit_{threads}_threads"] = {
                    "ms_per_step": one_call_ms(book, codes, entries, queries, k, threads, args.repeats)
                }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["assign", "scorer"])
    parser.add_argument("--datastore", type=Path)
    parser.add_argument("--centroids", type=int, default=32_768)
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    result = assign(args) if args.part == "assign" else scorer(args)
    print(json.dumps({"part": args.part, "cpu": cpu_name(), "date": time.strftime("%F"), **result}))


if __name__ == "__main__":
    main()
