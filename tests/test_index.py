"""faiss indexes over a datastore: recall of approximate indexes against exact search, saved settings,
search-time overrides and the datastore identity check.

The vectors are synthetic (20 000 keys of dimension 64 written with :class:`ShardWriter` in 3 shards):
clustered and low-rank like real decoder activations, with no exact ties, so that recall is well defined.
PQ uses 4-bit codes (``PQ16x4``): faiss 1.15 trains 8-bit PQ codebooks ~10x slower (~20 s here), too slow
for the suite; the recall floor below is stated for this index.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from conftest import write_synthetic_datastore
from knnmt.core.config import IndexConfig
from knnmt.core.errors import DatastoreError, IncompatibleError, UsageError
from knnmt.search.index import (
    SETTINGS_FILE,
    SearchIndex,
    auto_factory,
    build_index,
    exact_index,
    recall_at_k,
    self_recall,
)
from knnmt.search.retriever import IndexRetriever
from knnmt.store.datastore import Datastore

N, DIM, K = 20_000, 64, 8
#: recall@8 with every list probed, PQ distances alone (measured: 0.73 for 8-bit look-up tables,
#: 0.46 for fast-scan, whose tables are quantised to 8 bits; on real keys the gap is far smaller)
PQ_RECALL_FLOOR = {"IVF64,PQ16x4": 0.5, "IVF64,PQ16x4fs": 0.35}
#: ... and after re-ranking 8·k candidates by exact distance (measured 1.0 and 0.95)
RERANK_RECALL_FLOOR = 0.9


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Datastore, np.ndarray, np.ndarray]:
    """(datastore, queries [200, 64], exact top-8 ids)."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((N, 8)).astype(np.float32) @ rng.standard_normal((8, DIM)).astype(np.float32)
    centres = 2 * rng.standard_normal((50, DIM)).astype(np.float32)
    keys = latent / np.sqrt(8) + centres[rng.integers(0, 50, N)] + 0.1 * rng.standard_normal((N, DIM))
    store = write_synthetic_datastore(
        tmp_path_factory.mktemp("synthetic") / "ds",
        keys.astype(np.float16),
        rng.integers(0, 100, N).astype(np.int32),
        shard_size=7_000,
    )
    stored = store.get_keys(rng.choice(N, 200, replace=False))
    queries = (stored + 0.05 * rng.standard_normal(stored.shape)).astype(np.float32)
    # exact neighbours by brute force in float64, independent of faiss
    all_keys = store.get_keys(np.arange(N)).astype(np.float64)
    d = (
        (queries.astype(np.float64) ** 2).sum(1)[:, None]
        - 2 * queries @ all_keys.T
        + (all_keys**2).sum(1)[None]
    )
    exact = np.argsort(d, axis=1, kind="stable")[:, :K]
    return store, queries, exact


def test_recall_at_k_hand_example() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [8, 7, 6, 5]])
    assert recall_at_k(approx, exact) == pytest.approx((2 + 4) / 8)


def test_flat_index_is_exact(synthetic, tmp_path: Path) -> None:
    store, queries, exact = synthetic
    index = build_index(store, IndexConfig(factory="auto"), out=tmp_path / "flat", progress=False)
    assert index.factory == "Flat" and index.is_exact and index.ntotal == N
    distances, ids = index.search(queries, K)
    assert recall_at_k(ids, exact) == 1.0
    keys = store.get_keys(ids)
    np.testing.assert_allclose(distances, ((keys - queries[:, None]) ** 2).sum(-1), rtol=1e-4, atol=1e-3)
    assert (np.diff(distances, axis=1) >= 0).all()
    in_memory = exact_index(store)
    np.testing.assert_array_equal(in_memory.search(queries, K)[1], ids)


def test_ivf_flat_probing_every_list_is_exact(synthetic, tmp_path: Path) -> None:
    store, queries, exact = synthetic
    index = build_index(
        store,
        IndexConfig(factory="IVF64,Flat", nprobe=64, train_size=4_000),
        out=tmp_path / "ivf",
        progress=False,
    )
    assert faiss.extract_index_ivf(index.index).nlist == 64
    assert recall_at_k(index.search(queries, K)[1], exact) == 1.0
    index.set_params(nprobe=1)
    assert faiss.extract_index_ivf(index.index).nprobe == 1
    assert recall_at_k(index.search(queries, K)[1], exact) < 1.0


@pytest.mark.parametrize("factory", ["IVF64,PQ16x4", "IVF64,PQ16x4fs"])  # fast-scan: the default kind
def test_ivf_pq_recall_floor_and_saved_settings(synthetic, tmp_path: Path, factory: str) -> None:
    store, queries, exact = synthetic
    out = tmp_path / "ivfpq"
    index = build_index(
        store, IndexConfig(factory=factory, nprobe=64, train_size=4_000), out=out, progress=False
    )
    recall = recall_at_k(index.search(queries, K)[1], exact)
    floor = PQ_RECALL_FLOOR[factory]
    assert recall >= floor, f"recall@{K} {recall:.3f} < {floor}"
    assert recall < 1.0  # it is an approximate index: the floor is meaningful

    saved = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    assert saved["factory"] == factory and saved["nprobe"] == 64
    assert (saved["dim"], saved["ntotal"], saved["metric"]) == (DIM, N, "L2")
    assert saved["datastore_fingerprint"] == store.fingerprint
    assert saved["config"]["train_size"] == 4_000

    loaded = SearchIndex.load(out, store)
    assert faiss.extract_index_ivf(loaded.index).nprobe == 64
    np.testing.assert_array_equal(loaded.search(queries, K)[1], index.search(queries, K)[1])
    overridden = SearchIndex.load(out, store, nprobe=2)
    assert faiss.extract_index_ivf(overridden.index).nprobe == 2 and overridden.settings["nprobe"] == 2
    assert recall_at_k(overridden.search(queries, K)[1], exact) <= recall
    assert json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))["nprobe"] == 64  # file untouched

    # exact re-ranking of the PQ candidates (rerank = 1): true distances, sorted, same candidate set
    groups = np.zeros(len(queries), dtype=np.int64)
    loaded.set_params(rerank=1)
    distances, ids = IndexRetriever(loaded, store).search(queries, K, groups)
    true = ((store.get_keys(ids) - queries[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(distances, true, rtol=1e-5, atol=1e-4)
    assert (np.diff(distances, axis=1) >= 0).all()
    _, pq_ids = loaded.search(queries, K)
    assert all(set(a) == set(b) for a, b in zip(ids, pq_ids, strict=True))
    # rerank = 8 (the default saved with the index): 8k PQ candidates, the k exactly nearest kept
    assert saved["rerank"] == 8 and saved["search_threads"] == 1
    loaded.set_params(rerank=8)
    _, reranked = IndexRetriever(loaded, store).search(queries, K, groups)
    assert recall_at_k(reranked, exact) > recall and recall_at_k(reranked, exact) >= RERANK_RECALL_FLOOR
    loaded.set_params(rerank=0)
    np.testing.assert_array_equal(IndexRetriever(loaded, store).search(queries, K, groups)[1], pq_ids)
    assert IndexRetriever(loaded, store).describe() == f"index({factory})"
    loaded.set_params(rerank=8)
    retriever = IndexRetriever(loaded, store)
    assert retriever.describe() == f"index({factory}, rerank=8)"
    assert not retriever.needs_encoder_states
    retriever.prepare(["any", "sources"])  # nothing to prepare: the same search after it
    np.testing.assert_array_equal(retriever.search(queries, K, groups)[1], reranked)


def test_index_belongs_to_its_datastore(synthetic, tmp_path: Path) -> None:
    store = synthetic[0]
    out = tmp_path / "flat"
    build_index(store, IndexConfig(factory="Flat"), out=out, progress=False)
    with pytest.raises(DatastoreError, match=r"an index already exists.*--force"):
        build_index(store, IndexConfig(factory="Flat"), out=out, progress=False)
    build_index(store, IndexConfig(factory="Flat"), out=out, progress=False, force=True)

    rng = np.random.default_rng(1)
    other = write_synthetic_datastore(
        tmp_path / "other",
        rng.standard_normal((500, DIM)).astype(np.float16),
        rng.integers(0, 10, 500).astype(np.int32),
        shard_size=500,
        fingerprint="another-model",
    )
    with pytest.raises(IncompatibleError, match=r"built for another datastore.*knnmt index --force"):
        SearchIndex.load(out, other)
    with pytest.raises(DatastoreError, match="no index at"):
        SearchIndex.load(tmp_path / "nowhere", store)
    with pytest.raises(UsageError, match="faiss cannot build index 'IVF64,PQ7'"):
        build_index(store, IndexConfig(factory="IVF64,PQ7"), out=tmp_path / "bad", progress=False)


@pytest.mark.parametrize("dim", [64, 100, 257, 512, 1024])
@pytest.mark.parametrize("count", [1_000, 100_000, 100_001, 2_000_000, 300_000_000])
def test_auto_factory_is_valid(count: int, dim: int) -> None:
    factory = auto_factory(count, dim)
    if count <= 100_000:
        assert factory == "Flat"
        return
    index = faiss.index_factory(dim, factory)  # parses, and is the structure announced
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nlist >= 64 and ivf.nlist * 39 <= count
    pq_index = faiss.downcast_index(index)
    pq = pq_index.pq
    if dim % 2:  # fast-scan needs an even number of sub-quantizers: 8-bit PQ instead
        assert isinstance(pq_index, faiss.IndexIVFPQ) and dim % pq.M == 0 and pq.nbits == 8
        return
    assert isinstance(pq_index, faiss.IndexIVFPQFastScan)
    assert dim % pq.M == 0 and pq.M % 2 == 0 and pq.nbits == 4 and pq.M <= 128


def test_self_recall_flags_a_broken_index(synthetic, tmp_path: Path) -> None:
    store = synthetic[0]
    good = build_index(store, IndexConfig(factory="Flat"), out=tmp_path / "flat", progress=False)
    assert good.settings["self_recall@8"] == 1.0
    assert json.loads((tmp_path / "flat" / SETTINGS_FILE).read_text())["self_recall@8"] == 1.0
    # an index whose ids do not point at the datastore's entries: every key is "found" elsewhere
    shuffled = faiss.IndexFlatL2(store.dim)
    keys = store.get_keys(np.arange(store.count))
    shuffled.add(np.ascontiguousarray(keys[::-1]))
    broken = SearchIndex(shuffled, {"factory": "Flat", "dim": store.dim})
    assert self_recall(broken, store) < 0.1


def test_coarse_graph_finds_the_same_lists(synthetic, tmp_path: Path) -> None:
    """The HNSW graph over the IVF centroids replaces the exact coarse scan at load; probing every list,
    both give the same neighbours, and probing a few, nearly the same recall."""
    store, queries, exact = synthetic
    out = tmp_path / "ivf"
    config = IndexConfig(factory="IVF64,Flat", nprobe=64, train_size=4_000, coarse_ef_search=0)
    build_index(store, config, out=out, progress=False)
    flat = SearchIndex.load(out, store)  # saved without the graph
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(flat.index).quantizer), faiss.IndexFlat)
    graph = SearchIndex.load(out, store)
    graph.settings["coarse_ef_search"] = 32
    graph.set_params()
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(graph.index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSWFlat) and quantizer.hnsw.efSearch == 64  # >= nprobe
    np.testing.assert_array_equal(graph.search(queries, K)[1], flat.search(queries, K)[1])
    graph.set_params(nprobe=1)
    flat.set_params(nprobe=1)
    assert faiss.downcast_index(faiss.extract_index_ivf(graph.index).quantizer).hnsw.efSearch == 32
    few_graph = recall_at_k(graph.search(queries, K)[1], exact)
    few_flat = recall_at_k(flat.search(queries, K)[1], exact)
    assert few_flat < 1.0 and few_graph >= few_flat - 0.05
