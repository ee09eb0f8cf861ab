"""Datastore build on Ray (``knnmt build --ray``): on a local 2-CPU Ray cluster that this module starts
and stops, the build gives the single-process datastore byte for byte, a worker that dies has its shard
redone, an interrupted build leaves a manifest listing a prefix of the shards and resumes to the same
result; without Ray, or without a reachable cluster, the command says what to do."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import write_text_corpus
from knnmt.apps.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from knnmt.core.config import BuildConfig
from knnmt.core.errors import DatastoreError, UsageError
from knnmt.pipeline.build import ShardJob, build_datastore
from knnmt.pipeline.distributed import ShardWorker, build_datastore_ray
from knnmt.store.corpus import CorpusSpec
from knnmt.store.datastore import MANIFEST, read_manifest, unlisted_shards
from knnmt.store.writelock import LOCK_FILE

#: 6 shards (5 x 7 + 5 kept pairs), batches of a few sentences; sq8 keys, whose codec learns its ranges
#: from shard 00000 alone: every later shard, on whichever worker, must be encoded with them
CONFIG = BuildConfig(shard_sentences=7, max_tokens=64, key_storage="sq8")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray instance of 2 CPUs on the loopback interface, for this module's builds."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # pragma: no cover - another module left one connected
        ray.shutdown()
    # the workers of these tests are classes of this module, which the workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        namespace="knnmt-tests",
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def corpus(toy_pairs: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> CorpusSpec:
    """40 toy pairs with 4 empty ones among them (skipped, counted per shard in the manifest)."""
    pairs = list(toy_pairs[:40])
    pairs.insert(3, ("", "Leere Quelle."))
    pairs.insert(16, ("Empty target.", ""))
    pairs.insert(30, ("", ""))
    pairs.append(("", ""))  # a trailing empty pair: counted by no shard, only by the corpus
    return write_text_corpus(tmp_path_factory.mktemp("ray-corpus"), pairs)


@pytest.fixture(scope="module")
def reference(marian: tuple[Any, Any], corpus: CorpusSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process build of ``corpus``."""
    model, tokenizer = marian
    out = tmp_path_factory.mktemp("ray-reference") / "ds"
    build_datastore(model, tokenizer, corpus, out, CONFIG, progress=False)
    return out


def _without_timestamps(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = json.loads(json.dumps(manifest))
    manifest.pop("created")
    for entry in manifest["corpora"]:
        entry.pop("started")
        entry.pop("finished", None)
    return manifest


def _digests(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def assert_same_datastore(built: Path, reference: Path) -> None:
    """Same manifest but for timestamps, byte-identical shard files, nothing else under ``shards/``."""
    assert _without_timestamps(read_manifest(built)) == _without_timestamps(read_manifest(reference))
    assert _digests(built / "shards") == _digests(reference / "shards")
    assert len(read_manifest(built)["shards"]) == 6


class DiesThenFailsWorker(ShardWorker):
    """Its process exits the first time it writes shard 00001 (a marker file remembers it); shard 00003
    fails, once the shards before it are listed, with the other worker busy on the shards after it."""

    def write(self, job: ShardJob, key: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        marker = job.out.parent / "worker-died"
        if job.name == "00001" and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        if job.name == "00003":  # fail once the driver lists 00000..00002 (00001 redone after the death)
            deadline = time.monotonic() + 120
            while len(read_manifest(job.out)["shards"]) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            raise DatastoreError("simulated failure of shard 00003")
        return super().write(job, key)


def _build_args(toy_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-q",
        "build",
        "--model",
        str(toy_dir / "model"),
        "--source",
        str(toy_dir / "corpus.en"),
        "--target",
        str(toy_dir / "corpus.de"),
        "--out",
        str(out),
        *extra,
    ]


def test_without_ray_the_command_says_how_to_install_it(
    toy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ds"
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    assert main(_build_args(toy_dir, out, "--ray", "auto")) == EXIT_USAGE
    assert "pip install 'knnmt[ray]'" in caplog.text
    assert not out.exists()
    caplog.clear()
    assert main(_build_args(toy_dir, out, "--ray-workers", "2")) == EXIT_USAGE
    assert "need --ray" in caplog.text


def test_an_unreachable_cluster_is_a_clear_error(
    toy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # even if this module's cluster is up
    out = tmp_path / "ds"
    assert main(_build_args(toy_dir, out, "--ray", "127.0.0.1:1")) == EXIT_FAILURE
    assert "cannot connect to the Ray cluster at 127.0.0.1:1" in caplog.text
    assert not out.exists()


@pytest.mark.slow
def test_ray_build_redoes_a_dead_workers_shard_and_resumes_like_a_local_build(
    ray_cluster: Any, toy_dir: Path, corpus: CorpusSpec, reference: Path, tmp_path: Path
) -> None:
    """One scenario (each Ray build starts its workers, which import torch: seconds on 2 cores)."""
    out = tmp_path / "ds"
    with pytest.raises(DatastoreError, match="simulated failure of shard 00003"):  # the worker's own error
        build_datastore_ray(
            str(toy_dir / "model"),
            corpus,
            out,
            CONFIG,
            workers=2,
            progress=False,
            worker_class=DiesThenFailsWorker,
        )
    assert (tmp_path / "worker-died").is_file()  # a worker did die writing 00001 and was restarted
    manifest = read_manifest(out)
    assert manifest["state"] == "building"
    # the manifest lists the prefix of shards before the failed one, shard 00001 included (redone after
    # the death), byte-identical to the local build's; shards written after 00003 are not listed, nor
    # left behind
    assert [s["name"] for s in manifest["shards"]] == ["00000", "00001", "00002"]
    assert manifest["shards"] == read_manifest(reference)["shards"][:3]
    assert unlisted_shards(out, manifest) == []
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == [MANIFEST, "shards"]
    assert _digests(out / "shards") == {
        name: digest for name, digest in _digests(reference / "shards").items() if name < "00003"
    }

    # the same command resumes it, here from the command line, on fresh workers
    args = _build_args(
        toy_dir, out, "--shard-sentences", "7", "--max-tokens", "64", "--key-storage", "sq8", "--ray", "auto"
    )
    args[args.index("--source") : args.index("--out")] = [
        "--source",
        corpus.paths[0],
        "--target",
        corpus.paths[1],
    ]
    assert main([*args, "--ray-workers", "2"]) == EXIT_OK
    assert_same_datastore(out, reference)


def test_on_disk_index_filled_on_ray_equals_the_single_process_one(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``knnmt index --on-disk --ray``: the sub-indexes (one per group of shards) are filled as Ray tasks;
    the merged lists file is byte for byte the one a single process writes, and searches alike."""
    import faiss
    import numpy as np

    from conftest import write_synthetic_datastore
    from knnmt.core.config import IndexConfig
    from knnmt.pipeline.distributed import build_index_ray
    from knnmt.search import index as index_module

    rng = np.random.default_rng(5)
    centres = 2 * rng.standard_normal((30, 32)).astype(np.float32)
    keys = centres[rng.integers(0, 30, 9_000)] + 0.3 * rng.standard_normal((9_000, 32)).astype(np.float32)
    store = write_synthetic_datastore(
        tmp_path / "ds",
        keys.astype(np.float16),
        rng.integers(0, 50, 9_000).astype(np.int32),
        shard_size=2_000,
    )
    monkeypatch.setattr(index_module, "BLOCK_ENTRIES", 4_000)  # 3 sub-indexes
    monkeypatch.setattr(index_module, "GRAPH_ASSIGN_FROM", 16)  # keys assigned through the centroid graph
    config = IndexConfig(factory="IVF32,SQ8", storage="disk", train_size=5_000)
    here = index_module.build_index(store, config, tmp_path / "here", progress=False)
    on_ray = build_index_ray(store, config, tmp_path / "ray", progress=False)
    assert here.ntotal == on_ray.ntotal == 9_000
    lists = [
        (tmp_path / d / i.settings["ivfdata"]).read_bytes() for d, i in (("here", here), ("ray", on_ray))
    ]
    assert hashlib.sha256(lists[0]).digest() == hashlib.sha256(lists[1]).digest()
    queries = keys[::97] + 0.05
    np.testing.assert_array_equal(here.search(queries, 8)[1], on_ray.search(queries, 8)[1])
    assert isinstance(
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(on_ray.index).invlists),
        faiss.OnDiskInvertedLists,
    )
    with pytest.raises(UsageError, match="--on-disk"):
        build_index_ray(store, IndexConfig(storage="ram"), tmp_path / "x", progress=False)
