"""Merging appended shards: the number of shards stays logarithmic in the number of appends, nothing
moves (entry and sentence ids, fingerprints, what search finds, idempotency), a merge interrupted by
``kill -9`` (with the datastore's write lock held throughout) loses nothing and leaves a datastore that
opens, and a manifest with merged shards is refused by readers that predate them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import all_entries, all_sentences
from knnmt.core.config import IndexConfig
from knnmt.core.errors import DatastoreError
from knnmt.pipeline.memory import LiveMemory, compact_memory, load_main_index
from knnmt.search.index import SearchIndex, build_index, exact_index
from knnmt.store import datastore as datastore_module
from knnmt.store import merge as merge_module
from knnmt.store.datastore import MANIFEST, Datastore, read_manifest
from knnmt.store.merge import plan_merge
from knnmt.store.writelock import DatastoreLocked, WriteLock

ROOT = Path(__file__).resolve().parents[1]


def _shard(name: str, count: int, corpus: int = -1) -> dict[str, Any]:
    return {"name": name, "count": count, "sentences": 1, "first_sentence": 0, "corpus": corpus}


def test_plan_merges_runs_of_appended_shards_of_one_tier() -> None:
    shards = [_shard("00000", 5000, corpus=0)] + [_shard(f"{i:05d}", 20) for i in range(1, 4)]
    assert plan_merge({"shards": shards}, fanout=4) is None  # 3 appended ones: not yet
    shards.append(_shard("00004", 25))
    assert plan_merge({"shards": shards}, fanout=4) == (1, 5)
    shards[2] = _shard("00002", 70)  # tier 3 among tier-2 shards (fanout 4: 16-63, 64-255)
    assert plan_merge({"shards": shards}, fanout=4) is None
    assert plan_merge({"shards": shards}, fanout=0) is None


def _open(store: Datastore, model: Any = None, tokenizer: Any = None, **kwargs: Any) -> LiveMemory:
    main, covered, index_dir = load_main_index(store, "auto")
    return LiveMemory(store, main, covered, index_dir, model, tokenizer, compact_every=0, **kwargs)


def _append(path: Path, marian: tuple[Any, Any], pairs: list[tuple[str, str]], fanout: int) -> LiveMemory:
    memory = _open(Datastore.open(path), *marian, merge_fanout=fanout)
    for n, pair in enumerate(pairs):
        memory.add([pair], idempotency_key=f"key-{n}")
        if memory._merging is not None:
            memory._merging.join()  # deterministic for the test: each merge finishes before the next add
    return memory


PAIRS = [(f"memory sentence number {n}", f"speicher satz nummer {n}") for n in range(40)]


def test_appends_are_merged_and_nothing_moves(marian, datastore, tmp_path: Path, monkeypatch) -> None:
    path = shutil.copytree(datastore.path, tmp_path / "ds")
    reference = shutil.copytree(datastore.path, tmp_path / "unmerged")
    unmerged = _append(reference, marian, PAIRS, fanout=0)  # the same appends, never merged
    unmerged.close()
    memory = _append(path, marian, PAIRS, fanout=4)
    try:
        merged, plain = memory.store, Datastore.open(reference)
        appended = len(merged.shards) - len(datastore.shards)
        assert memory.merges >= 8 and appended <= 3 * 3  # 40 appends: at most fanout-1 per tier
        assert len(plain.shards) - len(datastore.shards) == 40
        for name, array in all_entries(merged).items():
            np.testing.assert_array_equal(array, all_entries(plain)[name], err_msg=name)
        assert all_sentences(merged) == all_sentences(plain)
        # what search finds: each appended pair's keys find themselves first, as before the merge
        lo = datastore.count
        queries = merged.get_keys(np.arange(lo, merged.count))
        found, _ = memory.retriever.search(queries, 3, np.zeros(len(queries), dtype=np.int64))
        exact, _ = exact_index(plain).search(queries, 3)  # over the unmerged copy of the same entries
        np.testing.assert_allclose(found, exact, rtol=1e-4, atol=1e-3)
        assert (found[:, 0] < 1e-3).all()  # each key finds itself (or its exact copy) first
        assert memory.get(datastore.manifest["sentences"] + 7)["memory"]  # flags follow the parts
        replay = memory.add([PAIRS[5]], idempotency_key="key-5")  # a retry after its shard was merged
        assert replay.replayed and replay.ids == [datastore.manifest["sentences"] + 5]
    finally:
        memory.close()
    # merging the 40 unmerged shards at once: the fingerprint does not change, so an index saved
    # before the merge still belongs to the datastore
    build_index(Datastore.open(reference), IndexConfig(factory="Flat"), progress=False, force=True)
    fingerprint = Datastore.open(reference).fingerprint
    later = _open(Datastore.open(reference))
    try:
        assert later.merge(wait=True, fanout=4) and later.merges >= 9
    finally:
        later.close()
    assert Datastore.open(reference).fingerprint == fingerprint
    assert SearchIndex.load(reference / "index", Datastore.open(reference)).ntotal == plain.count
    reopened = Datastore.open(path)  # verify(): every merged shard's files match the manifest
    assert read_manifest(path)["version"] == 4
    listed = sorted(s.path.name for s in reopened.shards)
    assert compact_memory(path)["shards"] == len(reopened.shards)
    kept = sorted(d.name for d in (path / "shards").iterdir())
    assert len(kept) > len(listed)  # merged away minutes ago: kept for readers that opened before
    monkeypatch.setattr(merge_module, "MERGE_GRACE_SECONDS", 0.0)
    compact_memory(path)  # past the grace period, the next writer removes them
    assert sorted(d.name for d in (path / "shards").iterdir()) == listed
    monkeypatch.setattr(datastore_module, "VERSIONS", (1, 2, 3))  # a knnmt from before merged shards
    with pytest.raises(DatastoreError, match="version 4 is not supported by this knnmt"):
        read_manifest(path)


_CHILD = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import knnmt.store.merge as merge
import knnmt.pipeline.memory as memory
from knnmt.store.datastore import Datastore
from knnmt.pipeline.memory import LiveMemory, load_main_index

stage, path, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def pause():
    ready.write_text("ready")
    time.sleep(600)

if stage == "before-commit":  # the merged shard is written and renamed; the manifest is not
    real = merge.replace_durably
    def replace(tmp, final):
        real(tmp, final)
        pause()
    merge.replace_durably = replace
else:  # the manifest is committed; the merged-away shards are still there
    real = memory.write_json_atomic
    def commit(file, payload, **kw):
        real(file, payload, **kw)
        if "shards" in payload and any("parts" in s for s in payload["shards"]):
            pause()
    memory.write_json_atomic = commit
store = Datastore.open(path)
main, covered, index_dir = load_main_index(store, "auto")
live = LiveMemory(store, main, covered, index_dir, None, None, compact_every=0, merge_fanout=4)
live.merge(wait=True)
"""


@pytest.mark.parametrize("stage", ["before-commit", "after-commit"])
def test_a_merge_killed_midway_loses_nothing(
    marian, datastore, tmp_path: Path, stage: str, monkeypatch
) -> None:
    path = shutil.copytree(datastore.path, tmp_path / "ds")
    _append(path, marian, PAIRS[:4], fanout=0).close()
    before = Datastore.open(path)
    expected = all_entries(before), all_sentences(before)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(ROOT / "tests")))
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, str(script), stage, str(path), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the merging process died before the pause"
            assert time.monotonic() < deadline, "the merge never reached the pause"
            time.sleep(0.1)
        with pytest.raises(DatastoreLocked):  # the merging writer holds the lock throughout
            WriteLock(path, "test").acquire()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    after = Datastore.open(path)  # loadable, with every entry and pair
    merged = read_manifest(path)["version"] == 4
    assert merged == (stage == "after-commit")
    for name, array in all_entries(after).items():
        np.testing.assert_array_equal(array, expected[0][name], err_msg=name)
    assert all_sentences(after) == expected[1]
    monkeypatch.setattr(merge_module, "MERGE_GRACE_SECONDS", 0.0)  # as if opened some minutes later
    memory = _open(after)  # the next writer takes the lock and clears what the crash left
    try:
        names = sorted(d.name for d in (path / "shards").iterdir())
        assert names == sorted(s.path.name for s in after.shards)
    finally:
        memory.close()
    assert json.loads((path / MANIFEST).read_text())["count"] == before.count
