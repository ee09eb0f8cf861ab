"""Every file knnmt leaves in a datastore was fsynced under its final name (or under a temporary name
renamed to it), and every directory holding it was fsynced after its last rename: a crash or power
cut leaves the old file or the new one, never a torn one. Fails if any writer skips its fsync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from knnmt.core.config import BuildConfig, IndexConfig, KNNConfig
from knnmt.core.durable import atomic_path, write_json_atomic
from knnmt.pipeline.build import build_datastore, build_subset_index
from knnmt.pipeline.domain_gate import index_sentences
from knnmt.search.index import build_index
from knnmt.search.subset import SubsetConfig
from knnmt.store.writelock import LOCK_FILE


class _Journal:
    """Records fsyncs (by the path the descriptor points to) and renames, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, Path, Path | None]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd: int) -> None:
            self.events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")), None))
            real_fsync(fd)

        def replace(src: os.PathLike[str] | str, dst: os.PathLike[str] | str, **kw: object) -> None:
            real_replace(src, dst, **kw)  # type: ignore[arg-type]
            self.events.append(("rename", Path(src).resolve(), Path(dst).resolve()))

        def rename(src: os.PathLike[str] | str, dst: os.PathLike[str] | str, **kw: object) -> None:
            real_rename(src, dst, **kw)  # type: ignore[arg-type]
            self.events.append(("rename", Path(src).resolve(), Path(dst).resolve()))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def undurable(self, root: Path) -> list[str]:
        """Files and directories under ``root`` whose content or entry is not known to be durable."""
        synced: set[Path] = set()  # paths (final names) whose content was fsynced
        dir_synced_after: dict[Path, int] = {}  # directory -> index of its last fsync
        last_rename_into: dict[Path, int] = {}  # directory -> index of the last rename into it
        for i, (kind, a, b) in enumerate(self.events):
            if kind == "fsync":
                synced.add(a)
                dir_synced_after[a] = i
            else:
                assert b is not None
                # whatever was durable under the old name (a file, or a directory's contents) now is so
                # under the new one
                moved = {b / p.relative_to(a) for p in synced if p == a or a in p.parents}
                synced |= moved
                last_rename_into[b.parent] = i
        problems = []
        for path in sorted(root.resolve().rglob("*")):
            if path.name == LOCK_FILE:
                continue  # the write lock's holder note: advisory, rewritten by every writer
            if path.is_file() and path not in synced:
                problems.append(f"file not fsynced: {path.relative_to(root.resolve())}")
        for directory, renamed_at in last_rename_into.items():
            inside = root.resolve() in (directory, *directory.parents)
            if inside and dir_synced_after.get(directory, -1) < renamed_at:
                problems.append(f"directory not fsynced after a rename into it: {directory}")
        return problems


def test_every_datastore_file_is_written_durably(
    marian, toy_pairs, make_corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = marian
    path = tmp_path / "ds"
    journal = _Journal(monkeypatch)
    store = build_datastore(
        model, tokenizer, make_corpus(toy_pairs[:30]), path, BuildConfig(shard_sentences=12), progress=False
    )
    store = build_datastore(
        model, tokenizer, make_corpus(toy_pairs[30:40], name="more"), path, append=True, progress=False
    )
    build_index(store, IndexConfig(factory="Flat"), out=path / "index", progress=False)
    index_sentences(store, force=True)
    for search in ("bm25", "dense"):
        build_subset_index(
            store,
            SubsetConfig(sentence_search=search, pq_m=4, pq_bits=4, train_size=2000),
            model=model,
            tokenizer=tokenizer,
            progress=False,
            force=True,
        )
    KNNConfig(k=4, lambda_=0.5).save(path / "knn.json", {"chosen_by": "test"})
    assert journal.undurable(path) == []


def test_the_journal_sees_a_missing_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a plain write, and a rename whose directory is not fsynced, are found."""
    journal = _Journal(monkeypatch)
    write_json_atomic(tmp_path / "good.json", {"a": 1})
    (tmp_path / "torn.json").write_text("{}", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x.tmp").write_text("x", encoding="utf-8")
    with open(sub / "x.tmp", "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(sub / "x.tmp", sub / "x")  # no fsync of sub afterwards
    problems = journal.undurable(tmp_path)
    assert any("torn.json" in p for p in problems)
    assert any(p.startswith("directory not fsynced") and p.endswith("sub") for p in problems)
    assert not any("good.json" in p for p in problems)


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "knn.json"
    write_json_atomic(target, {"k": 8})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"k": ', encoding="utf-8")
        raise RuntimeError("crash while writing")
    assert target.read_text(encoding="utf-8").strip().endswith("}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn.json"]
