"""Live translation memory: add parallel pairs to a datastore while it is being searched.

A served datastore is the on-disk datastore (see :mod:`knnmt.store.datastore`) plus

* a **main index**: the saved faiss index (``<datastore>/index``), which may cover only the first
  shards (a *prefix*) of the datastore, or an in-memory exact index of everything when none is saved;
* a **side index**: an exact ``IndexFlatL2`` over the entries the main index does not cover (pairs
  added through :meth:`LiveMemory.add`), searched together with the main index;
* **tombstones**: sentence ids removed from retrieval (``<datastore>/memory/tombstones.json``);
  their entries are filtered out of search results, which over-fetch so ``k`` stays full;
* **compaction**: a background thread copies the main index, adds the side entries to the copy,
  saves it (when the main index is a saved one) and swaps it in.

Durability: an added batch of pairs becomes one new shard, written to ``shards/NNNNN.tmp``, fsynced,
renamed, and committed by the atomic rename of ``manifest.json``; only then is it acknowledged. The
shard's manifest entry records the request's idempotency key, so key and data commit together and a
retried request adds nothing twice. Shard directories the manifest does not list (a crash mid-append,
or shards merged away) are removed when the memory is opened for writing. Appended shards are merged
in the background (:mod:`knnmt.store.merge`, :meth:`LiveMemory.merge`), so their number stays
logarithmic in the number of appends.

Threads: :meth:`LiveMemory.add` runs the model (teacher forcing), so it must run on the thread that
owns the model; :meth:`delete`, :meth:`get` and compaction may run anywhere. Searches read an
immutable :class:`_State` snapshot, so they never lock.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..core.config import BuildConfig
from ..core.durable import fsync_dir, write_json_atomic
from ..core.errors import CorpusError, DatastoreError, IncompatibleError, KnnmtError, UsageError
from ..hf.registry import check_model
from ..hf.teacher_forcing import TooLongError, encode_pairs, sequence_limit
from ..search.index import INDEX_FILE, SETTINGS_FILE, SearchIndex, exact_index, omp_threads
from ..search.retriever import IndexRetriever, WholeMemoryRetriever, nearest_kept, search_excluding
from ..store.datastore import (
    MANIFEST,
    VECTORS_FILE,
    Datastore,
    Values,
    logical_shards,
    manifest_fingerprint,
    next_shard_name,
    prefixes,
    read_manifest,
    unlisted_shards,
)
from ..store.merge import FANOUT, merged_away, merged_manifest, plan_merge, write_merged_shard
from ..store.removals import write_tombstones
from ..store.writelock import WriteLock
from .build import vector_dim, write_shard

logger = logging.getLogger(__name__)


class ConflictError(KnnmtError):
    """An idempotency key was reused with a different request body."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def request_digest(pairs: Sequence[tuple[str, str]]) -> str:
    """sha256 of a list of ``(source, target)`` pairs: what an idempotency key must keep meaning."""
    return hashlib.sha256(json.dumps([list(p) for p in pairs], ensure_ascii=False).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class AddResult:
    """Outcome of :meth:`LiveMemory.add`: the global sentence ids of the pairs, in request order."""

    ids: list[int]
    entries: int
    replayed: bool = False
    #: ``[len(ids), d_model]`` the stored sentence vectors of the added pairs (``None``: replayed, or a
    #: datastore without sentence vectors), for a domain gate to count them at once
    vectors: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def report(self) -> dict[str, Any]:
        """``{"ids", "entries", "replayed"}`` for JSON output."""
        return {"ids": self.ids, "entries": self.entries, "replayed": self.replayed}


@dataclasses.dataclass(frozen=True)
class _State:
    """What a search needs, swapped as a whole: main index over entries ``[0, main_count)`` and exact
    side index over ``[main_count, count)`` of ``store`` (whose ``removed`` says what to skip)."""

    store: Datastore
    main: SearchIndex
    main_count: int
    side: Any  # faiss.IndexFlatL2


class LiveRetriever(WholeMemoryRetriever):
    """A :class:`knnmt.search.retriever.Retriever` over main + side index that skips removed entries
    (the datastore's :attr:`~knnmt.store.datastore.Datastore.removed`, through the same filter as
    every other retriever: :func:`knnmt.search.retriever.search_excluding`)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def describe(self) -> str:
        s = self.state
        removed = len(s.store.removed.sentences)
        return f"live(index({s.main.factory}), {int(s.side.ntotal)} appended, {removed} removed)"

    def search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``queries [n, dim]`` float32 -> ``(D [n, k] float32, I [n, k] int64)``, ``-1``/``inf`` padded."""
        s = self.state  # one snapshot for the whole search
        total = s.main_count + int(s.side.ntotal)

        def merged(q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
            return self._search(s, q, fetch)

        q = np.ascontiguousarray(queries, dtype=np.float32)
        return search_excluding(merged, q, k, s.store.removed, total)

    @staticmethod
    def _search(s: _State, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``fetch`` nearest of main and side together, removed ones included, sorted."""
        n = len(q)
        parts_d: list[np.ndarray] = []
        parts_i: list[np.ndarray] = []
        if s.main_count:
            d, i = IndexRetriever(s.main, s.store).search_all(q, min(fetch, s.main_count))
            parts_d.append(d)
            parts_i.append(i)
        if s.side.ntotal:
            with omp_threads(int(s.main.settings.get("search_threads", 1))):  # as the main index searches
                d, i = s.side.search(q, min(fetch, int(s.side.ntotal)))
            parts_d.append(d)
            parts_i.append(np.where(i >= 0, i + s.main_count, -1))
        if not parts_i:
            return np.full((n, fetch), np.inf, dtype=np.float32), np.full((n, fetch), -1, dtype=np.int64)
        return nearest_kept(np.concatenate(parts_d, axis=1), np.concatenate(parts_i, axis=1), fetch)


def _prefix_entries(manifest: dict[str, Any], settings: dict[str, Any]) -> int | None:
    """How many leading entries a saved index covers: those of the prefix whose fingerprint it records
    (whole shards as written; a later merge of shards does not change it)."""
    if not isinstance(settings.get("ntotal"), int):
        return None
    for prefix in prefixes(manifest, count=settings["ntotal"]):
        if manifest_fingerprint(prefix) == settings.get("datastore_fingerprint"):
            return int(prefix["count"])
    return None


def _recover_index_dir(index_dir: Path) -> None:
    """Finish or undo an index swap interrupted by a crash (see :meth:`LiveMemory._save_index`)."""
    new, old = index_dir.with_name(index_dir.name + ".new"), index_dir.with_name(index_dir.name + ".old")
    if not index_dir.exists() and old.exists():
        os.replace(old, index_dir)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def load_main_index(store: Datastore, index: str | Path | None) -> tuple[SearchIndex, int, Path | None]:
    """The main index of a served datastore and how many entries it covers.

    Args:
        index: ``"auto"`` (``<datastore>/index`` if saved, else exact in memory), a directory, or ``None``
            (exact in memory).

    Returns:
        ``(index, covered entries, directory to save compactions to or None)``.
    """
    directory = None
    if index == "auto":
        default = store.path / "index"
        _recover_index_dir(default)
        directory = default if (default / INDEX_FILE).is_file() else None
    elif index is not None:
        directory = Path(index)
        _recover_index_dir(directory)
    if directory is None:
        return exact_index(store), store.count, None
    settings_file = directory / SETTINGS_FILE
    if not settings_file.is_file():
        raise DatastoreError(
            f"no index settings at {settings_file}; run `knnmt index` or serve without --index"
        )
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    covered = _prefix_entries(store.manifest, settings)
    if covered is None:
        raise IncompatibleError(
            f"index {directory} was built for another datastore (fingerprint "
            f"{settings.get('datastore_fingerprint')}, {settings.get('ntotal')} entries) than "
            f"{store.path} or "
            f"any of its first shards ({store.count} entries now); rebuild it with `knnmt index --force`"
        )
    loaded = SearchIndex.load(directory)  # may cover a prefix only: checked against it below
    loaded.fit_key_storage(store)
    if loaded.ntotal != covered:
        raise IncompatibleError(
            f"index {directory} holds {loaded.ntotal} vectors, its settings say {covered}"
        )
    return loaded, covered, directory


class LiveMemory:
    """The writable side of a served datastore (see the module docstring).

    Args:
        store: the opened datastore (state complete).
        main: the main index and the number of leading entries it covers.
        index_dir: where compacted indexes are saved (``None``: compaction stays in memory).
        model, tokenizer: the translator's, for teacher forcing added pairs.
        compact_every: side-index entries that start a background compaction (0 = never by itself).
        writable: take the datastore's write lock and clean unfinished shards.
        merge_fanout: appended shards merged at once in the background (:mod:`knnmt.store.merge`;
            0 = never by itself), so the number of shards stays logarithmic in the number of appends.
    """

    def __init__(
        self,
        store: Datastore,
        main: SearchIndex,
        main_count: int,
        index_dir: Path | None,
        model: Any,
        tokenizer: Any,
        *,
        compact_every: int = 4096,
        writable: bool = True,
        merge_fanout: int = FANOUT,
    ) -> None:
        if compact_every < 0:
            raise UsageError(f"compact_every must be >= 0, got {compact_every}")
        if merge_fanout != 0 and merge_fanout < 2:
            raise UsageError(f"merge_fanout must be 0 (never) or >= 2, got {merge_fanout}")
        self.merge_fanout = merge_fanout
        self._merging: threading.Thread | None = None
        self.merges = 0
        #: called with the new datastore view after every append or merge (under the memory's lock)
        self.on_publish: list[Callable[[Datastore], None]] = []
        self._name_floor = 0
        self.path = store.path
        self.model = model
        self.tokenizer = tokenizer
        self.index_dir = index_dir
        self.compact_every = compact_every
        self.writable = writable
        self._lock = threading.RLock()
        self._write_lock = WriteLock(self.path, "serve")
        self._compacting: threading.Thread | None = None
        self.compactions = 0
        if writable:
            self._write_lock.acquire()  # the datastore's one writer until close(); raises if another holds it
        try:
            self._open(store, main, main_count)
        except BaseException:
            self._write_lock.release()
            raise

    def _open(self, store: Datastore, main: SearchIndex, main_count: int) -> None:
        """The rest of ``__init__``, run with the write lock held (when writable)."""
        if self.writable:
            if read_manifest(self.path) != store.manifest:
                raise DatastoreError(
                    f"datastore {self.path} changed after it was opened (another writer finished in "
                    "between); open it again"
                )
            _, recent = merged_away(self.path, store.manifest)
            merged = {p["name"] for p in logical_shards(store.manifest)}
            for orphan in unlisted_shards(self.path, store.manifest):
                if orphan.name in recent:  # merged away lately: a reader elsewhere may still map it
                    continue
                if orphan.name not in merged:
                    logger.warning("removing %s: an unfinished shard from an interrupted append", orphan)
                shutil.rmtree(orphan)
        _ = store.removed  # read the tombstones now: a corrupt file fails the start, not a search
        self._keys = idempotency_keys(store.manifest)
        side = faiss.IndexFlatL2(store.dim)
        if main_count < store.count:
            side.add(store.get_keys(np.arange(main_count, store.count)))
        self.retriever = LiveRetriever(_State(store, main, main_count, side))

    # ---- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for a running merge and compaction and release the write lock."""
        for thread in (self._merging, self._compacting):
            if thread is not None:
                thread.join()
        self._write_lock.release()

    # ---- reading --------------------------------------------------------------------------
    @property
    def store(self) -> Datastore:
        return self.retriever.state.store

    @property
    def side_entries(self) -> int:
        return int(self.retriever.state.side.ntotal)

    @property
    def removed_sentences(self) -> int:
        return len(self.store.removed.sentences)

    def is_removed(self, sentence_id: int) -> bool:
        return self.store.removed.has_sentence(sentence_id)

    def is_memory(self, sentence_id: int) -> bool:
        """Whether a sentence was added through :meth:`add` (rather than built from a corpus)."""
        return is_memory_sentence(self.store, sentence_id)

    def get(self, sentence_id: int) -> dict[str, Any]:
        """The stored pair with ``removed`` and ``memory`` flags; :class:`KeyError` if there is none."""
        return sentence_record(self.store, sentence_id)

    # ---- writing --------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self.writable:
            raise UsageError("this memory is read-only")

    def add(self, pairs: Sequence[tuple[str, str]], idempotency_key: str | None = None) -> AddResult:
        """Append ``pairs`` as one durable shard and make them searchable; runs the model.

        A repeated ``idempotency_key`` with the same pairs returns the first call's ids and adds nothing;
        with other pairs it raises :class:`ConflictError`.
        """
        self._check_writable()
        digest = check_add_request(pairs, idempotency_key)
        with self._lock:
            replay = replayed(self._keys, idempotency_key, digest)
            if replay is not None:
                return replay
            state = self.retriever.state
            manifest = json.loads(json.dumps(state.store.manifest))  # a private copy to commit
            first = int(manifest["sentences"])
            count, name = append_shard(
                self.path,
                manifest,
                pairs,
                self.model,
                self.tokenizer,
                state.store,
                idempotency_key,
                digest,
                name=self._take_name(),
            )
            ids = list(range(first, first + len(pairs)))
            if idempotency_key is not None:
                self._keys[idempotency_key] = (digest, ids)
            self._publish(state, manifest, count)
            added = self.store.shards[-1]  # no merge has run since: it is the new shard
            vectors = np.asarray(added.load(VECTORS_FILE)) if self.store.vector_dim else None
        logger.info("memory: added %d pair(s) (%d entries) as shard %s", len(pairs), count, name)
        if self.merge_fanout:
            self.merge(wait=False)
        self._maybe_compact()
        return AddResult(ids, count, vectors=vectors)

    def _publish(self, state: _State, manifest: dict[str, Any], added: int) -> None:
        """Swap in a state that includes the last ``added`` entries of the committed ``manifest``."""
        store = Datastore(self.path, manifest)
        new_ids = np.arange(state.store.count, store.count)
        new_values = np.asarray(store.shards[-1].load("values.npy"))
        # the new shard's values only, after the packed ones: O(added), not O(datastore) (cached_property)
        store.__dict__["values"] = Values.extend(state.store.values, new_values)
        side = faiss.clone_index(state.side)
        side.add(store.get_keys(new_ids))
        store.share_removals(state.store)  # appended pairs are not removed: the same set, kept shared
        self._swap(dataclasses.replace(state, store=store, side=side))

    def _swap(self, state: _State) -> None:
        """Make ``state`` the one searches read, and tell :attr:`on_publish` (caller holds the lock)."""
        self.retriever.state = state
        for callback in self.on_publish:
            callback(state.store)

    def delete(self, sentence_id: int) -> int:
        """Remove a sentence's entries from retrieval, durably; returns how many entries it had.

        Raises :class:`KeyError` for an unknown id. Deleting twice is harmless.
        """
        self._check_writable()
        with self._lock:
            entries = remove_sentences(self.retriever.state.store, [sentence_id])
        logger.info("memory: removed sentence %d (%d entries) from retrieval", sentence_id, entries)
        return entries

    def _take_name(self) -> str:
        """A shard name no shard, merged shard or part has, nor one taken and not yet committed (an
        append and a merge in flight); caller holds the lock."""
        number = max(int(next_shard_name(self.store.manifest)), self._name_floor)
        self._name_floor = number + 1
        return f"{number:05d}"

    # ---- merging shards ---------------------------------------------------------------------
    def merge(self, wait: bool = True, fanout: int | None = None) -> bool:
        """Merge appended shards (:func:`knnmt.store.merge.plan_merge`, until none is due) in a
        background thread. Returns ``False`` when nothing is due or a merge is already running."""
        self._check_writable()
        fanout = fanout or self.merge_fanout or FANOUT
        with self._lock:
            running = self._merging is not None and self._merging.is_alive()
            if running or plan_merge(self.store.manifest, fanout) is None:
                return False
            thread = threading.Thread(target=self._merge, args=(fanout,), name="knnmt-merge", daemon=True)
            self._merging = thread
            thread.start()
        if wait:
            thread.join()
        return True

    def _merge(self, fanout: int) -> None:
        try:
            for directory in merged_away(self.path, self.store.manifest)[0]:  # earlier merges' parts
                shutil.rmtree(directory, ignore_errors=True)
            while (planned := plan_merge(self.store.manifest, fanout)) is not None:
                first, last = planned
                with self._lock:
                    name = self._take_name()
                entry = write_merged_shard(self.store, first, last, name)  # the slow part, unlocked
                with self._lock:
                    state = self.retriever.state
                    manifest = merged_manifest(state.store.manifest, first, last, entry)
                    write_json_atomic(self.path / MANIFEST, manifest)  # the commit point
                    store = Datastore(self.path, manifest)
                    store.__dict__["values"] = state.store.values  # the same entries in the same order
                    store.share_removals(state.store)
                    self._swap(dataclasses.replace(state, store=store))
                    self.merges += 1
                logger.info(
                    "memory: merged shards %d..%d into %s (%d entries)", first, last - 1, name, entry["count"]
                )
        except Exception:  # a failed merge leaves the shards as they were: nothing is lost
            logger.exception("memory: merging shards failed; the shards stay as they are")

    # ---- compaction -----------------------------------------------------------------------
    def _maybe_compact(self) -> None:
        if self.compact_every and self.side_entries >= self.compact_every:
            self.compact(wait=False)

    def compact(self, wait: bool = True) -> bool:
        """Merge the side index into (a copy of) the main index in a background thread.

        Returns ``False`` when there is nothing to merge or a compaction is already running.
        """
        with self._lock:
            if self.side_entries == 0 or (self._compacting is not None and self._compacting.is_alive()):
                return False
            if self.retriever.state.main.storage == "disk":
                logger.warning(
                    "memory: the main index keeps its lists on disk, which compaction cannot merge into yet; "
                    "the %d added entries stay in the side index (rebuild with `knnmt index --force`)",
                    self.side_entries,
                )
                return False
            thread = threading.Thread(target=self._compact, name="knnmt-compaction", daemon=True)
            self._compacting = thread
            thread.start()
        if wait:
            thread.join()
        return True

    def _compact(self) -> None:
        try:
            state = self.retriever.state
            upto = state.store.count
            merged = faiss.clone_index(state.main.index)
            for lo in range(state.main_count, upto, 65536):
                merged.add(state.store.get_keys(np.arange(lo, min(lo + 65536, upto))))
            settings = {
                **state.main.settings,
                "ntotal": int(merged.ntotal),
                "datastore_fingerprint": manifest_fingerprint(state.store.manifest),
                "compacted": _now(),
            }
            main = SearchIndex(merged, settings, self.index_dir)
            if self.index_dir is not None and self.writable:
                self._save_index(main)
            with self._lock:
                current = self.retriever.state
                side = faiss.IndexFlatL2(current.store.dim)
                if upto < current.store.count:
                    side.add(current.store.get_keys(np.arange(upto, current.store.count)))
                self.retriever.state = dataclasses.replace(current, main=main, main_count=upto, side=side)
                self.compactions += 1
            logger.info("memory: compacted %d side entries into the main index", upto - state.main_count)
        except Exception:  # a failed compaction leaves the side index in place: nothing is lost
            logger.exception("memory: compaction failed; the side index stays in use")

    def _save_index(self, index: SearchIndex) -> None:
        """Replace the saved index directory: write ``.new``, then two renames (``_recover_index_dir``)."""
        assert self.index_dir is not None
        new = self.index_dir.with_name(self.index_dir.name + ".new")
        old = self.index_dir.with_name(self.index_dir.name + ".old")
        shutil.rmtree(new, ignore_errors=True)
        index.save(new)  # durable: SearchIndex.save fsyncs its files and ``new`` (knnmt.core.durable)
        os.replace(self.index_dir, old)
        os.replace(new, self.index_dir)
        fsync_dir(self.index_dir.parent)
        shutil.rmtree(old, ignore_errors=True)


# ---- what the service and `knnmt memory` share -----------------------------------------------


def is_memory_sentence(store: Datastore, sentence_id: int) -> bool:
    """Whether a sentence was added to the memory (service or ``knnmt memory add``), not built from a
    corpus."""
    return any(
        "memory" in s and s["first_sentence"] <= sentence_id < s["first_sentence"] + s["sentences"]
        for s in logical_shards(store.manifest)
    )


def sentence_record(store: Datastore, sentence_id: int) -> dict[str, Any]:
    """The stored pair ``{"id", "src", "tgt", "corpus", "line", "entries", "removed", "memory"}``;
    :class:`KeyError` when there is no such sentence."""
    _require_sentence(store, sentence_id)
    record = dict(store.sentence(sentence_id))
    lo, hi = store.sentence_entries(sentence_id)
    removed = store.removed.has_sentence(sentence_id)
    record.update(entries=hi - lo, removed=removed, memory=is_memory_sentence(store, sentence_id))
    return record


def _require_sentence(store: Datastore, sentence_id: int) -> None:
    """:class:`KeyError` (the message the API and the command show) unless the datastore has the id."""
    if not 0 <= sentence_id < int(store.manifest["sentences"]):
        raise KeyError(f"no sentence {sentence_id} (the datastore has {store.manifest['sentences']})")


def remove_sentences(store: Datastore, sentence_ids: Sequence[int]) -> int:
    """Remove sentences from retrieval everywhere (tombstones, :mod:`knnmt.store.removals`): written
    durably, then in effect for ``store`` and the views sharing its removals. The caller holds the
    datastore's write lock. Returns the entries of the sentences given (removed before or now).

    Raises:
        KeyError: a sentence id the datastore does not have (nothing is written).
    """
    entries = 0
    for sid in sentence_ids:
        _require_sentence(store, sid)
        lo, hi = store.sentence_entries(sid)
        entries += hi - lo
    before = set(store.removed.sentences.tolist())
    after = before | set(sentence_ids)
    if after != before:
        write_tombstones(store.path, after)  # durable before it takes effect
        store.set_removed(after)  # searches already running keep the old set
    return entries


def delete_sentences(path: str | Path, sentence_ids: Sequence[int]) -> dict[str, Any]:
    """``knnmt memory delete``: :func:`remove_sentences` under the datastore's write lock (refused while
    another writer, e.g. a writable ``knnmt serve``, holds it: delete through its API instead).

    Returns ``{"removed": sentence ids, "entries": their entries, "removed_total": all removed}``.
    """
    with WriteLock(path, "memory delete"):
        store = Datastore.open(path, verify=False)
        entries = remove_sentences(store, sentence_ids)
        return {
            "removed": sorted(set(sentence_ids)),
            "entries": entries,
            "removed_total": len(store.removed.sentences),
        }


def idempotency_keys(manifest: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """``{idempotency key: (request sha256, sentence ids)}`` of the appends a manifest records."""
    keys: dict[str, tuple[str, list[int]]] = {}
    for shard in logical_shards(manifest):  # a merged shard keeps its appends' records in its parts
        memo = shard.get("memory")
        if memo and memo.get("idempotency_key"):
            first = int(shard["first_sentence"])
            keys[memo["idempotency_key"]] = (
                memo["request_sha256"],
                list(range(first, first + shard["sentences"])),
            )
    return keys


def check_add_request(pairs: Sequence[tuple[str, str]], idempotency_key: str | None) -> str:
    """The request digest of ``pairs``, after checking there are some and the key is not blank."""
    if not pairs:
        raise UsageError("no pairs to add")
    if idempotency_key is not None and not idempotency_key.strip():
        # an empty key would not be found again after a restart (idempotency_keys): refuse it
        raise UsageError("the idempotency key is empty: give a non-empty key or none")
    return request_digest(pairs)


def replayed(
    keys: dict[str, tuple[str, list[int]]], idempotency_key: str | None, digest: str
) -> AddResult | None:
    """The first call's result when ``idempotency_key`` was used before for the same pairs, ``None``
    when it is new; :class:`ConflictError` when it was used for other pairs."""
    if idempotency_key is None or idempotency_key not in keys:
        return None
    seen_digest, ids = keys[idempotency_key]
    if seen_digest != digest:
        raise ConflictError(
            f"Idempotency-Key {idempotency_key!r} was already used for different pairs "
            f"(ids {ids[0]}..{ids[-1]}); use a new key for a new request"
        )
    return AddResult(ids, 0, replayed=True)


def append_shard(
    path: Path,
    manifest: dict[str, Any],
    pairs: Sequence[tuple[str, str]],
    model: Any,
    tokenizer: Any,
    store: Datastore,
    idempotency_key: str | None,
    digest: str,
    name: str | None = None,
) -> tuple[int, str]:
    """Teacher-force ``pairs`` into one new shard of the datastore at ``path`` and commit it: the shard
    is written and fsynced under a temporary name, renamed, and listed by the atomic replacement of
    the manifest (``manifest``, the caller's private copy, is updated to what was committed). The caller
    holds the write lock. Returns ``(entries, shard name)``.

    Raises:
        UsageError: a pair is longer than the model takes (pairs are kept whole, never cut), or empty.
    """
    first = int(manifest["sentences"])
    rows = [(first + i, i + 1, src, tgt) for i, (src, tgt) in enumerate(pairs)]
    try:  # a memory keeps whole pairs: an over-long one is refused, not cut
        encoded, _ = encode_pairs(
            tokenizer,
            rows,
            max_length=sequence_limit(model, tokenizer),
            truncate=False,
            paths="request pair",
            source_prefix=manifest.get("tokenization", {}).get("source_prefix", "") or "",
        )
    except TooLongError as exc:  # pairs counted from 0, as in the API's other messages
        raise UsageError(
            f"pair {(exc.line or 1) - 1}'s {exc.side} has {exc.tokens} tokens, more than the "
            f"maximum of {exc.limit} the model takes; split it into shorter pairs"
        ) from None
    except CorpusError as exc:
        raise UsageError(str(exc)) from None
    name = name or next_shard_name(manifest)
    count = write_shard(
        path,
        name,
        encoded,
        model,
        tokenizer,
        store.dim,
        vector_dim(manifest),
        BuildConfig(key_layer=str(manifest["key"]["layer"])),
        -1,
        codec=store.codec,
    )
    manifest["shards"].append(
        {
            "name": name,
            "count": count,
            "sentences": len(encoded),
            "first_sentence": first,
            "corpus": -1,
            "skipped_empty": 0,
            "truncated": 0,
            "memory": {"idempotency_key": idempotency_key, "request_sha256": digest, "added": _now()},
        }
    )
    manifest["count"] += count
    manifest["sentences"] += len(encoded)
    write_json_atomic(path / MANIFEST, manifest)  # the commit point
    return count, name


def add_pairs(
    path: str | Path,
    pairs: Sequence[tuple[str, str]],
    model: Any,
    tokenizer: Any,
    idempotency_key: str | None = None,
) -> AddResult:
    """``knnmt memory add``: append ``pairs`` to the datastore at ``path`` as one shard, under its write
    lock, as ``POST /memory`` does (same shard, same idempotency); a running ``knnmt serve`` holds the
    lock, so add through its API then. Searches opened afterwards find the pairs: the saved index covers
    the shards before them, the rest is searched exactly beside it until the index is rebuilt or
    compacted (``knnmt memory compact``).

    Raises:
        IncompatibleError: ``model``/``tokenizer`` are not the ones the datastore was built with.
    """
    digest = check_add_request(pairs, idempotency_key)
    with WriteLock(path, "memory add"):
        store = Datastore.open(path, verify=False)
        check_model(store, model, tokenizer)
        replay = replayed(idempotency_keys(store.manifest), idempotency_key, digest)
        if replay is not None:
            return replay
        manifest = json.loads(json.dumps(store.manifest))
        first = int(manifest["sentences"])
        count, name = append_shard(
            Path(path), manifest, pairs, model, tokenizer, store, idempotency_key, digest
        )
    logger.info("memory: added %d pair(s) (%d entries) as shard %s", len(pairs), count, name)
    return AddResult(list(range(first, first + len(pairs))), count)


def memory_records(store: Datastore, added: bool = True, removed: bool = True) -> Iterator[dict[str, Any]]:
    """``knnmt memory list``: the records (:func:`sentence_record`) of the sentences added to the memory
    and/or removed from retrieval, in id order."""
    wanted: set[int] = set(store.removed.sentences.tolist()) if removed else set()
    if added:
        for shard in logical_shards(store.manifest):
            if "memory" in shard:
                first = int(shard["first_sentence"])
                wanted.update(range(first, first + int(shard["sentences"])))
    for sentence_id in sorted(wanted):
        yield sentence_record(store, sentence_id)


def compact_memory(path: str | Path, fanout: int = FANOUT) -> dict[str, Any]:
    """``knnmt memory compact``, under the datastore's write lock: merge the shards appended to the
    memory (:mod:`knnmt.store.merge`), then add the entries appended since the saved index was built
    to (a copy of) that index and save it, as the service does in the background.

    Returns ``{"merges", "shards", "compacted": entries added to the index, "index": its directory}``.

    Raises:
        DatastoreError: the saved index keeps its lists on disk (rebuild it: ``knnmt index --force``).
    """
    store = Datastore.open(path, verify=False)
    main, covered, index_dir = load_main_index(store, "auto")
    if index_dir is not None and main.storage == "disk" and covered < store.count:
        raise DatastoreError(
            f"the index at {index_dir} keeps its lists on disk, which compaction cannot merge into yet; "
            f"rebuild it: `knnmt index {store.path} --force`"
        )
    memory = LiveMemory(store, main, covered, index_dir, None, None, compact_every=0, merge_fanout=fanout)
    try:
        memory.merge(wait=True)
        merged = 0
        if index_dir is not None:
            if memory.compact(wait=True) and not memory.compactions:
                raise KnnmtError("the compaction failed (the error is logged above); the index is unchanged")
            merged = memory.retriever.state.main_count - covered
        return {
            "merges": memory.merges,
            "shards": len(memory.store.shards),
            "compacted": merged,
            "index": str(index_dir) if index_dir is not None else None,
        }
    finally:
        memory.close()
