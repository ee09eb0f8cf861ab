"""Merging small shards into larger ones, so that a memory appended to thousands of times keeps few.

Every append to a translation memory (``POST /memory``, ``knnmt memory add``) is one new shard.
:func:`plan_merge` picks ``fanout`` consecutive appended shards of one size tier (tier ``t`` holds
``fanout**t`` to ``fanout**(t+1) - 1`` entries), :func:`write_merged_shard` writes their files
concatenated into one new shard directory (written and fsynced under a temporary name, then renamed),
and :func:`merged_manifest` replaces their manifest entries with one whose ``parts`` keep the original
entries. Committing that manifest (atomic rename) is the merge's commit point: before it readers see
the small shards, after it the merged one; a crash in between leaves a directory no manifest lists,
removed when the datastore is next opened for writing. Entry and sentence ids do not change, and
fingerprints are made of the ``parts`` (:func:`knnmt.store.datastore.logical_shards`), so indexes
and sentence indexes built before a merge stay valid. Each merge moves a shard up a tier: with
appends of similar size the shard count grows like ``(fanout - 1)·log_fanout(entries)``.

A manifest with merged shards has version 4, which older readers refuse.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.durable import fsync_tree, replace_durably
from .datastore import KEYS_FILE, VECTORS_FILE, Datastore, logical_shards

#: Manifest version of a datastore with merged shards.
MERGE_VERSION = 4
#: Shards merged at once, and the size ratio between tiers.
FANOUT = 8
#: A merge never makes a shard larger than this (a build's shard is about 20,000 sentences).
MAX_MERGED_ENTRIES = 1_000_000
#: A merged shard's old parts are removed only this long after the merge committed: a reader in another
#: process (``knnmt translate`` beside ``knnmt serve``) that opened the datastore before the merge maps
#: their files lazily and must still find them.
MERGE_GRACE_SECONDS = 600.0
#: Row-wise files of a shard, concatenated in order (the sentence files are rebased separately).
_ROW_FILES = (KEYS_FILE, "values.npy", "sentence_ids.npy", "positions.npy")
_CHUNK = 1 << 16


def _tier(count: int, fanout: int) -> int:
    return int(math.log(max(count, 1), fanout) + 1e-9)


def plan_merge(
    manifest: dict[str, Any], fanout: int = FANOUT, max_entries: int = MAX_MERGED_ENTRIES
) -> tuple[int, int] | None:
    """``(first, last)``: manifest shards ``first..last-1`` to merge, or ``None``. Only shards appended
    to the memory (``corpus`` -1) are merged, ``fanout`` consecutive ones of one size tier that agree on
    whether their keys are stored, the leftmost such run first."""
    if fanout < 2:
        return None
    shards = manifest["shards"]
    for first in range(len(shards) - fanout + 1):
        window = shards[first : first + fanout]
        if not all(int(s.get("corpus", 0)) == -1 for s in window):
            continue
        if len({bool(s.get("keys", True)) for s in window}) != 1:
            continue
        if len({_tier(int(s["count"]), fanout) for s in window}) != 1:
            continue
        if sum(int(s["count"]) for s in window) <= max_entries:
            return first, first + fanout
    return None


def write_merged_shard(store: Datastore, first: int, last: int, name: str) -> dict[str, Any]:
    """Write shards ``first..last-1`` of ``store`` concatenated into ``shards/<name>`` (temporary
    directory, fsync, rename); returns the merged manifest entry (with ``parts``). The caller holds the
    datastore's write lock; nothing is committed until the caller writes :func:`merged_manifest`."""
    parts = store.shards[first:last]
    entries = store.manifest["shards"][first:last]
    count, sentences = sum(p.count for p in parts), sum(p.sentences for p in parts)
    final = store.path / "shards" / name
    tmp = final.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keys = all(p.has_keys for p in parts)
    for file in _ROW_FILES + ((VECTORS_FILE,) if store.vector_dim else ()):
        if file == KEYS_FILE and not keys:
            continue
        arrays = [p.load(file) for p in parts]
        rows = count if file != VECTORS_FILE else sentences
        out = np.lib.format.open_memmap(
            tmp / file, mode="w+", dtype=arrays[0].dtype, shape=(rows, *arrays[0].shape[1:])
        )
        at = 0
        for array in arrays:
            for lo in range(0, len(array), _CHUNK):
                chunk = array[lo : lo + _CHUNK]
                out[at : at + len(chunk)] = chunk
                at += len(chunk)
        out.flush()
        del out
    offsets, index = [np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)]
    entry_base = byte_base = 0
    with (tmp / "sentences.jsonl").open("wb") as text:
        for part in parts:
            offsets.append(np.asarray(part.load("offsets.npy"), dtype=np.int64)[1:] + entry_base)
            index.append(np.asarray(part.load("sentences.idx.npy"), dtype=np.int64)[1:] + byte_base)
            with (part.path / "sentences.jsonl").open("rb") as source:
                shutil.copyfileobj(source, text)
            entry_base += part.count
            byte_base = text.tell()
    np.save(tmp / "offsets.npy", np.concatenate(offsets))
    np.save(tmp / "sentences.idx.npy", np.concatenate(index))
    fsync_tree(tmp)
    replace_durably(tmp, final)
    merged: dict[str, Any] = {
        "name": name,
        "count": count,
        "sentences": sentences,
        "first_sentence": parts[0].first_sentence,
        "corpus": -1,
        "skipped_empty": 0,
        "truncated": 0,
        "parts": [part for entry in entries for part in (entry.get("parts") or [entry])],
        "merged_at": round(time.time(), 3),
    }
    if not keys:
        merged["keys"] = False
    return merged


def merged_manifest(manifest: dict[str, Any], first: int, last: int, entry: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``manifest`` with shards ``first..last-1`` replaced by the merged ``entry``."""
    names = [p["name"] for p in logical_shards({"shards": manifest["shards"][first:last]})]
    if names != [p["name"] for p in entry["parts"]]:
        raise ValueError(f"the manifest's shards {first}..{last - 1} are not the merged ones")
    out: dict[str, Any] = json.loads(json.dumps(manifest))
    out["shards"][first:last] = [entry]
    out["version"] = max(int(out["version"]), MERGE_VERSION)
    return out


def merged_away(
    path: Path, manifest: dict[str, Any], grace: float | None = None
) -> tuple[list[Path], set[str]]:
    """``(to remove, to keep)``: the shard directories that only merged shards' ``parts`` still name,
    those merged more than ``grace`` seconds ago (default :data:`MERGE_GRACE_SECONDS`) to remove, the
    names of the more recent ones to keep for readers that may still use them."""
    grace = MERGE_GRACE_SECONDS if grace is None else grace
    listed = {s["name"] for s in manifest["shards"]}
    old: set[str] = set()
    recent: set[str] = set()
    for shard in manifest["shards"]:
        names = {p["name"] for p in shard.get("parts") or []} - listed
        young = time.time() - float(shard.get("merged_at", 0)) < grace
        (recent if young else old).update(names)
    return [path / "shards" / n for n in sorted(old) if (path / "shards" / n).is_dir()], recent
