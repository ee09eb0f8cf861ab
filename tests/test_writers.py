"""One writer at a time (issue 15, data loss): every writer of a datastore takes its write lock, a second
writer is refused with a message naming the holder and changes nothing, a lock left by a killed process
is recovered, ``--append --force`` is a usage error, and an interrupted append can be undone without
touching what was there before it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import knnmt.pipeline.build
from knnmt.apps.cli import main
from knnmt.core.config import BuildConfig, IndexConfig
from knnmt.core.errors import DatastoreError, UsageError
from knnmt.pipeline.build import build_datastore, build_subset_index, rollback_append
from knnmt.search.index import SearchIndex, build_index
from knnmt.search.subset import SubsetConfig
from knnmt.store.datastore import MANIFEST, Datastore, read_manifest
from knnmt.store.writelock import LOCK_FILE, DatastoreLocked, WriteLock, holder_of

SMALL = BuildConfig(shard_sentences=7, max_tokens=64)


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (the lock file aside: its content says who holds it) -> sha256."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != LOCK_FILE
    }


@pytest.fixture
def small_store(marian, toy_pairs, make_corpus, tmp_path: Path) -> Datastore:
    model, tokenizer = marian
    spec = make_corpus(toy_pairs[:30])
    return build_datastore(model, tokenizer, spec, tmp_path / "ds", SMALL, progress=False)


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


# ---- the lock itself ----------------------------------------------------------------------------------


def test_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    with WriteLock(tmp_path / "ds", "serve"):
        holder = holder_of(tmp_path / "ds")
        assert holder is not None and holder["pid"] == os.getpid() and holder["purpose"] == "serve"
        with pytest.raises(DatastoreLocked) as info:
            WriteLock(tmp_path / "ds", "build --append").acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and "serve" in message and "since 20" in message
        assert "POST /memory" in message and LOCK_FILE in message
    assert holder_of(tmp_path / "ds") is None  # released on exit
    WriteLock(tmp_path / "ds", "build").acquire().release()


def test_lock_of_a_killed_process_is_recovered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ds"
    script = textwrap.dedent(
        f"""
        import sys, time
        from knnmt.store.writelock import WriteLock
        held = WriteLock({str(path)!r}, "build").acquire()
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(DatastoreLocked, match=f"pid {child.pid} "):
            WriteLock(path, "index").acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert json.loads((path / LOCK_FILE).read_text())["pid"] == child.pid  # the dead holder's note stays
    with caplog.at_level(logging.WARNING), WriteLock(path, "index") as lock:
        assert lock.held
        assert json.loads((path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"left by pid {child.pid}" in caplog.text and "no longer holds it" in caplog.text


# ---- every writer takes it ----------------------------------------------------------------------------


def test_every_writer_is_refused_while_another_holds_the_lock(
    marian, small_store: Datastore, toy_pairs, make_corpus, tmp_path: Path
) -> None:
    model, tokenizer = marian
    path = small_store.path
    before = tree_digest(path)
    more = make_corpus(toy_pairs[30:40], name="more")
    writers: dict[str, Any] = {
        "build --append": lambda: build_datastore(
            model, tokenizer, more, path, SMALL, append=True, progress=False
        ),
        "build --force": lambda: build_datastore(
            model, tokenizer, more, path, SMALL, force=True, progress=False
        ),
        "build (resume)": lambda: build_datastore(model, tokenizer, more, path, SMALL, progress=False),
        "index": lambda: build_index(small_store, IndexConfig(factory="Flat"), progress=False),
        "index --subset": lambda: build_subset_index(
            small_store, SubsetConfig(pq_m=8, pq_bits=4, train_size=500), progress=False
        ),
        "rollback": lambda: rollback_append(path),
    }
    with WriteLock(path, "serve"):
        for name, write in writers.items():
            with pytest.raises(DatastoreLocked, match="is being written by pid"):
                write()
            assert tree_digest(path) == before, f"{name} changed the datastore while refused"
    assert not (path / (MANIFEST + ".tmp")).exists()


def test_cli_append_against_a_running_server_fails_and_loses_nothing(
    toy_dir: Path, small_store: Datastore, toy_pairs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported loss: `knnmt build --append` into a served datastore exited 0 and the server's next
    POST /memory overwrote the manifest. Now the append is refused, and the server's write lands."""
    from fastapi.testclient import TestClient

    from knnmt.apps.service import ServeConfig, Service, create_app

    path = small_store.path
    corpus = write_tsv(tmp_path / "more.tsv", toy_pairs[30:40])
    config = ServeConfig(token="t" * 16, allowed_hosts=("testserver",))
    service = Service.open(str(toy_dir / "model"), path, config, index=None)
    try:
        before = tree_digest(path)
        argv = ["build", "--model", str(toy_dir / "model"), "--corpus", str(corpus), "--out", str(path)]
        with caplog.at_level(logging.ERROR):
            assert main([*argv, "--append"]) == 1
        assert "is being written by pid" in caplog.text and "serve" in caplog.text
        assert tree_digest(path) == before
        with TestClient(create_app(service, close_on_shutdown=False)) as client:
            added = client.post(
                "/memory",
                headers={"Authorization": "Bearer " + "t" * 16},
                json={"pairs": [{"source": "a new source", "target": "ein neues Ziel"}]},
            )
            assert added.status_code == 201, added.text
    finally:
        service.close()
    reopened = Datastore.open(path)
    assert reopened.count == small_store.count + added.json()["entries"]
    assert reopened.sentence(added.json()["ids"][0])["tgt"] == "ein neues Ziel"
    assert main([*argv, "--append"]) == 0  # the server is gone: the append goes ahead
    assert read_manifest(path)["sentences"] == int(reopened.manifest["sentences"]) + 10


def test_tune_refuses_early_when_it_could_not_save(
    toy_dir: Path, small_store: Datastore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dev = tmp_path / "dev.en"
    dev.write_text("hello\n", encoding="utf-8")
    argv = ["tune", "--model", str(toy_dir / "model"), "--datastore", str(small_store.path)]
    argv += ["--source", str(dev), "--reference", str(dev)]
    with WriteLock(small_store.path, "serve"), caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    assert "could not save" in caplog.text and "--no-save" in caplog.text
    assert not (small_store.path / "knn.json").exists() and not (small_store.path / "tuning.json").exists()


# ---- --append --force, interrupted appends ------------------------------------------------------------


def test_append_with_force_is_a_usage_error_that_deletes_nothing(
    toy_dir: Path, marian, small_store: Datastore, toy_pairs, make_corpus, tmp_path, caplog
) -> None:
    before = tree_digest(small_store.path)
    corpus = write_tsv(tmp_path / "more.tsv", toy_pairs[30:40])
    argv = ["build", "--model", str(toy_dir / "model"), "--corpus", str(corpus)]
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--out", str(small_store.path), "--append", "--force"]) == 2
    assert "--append and --force together" in caplog.text
    with pytest.raises(UsageError, match="--append and --force together"):
        build_datastore(*marian, make_corpus(toy_pairs[30:40]), small_store.path, append=True, force=True)
    assert tree_digest(small_store.path) == before


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """Make the build raise after ``shards`` more shards are finished (a crash mid-build)."""
    real = knnmt.pipeline.build.write_shard
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> int:
        if calls["n"] == shards:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(knnmt.pipeline.build, "write_shard", flaky)


def test_interrupted_append_is_undone_by_rollback_not_force(
    marian, small_store: Datastore, toy_pairs, make_corpus, tmp_path: Path, monkeypatch, caplog
) -> None:
    model, tokenizer = marian
    path = small_store.path
    index = build_index(small_store, IndexConfig(factory="Flat"), progress=False)  # before the append
    before_manifest = read_manifest(path)
    before = tree_digest(path)
    more = make_corpus(toy_pairs[30:60], name="more")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_datastore(model, tokenizer, more, path, SMALL, append=True, progress=False)
    assert read_manifest(path)["state"] == "building"

    with pytest.raises(DatastoreError) as opened:  # readers say how to get out
        Datastore.open(path)
    assert f"knnmt rollback {path}" in str(opened.value)
    other = make_corpus(toy_pairs[60:70], name="other")
    with pytest.raises(DatastoreError) as appending:  # another append: resume or undo, never --force
        build_datastore(model, tokenizer, other, path, SMALL, append=True, progress=False)
    message = str(appending.value)
    assert "knnmt rollback" in message and f"keeps the {small_store.count} entries" in message
    assert "--force" not in message

    with caplog.at_level(logging.WARNING):
        assert main(["rollback", str(path)]) == 0
    assert "undid the interrupted append" in caplog.text
    assert read_manifest(path) == before_manifest  # exactly the datastore before the append
    assert tree_digest(path) == before  # its shards untouched, the appended ones gone
    reopened = Datastore.open(path)
    assert reopened.fingerprint == small_store.fingerprint
    assert index.settings["datastore_fingerprint"] == reopened.fingerprint  # the old index fits again
    assert SearchIndex.load(path / "index").ntotal == reopened.count

    with caplog.at_level(logging.ERROR):
        assert main(["rollback", str(path)]) == 1  # nothing left to undo
    assert "no interrupted append to undo" in caplog.text
    build_datastore(model, tokenizer, more, path, SMALL, append=True, progress=False)  # a clean append works
    assert Datastore.open(path).count > small_store.count


def test_rollback_of_an_interrupted_first_build_says_what_to_do(
    marian, toy_pairs, make_corpus, tmp_path: Path, monkeypatch
) -> None:
    model, tokenizer = marian
    path = tmp_path / "first"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(RuntimeError):
            build_datastore(model, tokenizer, make_corpus(toy_pairs[:30]), path, SMALL, progress=False)
    with pytest.raises(DatastoreError, match=r"first corpus.*resume it.*--force"):
        rollback_append(path)
    assert read_manifest(path)["state"] == "building"  # untouched: resuming still works
    assert build_datastore(model, tokenizer, make_corpus(toy_pairs[:30]), path, SMALL, progress=False).count


def test_failed_first_build_leaves_no_directory(marian, make_corpus, tmp_path: Path, monkeypatch) -> None:
    """The lock needs the directory before anything is written; a build that fails before its first
    shard removes it again (and with it the lock file)."""
    model, tokenizer = marian
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 0)
        with pytest.raises(RuntimeError):
            build_datastore(model, tokenizer, make_corpus([("a b", "c d")]), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_force_over_a_datastore_keeps_the_lock_while_it_clears(
    marian, small_store: Datastore, toy_pairs, make_corpus
) -> None:
    model, tokenizer = marian
    directory, lock_file = small_store.path.stat().st_ino, (small_store.path / LOCK_FILE).stat().st_ino
    spec = make_corpus(toy_pairs[40:50], name="x")
    rebuilt = build_datastore(model, tokenizer, spec, small_store.path, SMALL, force=True, progress=False)
    assert rebuilt.manifest["sentences"] == 10 and rebuilt.count < small_store.count
    # cleared in place: a writer waiting on the lock could never slip in between removal and rebuild
    assert small_store.path.stat().st_ino == directory
    assert (small_store.path / LOCK_FILE).stat().st_ino == lock_file
