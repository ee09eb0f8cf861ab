"""The on-disk datastore: a directory of shards described by ``manifest.json``.

Layout::

    datastore/
      manifest.json            # what, from which model/tokenizer/layer, dim, dtype, count, shards, corpora
      values.npy               # [count] int32: every shard's values in id order, one memory-mapped
                               # file for the search path (when the manifest lists "packed_values")
      shards/00000/keys.npy    # [n, dim] float16, or uint8 with the sq8 key codec (store.keycodec)
                  values.npy   # [n] int32 target token ids y_t
                  sentence_ids.npy  # [n] int64 global sentence id of each entry
                  positions.npy     # [n] int32 target position t (0-based) of each entry
                  offsets.npy       # [sentences + 1] int64 first entry of each sentence in the shard
                  sentences.jsonl   # one {"id", "src", "tgt", "corpus", "line"} per sentence
                  sentences.idx.npy # [sentences + 1] int64 byte offset of each line in sentences.jsonl
                  sentence_vectors.npy  # [sentences, d_model] float16: each source's encoder output,
                                        # mean-pooled and L2-normalised (when the manifest lists
                                        # "sentence_vectors"; datastores built before it have none)

Shards are written under a temporary name and renamed when complete; the manifest is replaced
atomically after each shard, so an interrupted build keeps every finished shard.

Manifest versions: 1 = fp16 keys; 2 = a key codec other than fp16 (``key.codec``), which version-1
readers must refuse; 3 = some shards without ``keys.npy`` (``"keys": false`` in their manifest entry:
key storage ``none``, the keys dropped once an index covered them, see :func:`drop_shard_keys`), which
readers of versions 1-2 must refuse. Readers accept all three.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..core.durable import atomic_path, fsync_dir, replace_durably, write_json_atomic
from ..core.errors import DatastoreError, IncompatibleError
from .keycodec import SQ8_TRAIN_ROWS, KeyCodec, check_codec_fields
from .removals import Removed, read_tombstones

logger = logging.getLogger(__name__)

FORMAT = "knnmt-datastore"
VERSION = 1
#: Manifest versions this code reads (2: keys stored with a codec, see :mod:`knnmt.store.keycodec`;
#: 3: shards whose keys were dropped, see :func:`drop_shard_keys`; 4: merged shards, see
#: :mod:`knnmt.store.merge`).
VERSIONS = (1, 2, 3, 4)
#: The manifest version of a datastore with at least one shard without keys.
KEYLESS_VERSION = 3
KEYS_FILE = "keys.npy"
MANIFEST = "manifest.json"
PACKED_VALUES = "values.npy"
VALUE_DTYPE = np.int32
VECTOR_DTYPE = np.float16
VECTORS_FILE = "sentence_vectors.npy"


#: What a manifest must hold, checked by :func:`read_manifest`: dotted field -> (kind, description).
#: ``shards[]``/``corpora[]`` fields apply to every entry of those lists.
_MANIFEST_SCHEMA: dict[str, tuple[str, str]] = {
    "state": ("state", "'building' or 'complete'"),
    "count": ("count", "an integer >= 0"),
    "sentences": ("count", "an integer >= 0"),
    "model": ("object", "an object"),
    "model.name": ("str", "a string"),
    "model.fingerprint": ("str", "a string"),
    "tokenizer": ("object", "an object"),
    "tokenizer.fingerprint": ("str", "a string"),
    "key": ("object", "an object"),
    "key.layer": ("str", "a string"),
    "key.module": ("str", "a string"),
    "key.dim": ("positive", "an integer >= 1"),
    "shards": ("list", "a list"),
    "shards[].name": ("str", "a string"),
    "shards[].count": ("count", "an integer >= 0"),
    "shards[].sentences": ("count", "an integer >= 0"),
    "shards[].first_sentence": ("count", "an integer >= 0"),
    "corpora": ("list", "a list"),
    "corpora[].paths": ("list", "a list"),
    "corpora[].sentences": ("count", "an integer >= 0"),
}


def _valid(kind: str, value: Any) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "count":
        return is_int and value >= 0
    if kind == "positive":
        return is_int and value >= 1
    if kind == "state":
        return value in ("building", "complete")
    return isinstance(value, {"str": str, "object": dict, "list": list}[kind])


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the datastore at ``path``, checked for format, version and the fields readers use
    (:data:`_MANIFEST_SCHEMA`: present, of the right type, in every shard and corpus entry).

    Raises:
        DatastoreError: naming the manifest file and the first missing or mistyped field.
    """
    file = path / MANIFEST
    if not file.is_file():
        if path.is_dir():
            raise DatastoreError(f"{path} is not a knnmt datastore: {MANIFEST} is missing")
        raise DatastoreError(f"datastore {path} does not exist")
    try:
        manifest: Any = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatastoreError(f"{file}: corrupt manifest ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise DatastoreError(f"{file}: corrupt manifest (not UTF-8 text)") from None
    if not isinstance(manifest, dict):
        raise DatastoreError(f"{file}: corrupt manifest (JSON {type(manifest).__name__}, expected an object)")
    if manifest.get("format") != FORMAT:
        raise DatastoreError(f"{file}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") not in VERSIONS:
        raise DatastoreError(
            f"{file}: version {manifest.get('version')} is not supported by this knnmt (it reads versions "
            f"{', '.join(map(str, VERSIONS))}); upgrade knnmt"
        )
    damaged = "the manifest is damaged: restore it, or rebuild the datastore (`knnmt build --force`)"
    for dotted, (kind, expected) in _MANIFEST_SCHEMA.items():
        head, _, rest = dotted.partition("[].")
        if rest:  # a field of every entry of a list (the list itself was checked before)
            items = [(f"{head}[{i}]", item) for i, item in enumerate(manifest[head])]
            names = rest.split(".")
        else:
            items, names = [("", manifest)], dotted.split(".")
        for where, value in items:
            for name in names:
                if not isinstance(value, dict):  # a list entry that is not an object
                    found = json.dumps(value)[:60]
                    raise DatastoreError(
                        f"{file}: field '{where}' must be an object, found {found}; {damaged}"
                    )
                where = f"{where}.{name}" if where else name
                if name not in value:
                    raise DatastoreError(f"{file}: field '{where}' is missing; {damaged}")
                value = value[name]
            if not _valid(kind, value):
                raise DatastoreError(
                    f"{file}: field '{where}' must be {expected}, found {json.dumps(value)[:60]}; {damaged}"
                )
    problem = check_codec_fields(manifest["key"])
    if problem:
        raise DatastoreError(f"{file}: {problem}; {damaged}")
    if manifest["key"].get("codec") is not None and manifest["version"] < 2:
        raise DatastoreError(f"{file}: a key codec needs manifest version 2, found {manifest['version']}")
    for i, shard in enumerate(manifest["shards"]):
        problem = _check_parts(shard, manifest["version"])
        if problem:
            raise DatastoreError(f"{file}: field 'shards[{i}].parts' {problem}; {damaged}")
        keys = shard.get("keys", True)
        if not isinstance(keys, bool):
            raise DatastoreError(f"{file}: field 'shards[{i}].keys' must be true or false; {damaged}")
        if not keys and manifest["version"] < KEYLESS_VERSION:
            raise DatastoreError(
                f"{file}: shard {shard['name']} has no keys, which needs manifest version "
                f"{KEYLESS_VERSION}, found {manifest['version']}; {damaged}"
            )
    vectors = manifest.get("sentence_vectors")  # optional: datastores built before it have none
    if vectors is not None and not (isinstance(vectors, dict) and _valid("positive", vectors.get("dim"))):
        raise DatastoreError(
            f"{file}: field 'sentence_vectors' must be an object with 'dim' an integer >= 1, found "
            f"{json.dumps(vectors)[:60]}; {damaged}"
        )
    return manifest


def _check_parts(shard: dict[str, Any], version: int) -> str | None:
    """What is wrong with a merged shard's ``parts`` (``None``: fine, or not a merged shard)."""
    parts = shard.get("parts")
    if parts is None:
        return None
    if version < 4:
        return f"needs manifest version 4, found {version}"
    fields = ("count", "sentences", "first_sentence")
    if (
        not isinstance(parts, list)
        or not parts
        or not all(
            isinstance(p, dict)
            and isinstance(p.get("name"), str)
            and all(_valid("count", p.get(f)) for f in fields)
            for p in parts
        )
    ):
        return "must be a list of shard entries (name, count, sentences, first_sentence)"
    if (
        sum(p["count"] for p in parts) != shard["count"]
        or sum(p["sentences"] for p in parts) != shard["sentences"]
    ):
        return "must add up to the shard's count and sentences"
    return None


def manifest_version(key_codec: str) -> int:
    """The manifest version a datastore with keys stored as ``key_codec`` is written with."""
    return VERSION if key_codec == "fp16" else 2


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """Identity of a datastore's content from its manifest (model, layer, count, shards, corpora)."""
    import hashlib

    parts = [manifest["model"]["fingerprint"], str(manifest["key"]["layer"]), str(manifest["count"])]
    parts += [f"{s['name']}:{s['count']}" for s in logical_shards(manifest)]  # the same after a merge
    parts += [str(c.get("sha256")) for c in manifest["corpora"]]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=12).hexdigest()


def logical_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards as they were written: a merged shard (``parts``, :mod:`knnmt.store.merge`) stands for
    the shards it was merged from, in order. What fingerprints and idempotency keys are made of."""
    return [part for shard in manifest["shards"] for part in (shard.get("parts") or [shard])]


def prefixes(
    manifest: dict[str, Any], *, count: int | None = None, sentences: int | None = None
) -> Iterator[dict[str, Any]]:
    """The manifest as it was after its first logical shards were written, for each prefix of ``count``
    entries and/or ``sentences`` sentences (``None``: any): ``count``, ``sentences`` and ``shards``
    (logical) of that prefix, the rest as now; its fingerprint is what an index or sentence index built
    then recorded. Only the prefixes asked for are built (a memory can have thousands of shards)."""
    shards = logical_shards(manifest)
    entries = total = 0
    for n in range(len(shards) + 1):
        if n:
            entries += int(shards[n - 1]["count"])
            total += int(shards[n - 1]["sentences"])
        if count in (None, entries) and sentences in (None, total):
            yield {**manifest, "count": entries, "sentences": total, "shards": shards[:n]}


def next_shard_name(manifest: dict[str, Any]) -> str:
    """The name of the next shard written: one more than every shard name used so far (merged ones
    and their parts included), so a name is never reused."""
    numbers = [int(s["name"]) for s in manifest["shards"] if str(s["name"]).isdigit()]
    numbers += [int(p["name"]) for p in logical_shards(manifest) if str(p["name"]).isdigit()]
    return f"{max(numbers, default=-1) + 1:05d}"


def unlisted_shards(path: Path, manifest: dict[str, Any]) -> list[Path]:
    """Directories under ``path/shards`` that the manifest does not list: ``*.tmp`` shards being written,
    or finished ones whose manifest update never happened (a crash). Readers ignore them."""
    listed = {s["name"] for s in manifest["shards"]}
    root = path / "shards"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name not in listed)


@dataclass(frozen=True)
class Shard:
    """Read-only view of one finished shard (arrays memory-mapped)."""

    path: Path
    start: int  # global id of its first entry
    count: int
    first_sentence: int
    sentences: int
    #: ``False`` once the shard's keys were dropped (key storage ``none``): no ``keys.npy``
    has_keys: bool = True
    _maps: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def load(self, name: str) -> np.ndarray:
        """The shard's array ``name`` memory-mapped read-only (mapped once, then reused)."""
        if name not in self._maps:
            self._maps[name] = np.load(self.path / name, mmap_mode="r")
        return self._maps[name]


class Datastore:
    """A finished datastore opened for reading.

    Entries have global ids ``0..count-1`` in shard order; ``values[i]`` is entry ``i``'s token.
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.dim: int = int(manifest["key"]["dim"])
        self.count: int = int(manifest["count"])
        self.shards: list[Shard] = []
        start = 0
        for info in manifest["shards"]:
            self.shards.append(
                Shard(
                    self.path / "shards" / info["name"],
                    start,
                    int(info["count"]),
                    int(info["first_sentence"]),
                    int(info["sentences"]),
                    bool(info.get("keys", True)),
                )
            )
            start += int(info["count"])
        if start != self.count:
            raise DatastoreError(
                f"{self.path / MANIFEST}: shard counts add up to {start}, manifest says {self.count}"
            )
        self._starts = np.array([s.start for s in self.shards] + [self.count], dtype=np.int64)
        #: how keys are stored (fp16 or sq8); :meth:`get_keys` decodes through it
        self.codec = KeyCodec.from_manifest(manifest["key"])
        #: the removed set, in a one-item list shared by the views of one served datastore
        self._removals: list[Removed | None] = [None]

    # ---- removals (deletions) ---------------------------------------------------------------
    @property
    def removed(self) -> Removed:
        """Sentences and entries removed from retrieval (:mod:`knnmt.store.removals`), read from the
        datastore's tombstones when first asked for; :meth:`set_removed` replaces them."""
        removed = self._removals[0]
        if removed is None:
            removed = self._removals[0] = self._removal(read_tombstones(self.path))
        return removed

    def set_removed(self, sentences: Iterable[int]) -> None:
        """Make ``sentences`` (global ids) the removed set of this open datastore and of the views that
        share its removals (:meth:`share_removals`). The writer that saved them with
        :func:`knnmt.store.removals.write_tombstones` calls it; searches that began before keep the set
        they started with."""
        self._removals[0] = self._removal(sentences)

    def share_removals(self, other: Datastore) -> None:
        """Use (and from now on follow) the removed set of ``other``, a view of this datastore with the
        same first shards (e.g. before an append): so what readers of either are given stays one set."""
        self._removals = other._removals

    def _removal(self, sentences: Iterable[int]) -> Removed:
        ids = np.unique(np.fromiter(sentences, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < int(self.manifest["sentences"]))]
        if not ids.size:
            return Removed.none()
        parts = [np.zeros(0, dtype=np.int64)]
        for shard in self.shards:
            lo, hi = np.searchsorted(ids, [shard.first_sentence, shard.first_sentence + shard.sentences])
            if hi > lo:
                offsets = np.asarray(shard.load("offsets.npy"), dtype=np.int64)
                local = ids[lo:hi] - shard.first_sentence
                starts, ends = offsets[local], offsets[local + 1]
                lengths = ends - starts
                # every entry of each sentence: starts repeated, plus 0..length-1
                flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
                parts.append(shard.start + flat)
        return Removed(ids, np.sort(np.concatenate(parts)))

    def _shard_of_sentence(self, sentence_id: int) -> Shard:
        """The shard holding a global sentence id; :class:`KeyError` when there is none."""
        for shard in self.shards:
            if shard.first_sentence <= sentence_id < shard.first_sentence + shard.sentences:
                return shard
        raise KeyError(f"sentence {sentence_id} is not in datastore {self.path}")

    def sentence_entries(self, sentence_id: int) -> tuple[int, int]:
        """Global entry ids ``[lo, hi)`` of a sentence; :class:`KeyError` when there is none."""
        shard = self._shard_of_sentence(sentence_id)
        offsets = shard.load("offsets.npy")
        local = sentence_id - shard.first_sentence
        return shard.start + int(offsets[local]), shard.start + int(offsets[local + 1])

    @property
    def has_keys(self) -> bool:
        """Whether every entry's key is stored (``False`` once keys were dropped after indexing: then
        no exact re-rank, no index rebuild and no Subset index build; PQ distances only)."""
        return all(s.has_keys for s in self.shards)

    @property
    def key_storage(self) -> str:
        """``fp16`` or ``sq8`` (the codec), ``none`` when no shard has its keys any more, or e.g.
        ``none+sq8`` when shards appended after the drop still have theirs."""
        kept = [s.has_keys for s in self.shards]
        if all(kept):
            return self.codec.name
        return "none" if not any(kept) else f"none+{self.codec.name}"

    def check_keys(self) -> None:
        """Raise :class:`DatastoreError` (what and what to do) unless every entry's key is stored."""
        for shard in self.shards:
            if not shard.has_keys:
                raise self._no_keys(shard)

    def _no_keys(self, shard: Shard) -> DatastoreError:
        return DatastoreError(
            f"datastore {self.path}: the keys of shard {shard.path.name} (entries {shard.start}-"
            f"{shard.start + shard.count - 1}) were dropped after indexing (key storage none): its index "
            "searches by PQ distances only and cannot be rebuilt, re-ranked exactly or turned into a Subset "
            "index; rebuild the datastore (`knnmt build --force`) to have keys again"
        )

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Datastore:
        """Open the datastore at ``path``; with ``verify`` check every shard file against the manifest."""
        p = Path(path)
        manifest = read_manifest(p)
        if manifest.get("state") != "complete":
            raise DatastoreError(
                f"datastore {p} is incomplete (state {manifest.get('state')!r}): an interrupted build "
                "(or one still running); run the same `knnmt build` again to resume it"
                + (
                    f", or `knnmt rollback {p}` to undo the interrupted append"
                    if len(manifest.get("corpora") or []) > 1
                    else ""
                )
            )
        store = cls(p, manifest)
        merged = {part["name"] for part in logical_shards(manifest)}
        for orphan in unlisted_shards(p, manifest):  # a crash between writing a shard and the manifest
            if orphan.name not in merged:  # (merged shards' parts are removed by the next writer)
                logger.warning(
                    "ignoring %s: a shard directory the manifest does not list (unfinished)", orphan
                )
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Check each shard file exists with the shape and dtype the manifest promises."""
        expected = {
            KEYS_FILE: lambda s: ((s.count, self.dim), self.codec.dtype),
            "values.npy": lambda s: ((s.count,), np.dtype(VALUE_DTYPE)),
            "sentence_ids.npy": lambda s: ((s.count,), np.dtype(np.int64)),
            "positions.npy": lambda s: ((s.count,), np.dtype(np.int32)),
            "offsets.npy": lambda s: ((s.sentences + 1,), np.dtype(np.int64)),
            "sentences.idx.npy": lambda s: ((s.sentences + 1,), np.dtype(np.int64)),
        }
        if self.vector_dim:
            expected[VECTORS_FILE] = lambda s: ((s.sentences, self.vector_dim), np.dtype(VECTOR_DTYPE))
        for shard in self.shards:
            for name, want in expected.items():
                if name == KEYS_FILE and not shard.has_keys:
                    continue
                file = shard.path / name
                if not file.is_file():
                    raise DatastoreError(
                        f"shard file {file} is missing (the manifest lists shard {shard.path.name})"
                    )
                shape, dtype = want(shard)
                try:
                    arr = np.load(file, mmap_mode="r")
                except ValueError as exc:  # truncated files fail to map
                    raise DatastoreError(f"shard file {file} is truncated or corrupt: {exc}") from None
                if arr.shape != shape or arr.dtype != dtype:
                    raise DatastoreError(
                        f"shard file {file}: expected shape {shape} {dtype}, found {arr.shape} {arr.dtype}"
                    )

    # ---- metadata -------------------------------------------------------------------------
    @property
    def key_layer(self) -> str:
        return str(self.manifest["key"]["layer"])

    @property
    def fingerprint(self) -> str:
        """Identity of the datastore's content (model, layer, count, shards, corpus checksums): indexes
        record it."""
        return manifest_fingerprint(self.manifest)

    def check_compatible(self, model_fingerprint: str, tokenizer_fingerprint: str, dim: int) -> None:
        """Raise :class:`IncompatibleError` unless this datastore was built with that model and tokenizer."""
        want = self.manifest
        if want["model"]["fingerprint"] != model_fingerprint:
            raise IncompatibleError(
                f"datastore {self.path} was built with model {want['model']['name']!r} "
                f"(fingerprint {want['model']['fingerprint']}), but the loaded model's fingerprint is "
                f"{model_fingerprint}; rebuild the datastore with this model"
            )
        if want["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
            raise IncompatibleError(
                f"datastore {self.path} was built with another tokenizer (fingerprint "
                f"{want['tokenizer']['fingerprint']}, loaded {tokenizer_fingerprint})"
            )
        if self.dim != dim:
            raise IncompatibleError(
                f"datastore {self.path} has {self.dim}-dimensional keys, the model gives {dim}"
            )

    @property
    def vector_dim(self) -> int:
        """Dimension of the stored source sentence vectors, 0 when the datastore has none (built before
        they were stored)."""
        info = self.manifest.get("sentence_vectors")
        return int(info["dim"]) if info else 0

    def iter_sentence_vectors(self) -> Any:
        """Yield ``(first_sentence_id, vectors)`` per shard, ``vectors`` float32 ``[sentences, d_model]``
        unit rows (the mean-pooled encoder output of each source), over all sentences in order."""
        if not self.vector_dim:
            raise DatastoreError(
                f"datastore {self.path} has no sentence vectors (built by an older knnmt); rebuild it, or "
                f"build the dense sentence index with "
                f"`knnmt index {self.path} --subset --sentence-search dense`"
            )
        for shard in self.shards:
            yield shard.first_sentence, np.asarray(shard.load(VECTORS_FILE), dtype=np.float32)

    # ---- arrays ---------------------------------------------------------------------------
    @cached_property
    def values(self) -> np.ndarray | Values:
        """All values, ``[count]`` int32, to gather by entry ids (``values[ids]``): the packed
        ``values.npy`` memory-mapped (page cache, not private memory) when it covers every entry; when
        shards were appended since it was written (the service, ``knnmt memory add``) a :class:`Values`
        view of it plus the appended shards' values in memory; without a packed file (datastores from
        before it) the shards' values concatenated in memory (4 bytes per entry)."""
        if not self.shards:
            return np.zeros(0, dtype=VALUE_DTYPE)
        covered = self._packed_prefix()
        if not covered:
            return np.concatenate([np.asarray(s.load("values.npy")) for s in self.shards])
        values = np.load(self.path / PACKED_VALUES, mmap_mode="r")
        if covered == self.count:
            return values
        later = [s for s in self.shards if s.start + s.count > covered]  # from the one holding `covered`
        tail = np.concatenate([np.asarray(s.load("values.npy")) for s in later])[covered - later[0].start :]
        return Values(values, tail)

    def _packed_prefix(self) -> int:
        """How many leading entries the packed ``values.npy`` holds (0: none, or no usable file)."""
        packed = self.manifest.get("packed_values")
        if not isinstance(packed, dict):
            return 0
        matching = (
            prefixes(self.manifest, count=packed["count"]) if isinstance(packed.get("count"), int) else ()
        )
        for prefix in matching:
            if manifest_fingerprint(prefix) == packed.get("fingerprint"):
                try:
                    values = np.load(self.path / PACKED_VALUES, mmap_mode="r")
                except (OSError, ValueError):
                    break
                if values.shape == (prefix["count"],) and values.dtype == VALUE_DTYPE:
                    return int(prefix["count"])
                break
        logger.warning("%s does not match the manifest: reading the shards' values instead", PACKED_VALUES)
        return 0

    def _gather(self, name: str, ids: np.ndarray, width: int | None, dtype: Any) -> np.ndarray:
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        shape = (*np.shape(ids), width) if width else np.shape(ids)
        out = np.zeros((flat.size, width) if width else flat.size, dtype=dtype)
        valid = np.nonzero((flat >= 0) & (flat < self.count))[0]
        order = valid[np.argsort(flat[valid], kind="stable")]  # sorted reads are kinder to the page cache
        wanted = flat[order]
        bounds = np.searchsorted(wanted, self._starts)  # [shards + 1]: each shard's slice of ``wanted``
        for s in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():  # only the shards that hold an id
            shard = self.shards[s]
            if name == KEYS_FILE and not shard.has_keys:
                raise self._no_keys(shard)
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            out[order[lo:hi]] = shard.load(name)[wanted[lo:hi] - shard.start]
        return out.reshape(shape)

    def get_keys(self, ids: np.ndarray) -> np.ndarray:
        """Keys of entry ids (any shape, ``-1`` gives zeros) as float32 ``[*ids.shape, dim]``, decoded by
        the datastore's key codec (exact for fp16; within 1/510 of each dimension's range for sq8).

        Raises:
            DatastoreError: an id lies in a shard whose keys were dropped (:attr:`has_keys`).
        """
        stored = self._gather(KEYS_FILE, ids, self.dim, self.codec.dtype)
        return self.codec.decode(stored)

    def provenance(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sentence_ids, positions)`` of entry ids (``-1`` ids give ``-1``)."""
        flat = np.asarray(ids, dtype=np.int64)
        sent = self._gather("sentence_ids.npy", flat, None, np.int64)
        pos = self._gather("positions.npy", flat, None, np.int64)
        missing = (flat < 0) | (flat >= self.count)
        sent[missing] = -1
        pos[missing] = -1
        return sent, pos

    def iter_keys(self, chunk: int = 100_000) -> Any:
        """Yield ``(start_id, keys)`` with ``keys`` float32 ``[<=chunk, dim]`` over all entries in order.

        Raises:
            DatastoreError: before the first chunk, when a shard's keys were dropped.
        """
        self.check_keys()
        for shard in self.shards:
            keys = shard.load(KEYS_FILE)
            for lo in range(0, shard.count, chunk):
                yield shard.start + lo, self.codec.decode(keys[lo : lo + chunk])

    def sample_keys(self, n: int, seed: int = 0) -> np.ndarray:
        """``min(n, count)`` keys drawn uniformly without replacement, float32 ``[m, dim]``."""
        rng = np.random.default_rng(seed)
        ids = np.sort(rng.choice(self.count, size=min(n, self.count), replace=False))
        return self.get_keys(ids)

    def sentence(self, sentence_id: int) -> dict[str, Any]:
        """The stored pair ``{"id", "src", "tgt", "corpus", "line"}`` of a global sentence id."""
        shard = self._shard_of_sentence(sentence_id)
        offsets = shard.load("sentences.idx.npy")
        local = sentence_id - shard.first_sentence
        with (shard.path / "sentences.jsonl").open("rb") as handle:
            handle.seek(int(offsets[local]))
            record: dict[str, Any] = json.loads(handle.read(int(offsets[local + 1] - offsets[local])))
        return record

    def describe(self) -> dict[str, Any]:
        """A summary for ``knnmt info``."""
        m = self.manifest
        size = sum(f.stat().st_size for s in self.shards for f in s.path.iterdir())
        return {
            "path": str(self.path),
            "state": m["state"],
            "entries": self.count,
            "sentences": m["sentences"],
            "dim": self.dim,
            "key_dtype": m["key"]["dtype"],
            "key_storage": self.key_storage,
            "key_layer": self.key_layer,
            "key_module": m["key"]["module"],
            "model": m["model"]["name"],
            "shards": len(self.shards),
            "bytes_on_disk": size,
            # what the domain gate's sentence vectors add (0 for datastores built before they were kept)
            "sentence_vector_bytes": sum(
                f.stat().st_size for s in self.shards if (f := s.path / VECTORS_FILE).is_file()
            ),
            "corpora": [
                {k: c[k] for k in ("paths", "sentences", "skipped_empty", "truncated", "state")}
                for c in m["corpora"]
            ],
        }


class ShardWriter:
    """Writes one shard into a temporary directory, then publishes it with a rename.

    Keys are written as fp16 (``keys``, a memory map); with another ``codec`` they are encoded when the
    shard is finished (an untrained codec first learns from this shard: the caller then records
    ``codec.manifest_fields()`` in the manifest).
    """

    def __init__(
        self,
        root: Path,
        name: str,
        count: int,
        dim: int,
        sentences: int,
        vector_dim: int = 0,
        codec: KeyCodec | None = None,
    ) -> None:
        self.final = root / "shards" / name
        self.tmp = root / "shards" / (name + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.count = count
        self.codec = codec or KeyCodec("fp16", dim)
        raw = "keys.npy" if self.codec.name == "fp16" else "keys.fp16.npy"
        self.keys = np.lib.format.open_memmap(self.tmp / raw, mode="w+", dtype=np.float16, shape=(count, dim))
        self.values = np.zeros(count, dtype=VALUE_DTYPE)
        self.sentence_ids = np.zeros(count, dtype=np.int64)
        self.positions = np.zeros(count, dtype=np.int32)
        self.offsets = np.zeros(sentences + 1, dtype=np.int64)
        #: ``[sentences, vector_dim]`` source sentence vectors (not written when ``vector_dim`` is 0)
        self.vectors = np.zeros((sentences, vector_dim), dtype=VECTOR_DTYPE) if vector_dim else None

    def _encode_keys(self, chunk: int = 100_000) -> None:
        """Re-write the fp16 keys with the codec (training it on this shard first if needed)."""
        raw = self.tmp / "keys.fp16.npy"
        keys = np.load(raw, mmap_mode="r")
        if not self.codec.trained:
            rows = np.linspace(0, len(keys) - 1, num=min(len(keys), SQ8_TRAIN_ROWS)).astype(np.int64)
            self.codec.train(np.asarray(keys[np.unique(rows)], dtype=np.float32))
        out = np.lib.format.open_memmap(
            self.tmp / "keys.npy", mode="w+", dtype=self.codec.dtype, shape=keys.shape
        )
        for lo in range(0, len(keys), chunk):
            out[lo : lo + chunk] = self.codec.encode(keys[lo : lo + chunk])
        out.flush()
        del out, keys
        raw.unlink()

    def finish(self, sentence_records: list[dict[str, Any]]) -> None:
        """Save the arrays and sentences, flush to disk, and rename into place."""
        self.keys.flush()
        del self.keys
        if self.codec.name != "fp16":
            self._encode_keys()
        for name, arr in (
            ("values", self.values),
            ("sentence_ids", self.sentence_ids),
            ("positions", self.positions),
            ("offsets", self.offsets),
            *((("sentence_vectors", self.vectors),) if self.vectors is not None else ()),
        ):
            np.save(self.tmp / f"{name}.npy", arr)
        byte_offsets = np.zeros(len(sentence_records) + 1, dtype=np.int64)
        with (self.tmp / "sentences.jsonl").open("wb") as handle:
            for i, record in enumerate(sentence_records):
                line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
                handle.write(line)
                byte_offsets[i + 1] = byte_offsets[i] + len(line)
        np.save(self.tmp / "sentences.idx.npy", byte_offsets)
        if self.final.exists():
            shutil.rmtree(self.final)
        replace_durably(self.tmp, self.final)  # durable before the manifest lists the shard


def pack_values(store: Datastore, chunk: int = 1 << 22) -> dict[str, Any]:
    """Write every shard's values, in id order, to ``<datastore>/values.npy`` (one memory-mapped file
    for the search path, 4 bytes per entry, durably) and return the manifest's ``packed_values`` entry.

    The caller holds the datastore's write lock and commits the returned entry into the manifest: the
    file is used only while that entry's ``fingerprint`` matches the datastore's.
    """
    with atomic_path(store.path / PACKED_VALUES) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=VALUE_DTYPE, shape=(store.count,))
        for shard in store.shards:
            values = shard.load("values.npy")
            for lo in range(0, shard.count, chunk):
                out[shard.start + lo : shard.start + min(lo + chunk, shard.count)] = values[lo : lo + chunk]
        out.flush()
        del out
    return {"file": PACKED_VALUES, "count": store.count, "fingerprint": store.fingerprint}


def drop_shard_keys(store: Datastore, upto: int) -> tuple[int, int]:
    """Drop the keys of every shard whose entries all lie below ``upto`` (key storage ``none``): their
    manifest entries get ``"keys": false`` and the manifest version 3, then their ``keys.npy`` files are
    deleted. Returns ``(shards, bytes)`` dropped now (shards dropped before are skipped).

    The caller holds the datastore's write lock and has made sure a saved index covers ids ``0..upto-1``
    (the keys are gone for good). The manifest is the commit point: a crash after it leaves key files
    no reader looks at (the next drop removes them), never a manifest that lists missing files.
    """
    manifest = read_manifest(store.path)
    if manifest_fingerprint(manifest) != store.fingerprint:
        raise DatastoreError(f"datastore {store.path} changed since it was opened; open it again")
    chosen = [
        (entry, shard)
        for entry, shard in zip(manifest["shards"], store.shards, strict=True)
        if shard.start + shard.count <= upto
    ]
    fresh = [shard for entry, shard in chosen if entry.get("keys", True)]
    for entry, _ in chosen:
        entry["keys"] = False
    if chosen:
        manifest["version"] = KEYLESS_VERSION
        write_json_atomic(store.path / MANIFEST, manifest)  # the commit point
    freed = 0
    for _, shard in chosen:  # also files a crash after an earlier commit left behind
        file = shard.path / KEYS_FILE
        if file.is_file():
            freed += file.stat().st_size
            file.unlink()
            fsync_dir(shard.path)
    logger.info("dropped the keys of %d shard(s) of %s: %.2f GB freed", len(fresh), store.path, freed / 1e9)
    return len(fresh), freed


class Values:
    """Values ``[len]`` int32 as a packed prefix (``values.npy``, memory-mapped) plus the values of
    shards appended since (in memory, in a buffer that grows by doubling), gathered by entry ids like an
    array. :meth:`extend` makes a longer view without copying the prefix, so an append costs the new
    values, not the datastore's size; a view never sees what was appended after it was made.
    """

    dtype = np.dtype(VALUE_DTYPE)

    def __init__(self, prefix: np.ndarray, tail: np.ndarray) -> None:
        self.prefix = prefix
        self._buffer = np.array(tail, dtype=VALUE_DTYPE)
        self._tail = len(tail)
        self._filled = [self._tail]  # shared by the views of one buffer: how far it is written

    def __len__(self) -> int:
        return len(self.prefix) + self._tail

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        """Values of entry ids (an int array of any shape, every id in ``[0, len)``)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise IndexError(f"entry id out of range [0, {len(self)})")
        cut = len(self.prefix)
        out = np.empty(ids.shape, dtype=VALUE_DTYPE)
        head = ids < cut
        out[head] = self.prefix[ids[head]]
        out[~head] = self._buffer[ids[~head] - cut]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate([np.asarray(self.prefix), self._buffer[: self._tail]])
        return whole.astype(dtype) if dtype is not None else whole

    @classmethod
    def extend(cls, values: np.ndarray | Values, new: np.ndarray) -> Values:
        """``values`` followed by ``new``. The prefix is never copied; the tail buffer is shared while
        it has room and ``values`` is the longest view of it (amortised O(len(new)) per call)."""
        if not isinstance(values, Values):
            return cls(values, new)
        used, buffer, filled = values._tail, values._buffer, values._filled
        if used + len(new) > len(buffer) or filled[0] != used:  # no room, or a longer view exists
            grown = np.empty(max(2 * len(buffer), used + len(new), 1024), dtype=VALUE_DTYPE)
            grown[:used] = buffer[:used]
            buffer, filled = grown, [used]
        buffer[used : used + len(new)] = new
        filled[0] = used + len(new)
        view = cls.__new__(cls)
        view.prefix, view._buffer, view._tail, view._filled = values.prefix, buffer, used + len(new), filled
        return view
