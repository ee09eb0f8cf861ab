"""Distributed search on Ray (issue 18): an IVF index's lists split into parts held by Ray actors.

Oracle: on a local loopback-only Ray cluster, :class:`RayIndexRetriever` with 2 and 3 parts returns what
the in-process :class:`IndexRetriever` returns over the same index (distances exactly, ids wherever the
distance is not tied), with and without exact re-ranking, for lists in RAM and on disk; translation with
``retrieval="ray"`` equals ``retrieval="index"``. Ray is optional: the tests are skipped without it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from conftest import write_synthetic_datastore
from knnmt.core.config import IndexConfig
from knnmt.core.errors import KnnmtError, UsageError
from knnmt.search import distributed
from knnmt.search.distributed import IndexPart, RayIndexRetriever, merge_results, split_lists
from knnmt.search.index import SearchIndex, build_index, exact_index
from knnmt.search.retriever import IndexRetriever
from knnmt.store.datastore import Datastore

ray = pytest.importorskip("ray")

N, DIM, K = 12_000, 32, 8
FACTORY = "IVF32,SQ8"
NPROBE = 8


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A Ray instance of this process (3 logical CPUs, no dashboard), stopped after the module.

    Ray 2.60 cannot be confined to the loopback interface: ``ray.init(_node_ip_address="127.0.0.1")``
    replaces the address by the machine's own and its gRPC servers listen on all interfaces (checked
    with ``psutil.net_connections``). Ray's token authentication guards it where a token exists
    (``~/.ray/auth_token``); forcing ``RAY_AUTH_MODE=token`` without one fails to start.
    """
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Datastore, np.ndarray, dict[str, Path]]:
    """(datastore of 12 000 clustered keys, queries [64, 32], {"ram": index dir, "disk": index dir})."""
    rng = np.random.default_rng(7)
    centres = 2 * rng.standard_normal((40, DIM)).astype(np.float32)
    keys = centres[rng.integers(0, 40, N)] + 0.3 * rng.standard_normal((N, DIM)).astype(np.float32)
    root = tmp_path_factory.mktemp("distributed")
    store = write_synthetic_datastore(
        root / "ds", keys.astype(np.float16), rng.integers(0, 50, N).astype(np.int32), shard_size=4_000
    )
    queries = store.get_keys(rng.choice(N, 64, replace=False)) + 0.05 * rng.standard_normal((64, DIM))
    dirs = {}
    for storage in ("ram", "disk"):
        config = IndexConfig(factory=FACTORY, storage=storage, nprobe=NPROBE, train_size=5_000, rerank=8)
        build_index(store, config, root / storage, progress=False)
        dirs[storage] = root / storage
    return store, queries.astype(np.float32), dirs


def _assert_same(expected: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> None:
    """Distances equal exactly; ids equal wherever the distance is unique in its row."""
    (de, ie), (dg, ig) = expected, got
    np.testing.assert_array_equal(dg, de)
    tied = np.zeros_like(de, dtype=bool)
    for row in range(len(de)):
        values, counts = np.unique(de[row], return_counts=True)
        tied[row] = np.isin(de[row], values[counts > 1])
    np.testing.assert_array_equal(np.where(tied, -2, ig), np.where(tied, -2, ie))
    for row in range(len(de)):  # tied ids: the same set
        assert set(ig[row][tied[row]]) == set(ie[row][tied[row]])


@pytest.mark.parametrize("storage", ["ram", "disk"])
@pytest.mark.parametrize("parts", [2, 3])
def test_ray_parts_return_what_the_single_index_returns(
    local_ray, synthetic, storage: str, parts: int
) -> None:
    store, queries, dirs = synthetic
    index = SearchIndex.load(dirs[storage], store)
    assert index.storage == storage
    groups = np.zeros(len(queries), dtype=np.int64)
    with RayIndexRetriever(index, store, parts=parts) as remote:
        assert remote.parts == parts and len(remote.ranges) == parts
        assert remote.describe() == f"ray({parts} parts, {FACTORY}, rerank=8)"
        local = IndexRetriever(index, store)
        for rerank in (0, 8):
            index.set_params(rerank=rerank)
            _assert_same(local.search(queries, K, groups), remote.search(queries, K, groups))
        # more neighbours than some probed lists hold, one query, and no query
        index.set_params(rerank=0, nprobe=1)
        _assert_same(index.search(queries[:5], 600), remote.search_index(queries[:5], 600))
        _assert_same(index.search(queries[:1], K), remote.search(queries[:1], K, groups[:1]))
        d, i = remote.search(queries[:0], K, groups[:0])
        assert d.shape == (0, K) and i.shape == (0, K)


def test_ray_finds_the_exact_neighbours_and_the_driver_can_drop_its_lists(local_ray, synthetic) -> None:
    store, queries, dirs = synthetic
    _, exact = exact_index(store).search(queries, K)
    index = SearchIndex.load(dirs["disk"], store, nprobe=32, rerank=8)
    expected = IndexRetriever(index, store).search(queries, K, np.zeros(len(queries), dtype=np.int64))
    with RayIndexRetriever(index, store, parts=2, release_lists=True) as remote:
        assert distributed.list_sizes(remote.ivf).sum() == 0, "the driver holds no lists"
        got = remote.search(queries, K, np.zeros(len(queries), dtype=np.int64))
    _assert_same(expected, got)
    hits = np.mean([len(set(a) & set(b)) / K for a, b in zip(got[1], exact, strict=True)])
    assert hits >= 0.9


def test_a_ray_address_is_checked_before_ray_is_asked() -> None:
    """The build (--ray) and the search (--retrieval ray) connect through one function, which fails in
    seconds with a message where ``ray.init`` would retry for minutes and exit the process."""
    what = "distributed search (--retrieval ray)"
    with pytest.raises(UsageError, match=r"distributed search \(--retrieval ray\) 'head': expected 'auto'"):
        distributed._probe("head", what)
    with pytest.raises(KnnmtError, match=r"cannot connect to the Ray cluster at 127\.0\.0\.1:1"):
        distributed._probe("127.0.0.1:1", what)


def test_split_lists_balances_entries_in_contiguous_ranges() -> None:
    sizes = np.array([10, 10, 10, 10, 0, 40, 5, 5])
    assert split_lists(sizes, 1) == [(0, 8)]
    assert split_lists(sizes, 2) == [(0, 5), (5, 8)]  # 40 and 50 entries (the nearest cut)
    ranges = split_lists(sizes, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 8
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(ranges))
    assert split_lists(np.zeros(3, dtype=np.int64), 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(UsageError, match="cannot split 3 inverted lists into 4 parts"):
        split_lists(np.ones(3), 4)


def test_merge_results_keeps_the_nearest_and_pads_like_faiss() -> None:
    missing = distributed.MISSING_DISTANCE
    a = (np.array([[1.0, 4.0, missing]], dtype=np.float32), np.array([[10, 40, -1]]))
    b = (np.array([[2.0, 3.0, missing]], dtype=np.float32), np.array([[20, 30, -1]]))
    d, i = merge_results([a, b], 4)
    np.testing.assert_array_equal(d, [[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(i, [[10, 20, 30, 40]])
    d, i = merge_results([a], 5)
    np.testing.assert_array_equal(i, [[10, 40, -1, -1, -1]])
    assert d[0, -1] == missing


def test_index_part_without_ray_scans_only_its_lists(synthetic) -> None:
    store, queries, dirs = synthetic
    index = SearchIndex.load(dirs["ram"], store, rerank=0)
    ivf, _ = distributed.ivf_of(index)
    coarse, lists = ivf.quantizer.search(queries, ivf.nprobe)
    ranges = split_lists(distributed.list_sizes(ivf), 2)
    parts = [IndexPart(str(dirs["ram"] / "index.faiss"), False, first, last) for first, last in ranges]
    results = [part.search(queries, lists, coarse, K) for part in parts]
    assignment = np.empty(store.count, dtype=np.int64)  # which list each entry is in
    for number in range(ivf.nlist):
        size = ivf.invlists.list_size(number)
        assignment[faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size).copy()] = number
    for (first, last), (_, ids) in zip(ranges, results, strict=True):
        found = ids[ids >= 0]
        assert ((assignment[found] >= first) & (assignment[found] < last)).all()
    _assert_same(index.search(queries, K), merge_results(results, K))


def test_refuses_what_it_cannot_distribute(local_ray, synthetic, tmp_path: Path) -> None:
    store, _, _ = synthetic
    flat = exact_index(store)
    with pytest.raises(UsageError, match="needs an index saved in a directory"):
        RayIndexRetriever(flat, store)
    flat.save(tmp_path / "flat")
    with pytest.raises(UsageError, match="has none"):
        RayIndexRetriever(SearchIndex.load(tmp_path / "flat", store), store)
    with pytest.raises(UsageError, match="cannot split 32 inverted lists into 33 parts"):
        RayIndexRetriever(SearchIndex.load(synthetic[2]["ram"], store), store, parts=33)


def test_without_ray_installed_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UsageError, match=r"pip install 'knnmt\[ray\]'"):
        distributed.import_ray()


def test_translate_with_ray_equals_the_index(
    local_ray, marian, datastore: Datastore, toy_pairs: list[tuple[str, str]], tmp_path: Path
) -> None:
    from knnmt.core.config import KNNConfig
    from knnmt.pipeline.translator import KNNMT

    out = tmp_path / "index"
    build_index(datastore, IndexConfig(factory="IVF8,SQ8", train_size=2_000), out, progress=False)
    config = KNNConfig(k=8, lambda_=0.7)
    plain = KNNMT.load(marian, datastore.path, index=out, config=config, retrieval="index")
    remote = KNNMT.load(marian, datastore.path, index=out, config=config, retrieval="ray", ray_parts=2)
    try:
        assert remote.retriever.describe().startswith("ray(2 parts, IVF8,SQ8")
        sources = [src for src, _ in toy_pairs[:6]]
        for beam in (1, 3):
            expected = plain.translate(sources, num_beams=beam, max_new_tokens=24)
            got = remote.translate(sources, num_beams=beam, max_new_tokens=24)
            assert [t.token_ids for t in got] == [t.token_ids for t in expected]
    finally:
        remote.retriever.close()  # type: ignore[attr-defined]
    assert ray.is_initialized(), "a retriever that did not start Ray leaves it running"


def test_cli_translate_with_ray_equals_the_index(
    local_ray,
    datastore: Datastore,
    toy_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from knnmt.apps.cli import main

    out = tmp_path / "index"
    build_index(datastore, IndexConfig(factory="IVF8,SQ8", train_size=2_000), out, progress=False)
    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in (toy_dir / "corpus.en").read_text().splitlines()[:4]))
    common = ["-q", "translate", "--model", str(toy_dir / "model"), "--datastore", str(datastore.path)]
    common += ["--index", str(out), "-i", str(source), "--lambda", "0.7", "--max-new-tokens", "24"]
    assert main(common) == 0
    expected = capsys.readouterr().out
    assert main([*common, "--retrieval", "ray", "--ray-parts", "2"]) == 0
    assert capsys.readouterr().out == expected and len(expected.splitlines()) == 4
