"""Building what :class:`~knnmt.KNNMT` needs from a model: the datastore (:func:`build_datastore`) and the
Subset kNN-MT index with the model's sentence vectors (:func:`build_subset_index`). The faiss index
needs no model: :func:`knnmt.search.index.build_index`.

Datastore build: stream a parallel corpus through the model and write shards.

Memory stays bounded by one shard of sentences (``BuildConfig.shard_sentences``): a shard is
read, tokenised, sorted into length batches under a token budget, teacher-forced, and written
in corpus order; then the manifest is updated. A build that stops keeps its finished shards
and resumes from them when the same command runs again. The teacher forcing and shard writing may
run on Ray workers instead (a :class:`ShardRunner`, :mod:`knnmt.pipeline.distributed`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import logging
import shutil
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from ..core.config import BuildConfig
from ..core.durable import write_json_atomic
from ..core.errors import DatastoreError, IncompatibleError, UsageError
from ..core.version import __version__
from ..hf.registry import encoder_dim, key_dim, key_module_name, model_fingerprint, tokenizer_fingerprint
from ..hf.teacher_forcing import (
    EncodedPair,
    embed_sources,
    encode_pairs,
    sequence_limit,
    teacher_force,
    warn_truncated,
)
from ..search.sentence_search import SourceEmbedder
from ..search.subset import SubsetConfig, SubsetIndex
from ..store.corpus import (
    CorpusInfo,
    CorpusSpec,
    check_not_empty,
    inspect_corpus,
    is_empty,
    iter_pairs,
    target_path,
)
from ..store.datastore import (
    FORMAT,
    MANIFEST,
    Datastore,
    ShardWriter,
    manifest_version,
    next_shard_name,
    pack_values,
    read_manifest,
    unlisted_shards,
)
from ..store.keycodec import KeyCodec
from ..store.writelock import LOCK_FILE, WriteLock

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _identity(
    model: Any, tokenizer: Any, config: BuildConfig, model_name: str | None, tokenization: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": {
            "name": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
            "class": type(model).__name__,
            "config_class": type(model.config).__name__,
            "fingerprint": model_fingerprint(model),
        },
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
        },
        "key": {
            "layer": config.key_layer,
            "module": key_module_name(model, config.key_layer),
            "dim": key_dim(model, config.key_layer),
            **KeyCodec(config.key_storage, key_dim(model, config.key_layer)).manifest_fields(),
        },
        "values_dtype": "int32",
        "sentence_vectors": {
            "dim": encoder_dim(model),
            "dtype": "float16",
            "pooling": "encoder output, mean over source tokens, L2-normalised",
        },
        "tokenization": tokenization,
    }


def vector_dim(manifest: dict[str, Any]) -> int:
    """The sentence-vector dimension new shards of this datastore get: 0 for datastores built before
    sentence vectors were stored (an append keeps every shard alike)."""
    info = manifest.get("sentence_vectors")
    return int(info["dim"]) if info else 0


def _key_storage(identity: dict[str, Any]) -> str:
    return KeyCodec.from_manifest(identity["key"]).name


def _check_same_identity(path: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """An existing datastore can only grow with the same model, tokenizer, layer and tokenization."""
    checks = [
        ("model", manifest["model"]["fingerprint"], identity["model"]["fingerprint"]),
        ("tokenizer", manifest["tokenizer"]["fingerprint"], identity["tokenizer"]["fingerprint"]),
        ("key layer", manifest["key"]["layer"], identity["key"]["layer"]),
        ("key dimension", manifest["key"]["dim"], identity["key"]["dim"]),
        ("key storage", KeyCodec.from_manifest(manifest["key"]).name, _key_storage(identity)),
        ("tokenization", manifest.get("tokenization"), identity["tokenization"]),
    ]
    for what, have, want in checks:
        if have != want:
            raise IncompatibleError(
                f"datastore {path} was built with a different {what} ({have!r}); this build uses {want!r}. "
                "Build into a new directory (--force would delete the existing datastore)"
            )


def _undo_hint(out: Path, manifest: dict[str, Any]) -> str:
    """How to get out of an interrupted build without losing what was there before it."""
    if len(manifest["corpora"]) > 1:  # an interrupted append: the earlier corpora are complete
        appending = len(manifest["corpora"]) - 1
        before = sum(int(s["count"]) for s in manifest["shards"] if s["corpus"] != appending)
        return (
            f"or undo the interrupted append with `knnmt rollback {out}` "
            f"(keeps the {before} entries the datastore had before it)"
        )
    return "or pass --force to start the datastore over"


def _clear_directory(out: Path) -> None:
    """Remove everything in ``out`` except the write lock this process holds."""
    for child in out.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _prepare(
    out: Path, info: CorpusInfo, identity: dict[str, Any], config: BuildConfig, *, append: bool, force: bool
) -> dict[str, Any]:
    """Decide between new build, resume and append (the write lock is held); returns the manifest to
    continue from."""
    corpus_entry = {
        "paths": list(info.spec.paths),
        "format": info.spec.format,
        "sha256": info.sha256,
        "lines": info.lines,
        "sentences": 0,
        "skipped_empty": 0,
        "truncated": 0,
        "state": "building",
        "started": _now(),
    }
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        building = manifest["state"] == "building"
        last = manifest["corpora"][-1] if manifest["corpora"] else None
        if building and last is not None and last["sha256"] == info.sha256 and not force:
            _check_same_identity(out, manifest, identity)
            if BuildConfig.from_dict(manifest["build"]).to_dict() != config.to_dict():
                raise IncompatibleError(
                    f"datastore {out} has an interrupted build with settings {manifest['build']}; "
                    f"resume it with the same settings (this run: {config.to_dict()}) "
                    + _undo_hint(out, manifest)
                )
            logger.info(
                "resuming the interrupted build of %s from %d finished shard(s)", out, len(manifest["shards"])
            )
            return manifest
        if force:
            logger.warning("--force: removing the existing datastore %s (%d entries)", out, manifest["count"])
            _clear_directory(out)
        elif building and last is not None and last["paths"] == list(info.spec.paths):
            raise DatastoreError(
                f"datastore {out} has an interrupted build of {last['paths']}, but these files changed since "
                "it started (checksum differs); restore them and rerun the same command to resume it, "
                + _undo_hint(out, manifest)
            )
        elif building:
            raise DatastoreError(
                f"datastore {out} has an interrupted build of another corpus ({last and last['paths']}); "
                "rerun that build to resume it, " + _undo_hint(out, manifest)
            )
        elif append:
            _check_same_identity(out, manifest, identity)
            if any(c["sha256"] == info.sha256 for c in manifest["corpora"]):
                logger.warning(
                    "this corpus (sha256 %s) is already in %s; appending it again", info.sha256[:12], out
                )
            manifest["corpora"].append({**corpus_entry, "first_sentence": manifest["sentences"]})
            manifest["state"] = "building"
            manifest["build"] = config.to_dict()
            write_json_atomic(out / MANIFEST, manifest)
            return manifest
        else:
            raise DatastoreError(
                f"datastore {out} already exists ({manifest['count']} entries); "
                "pass --append to add this corpus "
                "to it, or --force to overwrite it"
            )
    elif any(child.name != LOCK_FILE for child in out.iterdir()):
        if not force:
            raise DatastoreError(
                f"{out} exists and is not an empty directory nor a datastore; pass --force to replace it"
            )
        _clear_directory(out)
    elif append:
        logger.info("--append: %s does not exist yet, creating it", out)
    manifest = {
        "format": FORMAT,
        "version": manifest_version(config.key_storage),
        "knnmt_version": __version__,
        "state": "building",
        "created": _now(),
        **identity,
        "count": 0,
        "sentences": 0,
        "shards": [],
        "corpora": [{**corpus_entry, "first_sentence": 0}],
        "build": config.to_dict(),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _kept_pairs(
    spec: CorpusSpec, skip_empty: bool, counter: dict[str, int]
) -> Iterator[tuple[int, str, str]]:
    """``(line, source, target)`` of pairs with two non-empty sides; empties counted or fatal."""
    for pair in iter_pairs(spec):
        if is_empty(pair):
            if not skip_empty:
                check_not_empty(spec, pair)
            counter["skipped_empty"] += 1
            continue
        yield pair.line, pair.source, pair.target


class BuildRate:
    """Target tokens per second since a build (or resume) started, for the progress bar."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def write_shard(
    out: Path,
    name: str,
    encoded: list[EncodedPair],
    model: Any,
    tokenizer: Any,
    dim: int,
    vector_dim: int,
    config: BuildConfig,
    corpus_index: int,
    bar: Any = None,
    rate: BuildRate | None = None,
    codec: KeyCodec | None = None,
) -> int:
    """Teacher-force ``encoded`` (one shard's pairs, from :func:`~knnmt.hf.teacher_forcing.encode_pairs`)
    with :func:`~knnmt.hf.teacher_forcing.teacher_force` and publish the shard ``name`` under ``out``
    (with the sources' sentence vectors when ``vector_dim``); used by the build and by the service's
    memory appends.

    Args:
        dim: the key dimension; ``config``: its ``key_layer`` and ``max_tokens`` (the batch budget).
        corpus_index: the manifest's corpus the sentences come from (``-1``: memory appends).
        bar: a ``tqdm`` bar to advance per batch; ``rate``: counts target tokens for it.
        codec: how keys are stored (default fp16); an untrained one learns from this shard, and the
            caller records ``codec.manifest_fields()`` in the manifest.

    Returns:
        the shard's entry count.

    Raises:
        DatastoreError: a key is beyond float16's range (the datastore stores fp16 keys).
    """
    offsets = [0]
    for pair in encoded:
        offsets.append(offsets[-1] + len(pair.target_ids))
    writer = ShardWriter(out, name, offsets[-1], dim, len(encoded), vector_dim, codec)
    writer.offsets[:] = offsets
    forced_batches = teacher_force(
        model,
        tokenizer,
        encoded,
        key_layer=config.key_layer,
        max_tokens=config.max_tokens,
        vectors=writer.vectors is not None,
    )
    for forced in forced_batches:
        batch_idx, batch = forced.indices, forced.pairs
        if writer.vectors is not None:
            writer.vectors[batch_idx] = forced.vectors
        for i, pair, keys in zip(batch_idx, batch, forced.keys, strict=True):
            lo, hi = offsets[i], offsets[i + 1]
            peak = float(keys.abs().max())
            if not peak <= FP16_MAX:
                raise DatastoreError(
                    f"keys of sentence {pair.sentence_id} (line {pair.line}) reach {peak:.3g}, "
                    f"beyond float16's "
                    f"range ({FP16_MAX}); the datastore stores fp16 keys. Try --key-layer decoder_output"
                )
            writer.keys[lo:hi] = keys.float().numpy()
            writer.values[lo:hi] = pair.target_ids
            writer.sentence_ids[lo:hi] = pair.sentence_id
            writer.positions[lo:hi] = range(hi - lo)
        if rate is not None:
            rate.tokens += sum(len(p.target_ids) for p in batch)
        if bar is not None:
            bar.update(len(batch))
            if rate is not None:
                bar.set_postfix(tok_s=f"{rate.per_second():,.0f}", refresh=False)
    writer.finish(
        [
            {"id": p.sentence_id, "src": p.source, "tgt": p.target, "corpus": corpus_index, "line": p.line}
            for p in encoded
        ]
    )
    return offsets[-1]


@dataclass(frozen=True)
class ShardJob:
    """One shard of a build as the process that holds the write lock plans it: the next
    ``config.shard_sentences`` kept pairs of the corpus, tokenised, with everything :func:`write_shard`
    needs except the model. Shards are always planned here, in corpus order, so their boundaries and
    names do not depend on who writes them (this process, or a worker of a :class:`ShardRunner`)."""

    out: Path
    name: str
    encoded: list[EncodedPair]
    dim: int
    vector_dim: int
    config: BuildConfig
    corpus_index: int
    first_sentence: int
    #: empty pairs skipped while this shard's pairs were read (the manifest's per-shard count)
    skipped_empty: int
    #: pairs of this shard cut to the length limit
    truncated: int

    def write(
        self,
        model: Any,
        tokenizer: Any,
        codec: KeyCodec | None = None,
        bar: Any = None,
        rate: BuildRate | None = None,
    ) -> int:
        """Teacher-force and publish this shard with :func:`write_shard` (keys stored with ``codec``,
        which learns from this shard if untrained); returns its entry count."""
        return write_shard(
            self.out,
            self.name,
            self.encoded,
            model,
            tokenizer,
            self.dim,
            self.vector_dim,
            self.config,
            self.corpus_index,
            bar,
            rate,
            codec,
        )

    def manifest_entry(self, count: int) -> dict[str, Any]:
        """The shard's entry in the manifest's ``shards`` list, once it is written with ``count`` entries."""
        return {
            "name": self.name,
            "count": count,
            "sentences": len(self.encoded),
            "first_sentence": self.first_sentence,
            "corpus": self.corpus_index,
            "skipped_empty": self.skipped_empty,
            "truncated": self.truncated,
        }


class ShardRunner(Protocol):
    """Teacher-forces and writes the shards a build plans: in the building process, one after the other
    (the default), or elsewhere (on Ray workers: :class:`knnmt.pipeline.distributed.RayShardRunner`);
    :func:`build_datastore` still plans the shards, holds the write lock and alone writes the manifest."""

    def __call__(
        self, jobs: Iterator[ShardJob], bar: Any, rate: BuildRate, key: dict[str, Any]
    ) -> Generator[tuple[ShardJob, int, dict[str, Any]], None, None]:
        """Write every shard of ``jobs`` (in any order, in parallel) and yield ``(job, entry count, key
        fields)`` in the order of ``jobs``: a shard is yielded, and listed in the manifest, only once all
        shards before it are written. ``bar`` counts sentences, ``rate`` target tokens. Closing the
        generator (the build failed or was interrupted) stops the work still running.

        ``key`` is the manifest's ``key`` object: the keys are stored with its codec
        (:meth:`KeyCodec.from_manifest <knnmt.store.keycodec.KeyCodec.from_manifest>`); an untrained one
        (sq8 before the datastore's first shard) learns from the first shard, and every later shard must
        be written with what it learnt. The yielded key fields (``codec.manifest_fields()`` after the
        shard) go into the manifest."""
        ...


def _write_in_process(model: Any, tokenizer: Any) -> ShardRunner:
    """The default :class:`ShardRunner`: each shard written here, in order, by ``model``."""

    def run(
        jobs: Iterator[ShardJob], bar: Any, rate: BuildRate, key: dict[str, Any]
    ) -> Generator[tuple[ShardJob, int, dict[str, Any]], None, None]:
        codec = KeyCodec.from_manifest(key)  # one codec: an untrained one learns from the first shard
        for job in jobs:
            count = job.write(model, tokenizer, codec, bar, rate)
            yield job, count, codec.manifest_fields()

    return run


def check_build_mode(append: bool, force: bool) -> None:
    """``append`` and ``force`` exclude each other: appending to a datastore that is first deleted would
    lose it (raises :class:`UsageError`)."""
    if append and force:
        raise UsageError(
            "--append and --force together would delete the datastore before appending to it: pass "
            "--append to add a corpus, or --force alone to build a new datastore over the old one"
        )


def build_datastore(
    model: Any,
    tokenizer: Any,
    corpus: CorpusSpec,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    append: bool = False,
    force: bool = False,
    model_name: str | None = None,
    source_prefix: str = "",
    progress: bool = True,
    shard_runner: ShardRunner | None = None,
) -> Datastore:
    """Build (or resume, or append to) the datastore at ``out`` from ``corpus``.

    Args:
        model: a Hugging Face encoder-decoder model (eval mode; any device).
        tokenizer: its tokenizer (source/target languages already set where the model needs them).
        corpus: the parallel corpus; validated fully before anything is written.
        out: datastore directory.
        config: build settings.
        append: add ``corpus`` to an existing datastore.
        force: replace whatever is at ``out``.
        model_name: recorded in the manifest (defaults to ``model.name_or_path``).
        source_prefix: text prepended to every source sentence (e.g. T5 task prefixes).
        progress: show a progress bar (on stderr).
        shard_runner: who teacher-forces and writes the shards (default: ``model``, here, one after
            the other); e.g. :class:`knnmt.pipeline.distributed.RayShardRunner` for Ray workers
            (:func:`knnmt.pipeline.distributed.build_datastore_ray`). The datastore is the same.

    Returns:
        the finished datastore.
    """
    config = config or BuildConfig()
    out = Path(out)
    check_build_mode(append, force)
    info = inspect_corpus(corpus, config.skip_empty)  # input errors surface before anything is written
    tokenization = {
        "source_prefix": source_prefix,
        "src_lang": getattr(tokenizer, "src_lang", None),
        "tgt_lang": getattr(tokenizer, "tgt_lang", None),
    }
    identity = _identity(model, tokenizer, config, model_name, tokenization)
    existed = out.exists()
    with WriteLock(out, "build --append" if append else "build"):  # one writer at a time
        fresh = not (out / MANIFEST).is_file() or force
        manifest: dict[str, Any] = {}
        try:
            manifest = _prepare(out, info, identity, config, append=append, force=force)
            corpus_index = len(manifest["corpora"]) - 1
            runner = shard_runner or _write_in_process(model, tokenizer)
            return _fill(
                model,
                tokenizer,
                corpus,
                info,
                out,
                manifest,
                corpus_index,
                config,
                source_prefix,
                progress,
                runner,
            )
        except BaseException:
            if manifest:
                _forget_unstarted(out, manifest, corpus_index, fresh)
            if not existed and not (out / MANIFEST).is_file():
                shutil.rmtree(out, ignore_errors=True)  # made for this build, which left nothing to keep
            raise


def _forget_unstarted(out: Path, manifest: dict[str, Any], corpus_index: int, fresh: bool) -> None:
    """After a failure before the first shard of this corpus: leave things as they were before."""
    if any(s["corpus"] == corpus_index for s in manifest["shards"]):
        return  # finished shards are kept; the same command resumes from them
    if fresh:
        _clear_directory(out)
        return
    if manifest["corpora"] and len(manifest["corpora"]) == corpus_index + 1 and corpus_index > 0:
        manifest["corpora"].pop()
        manifest["state"] = "complete"
        write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / "shards" / f"{next_shard_name(manifest)}.tmp", ignore_errors=True)


def _fill(
    model: Any,
    tokenizer: Any,
    corpus: CorpusSpec,
    info: CorpusInfo,
    out: Path,
    manifest: dict[str, Any],
    corpus_index: int,
    config: BuildConfig,
    source_prefix: str,
    progress: bool,
    runner: ShardRunner,
) -> Datastore:
    """The streaming part of :func:`build_datastore`: shards planned in corpus order, written by
    ``runner``, and listed in the manifest (committed after each) in that order."""
    entry = manifest["corpora"][corpus_index]
    done_sentences = sum(s["sentences"] for s in manifest["shards"] if s["corpus"] == corpus_index)
    truncated = sum(s["truncated"] for s in manifest["shards"] if s["corpus"] == corpus_index)
    max_length = sequence_limit(model, tokenizer, config.max_length)
    dim = int(manifest["key"]["dim"])

    counter = {"skipped_empty": 0}  # every empty pair seen so far in this corpus
    pairs = _kept_pairs(corpus, config.skip_empty, counter)
    for _ in itertools.islice(pairs, done_sentences):  # resume: skip what finished shards hold
        pass
    bar = tqdm(
        total=info.lines, unit="sent", desc=f"build {out.name}", disable=not progress, dynamic_ncols=True
    )
    bar.update(done_sentences + counter["skipped_empty"])
    next_sentence = entry["first_sentence"] + done_sentences
    rate = BuildRate()
    vectors = vector_dim(manifest)

    def plan(first: int, number: int) -> Iterator[ShardJob]:
        """Shard ``number`` onwards, its first sentence ``first``, each read only when asked for."""
        while True:
            before = counter["skipped_empty"]
            chunk = list(itertools.islice(pairs, config.shard_sentences))
            skipped_now = counter["skipped_empty"] - before
            bar.update(skipped_now)
            if not chunk:
                return
            rows = [(first + i, line, src, tgt) for i, (line, src, tgt) in enumerate(chunk)]
            encoded, cut = encode_pairs(
                tokenizer,
                rows,
                max_length=max_length,
                truncate=config.truncate,
                paths=(corpus.paths[0], target_path(corpus)),
                source_prefix=source_prefix,
                hint="allow truncation (drop --no-truncate) or shorten it",
            )
            name = f"{number:05d}"
            yield ShardJob(out, name, encoded, dim, vectors, config, corpus_index, first, skipped_now, cut)
            first += len(encoded)
            number += 1

    first_number = int(next_shard_name(manifest))  # never a name used before (merges remove shards)
    written = runner(plan(next_sentence, first_number), bar, rate, dict(manifest["key"]))
    with contextlib.closing(written):  # a failure here stops the runner's work in flight
        for job, count, key in written:
            manifest["key"].update(key)  # an sq8 codec learns its ranges from shard 0
            truncated += job.truncated
            manifest["shards"].append(job.manifest_entry(count))
            manifest["count"] += count
            manifest["sentences"] += len(job.encoded)
            next_sentence += len(job.encoded)
            write_json_atomic(out / MANIFEST, manifest)
    bar.close()
    entry.update(
        sentences=next_sentence - entry["first_sentence"],
        truncated=truncated,
        skipped_empty=counter["skipped_empty"],
        state="complete",
        finished=_now(),
    )
    manifest["state"] = "complete"
    manifest["packed_values"] = pack_values(Datastore(out, manifest))
    write_json_atomic(out / MANIFEST, manifest)
    if counter["skipped_empty"]:
        logger.warning("skipped %d pair(s) with an empty side", counter["skipped_empty"])
    warn_truncated(truncated, max_length, f"build {out.name}")
    logger.info("datastore %s: %d entries from %d sentences", out, manifest["count"], manifest["sentences"])
    return Datastore.open(out)


def rollback_append(path: str | Path) -> Datastore:
    """Undo an interrupted ``build --append``: drop the shards of the corpus being appended and return
    the datastore to the complete state it had before; nothing of the earlier corpora is touched.

    The manifest is committed first (the datastore is complete and consistent from that moment), then
    the dropped shard directories are removed. Indexes built before the append match the datastore again.

    Raises:
        DatastoreError: the datastore is complete (nothing to undo), or the interrupted build is its
            first corpus (nothing earlier to return to: resume it, or start over with ``--force``).
    """
    out = Path(path)
    with WriteLock(out, "rollback"):
        manifest = read_manifest(out)
        if manifest["state"] != "building":
            raise DatastoreError(f"datastore {out} is complete: there is no interrupted append to undo")
        last = len(manifest["corpora"]) - 1
        if last < 1:
            raise DatastoreError(
                f"the interrupted build of {out} is its first corpus, so there is nothing earlier to return "
                "to: rerun the same `knnmt build` to resume it, or pass --force to start over"
            )
        dropped = [s for s in manifest["shards"] if s["corpus"] == last]
        manifest["shards"] = [s for s in manifest["shards"] if s["corpus"] != last]
        abandoned = manifest["corpora"].pop()
        manifest["count"] = sum(int(s["count"]) for s in manifest["shards"])
        manifest["sentences"] = sum(int(s["sentences"]) for s in manifest["shards"])
        manifest["state"] = "complete"
        write_json_atomic(out / MANIFEST, manifest)  # the commit point
        for directory in unlisted_shards(out, manifest):  # the dropped shards and any unfinished one
            shutil.rmtree(directory)
        logger.warning(
            "undid the interrupted append of %s: dropped %d finished shard(s) (%d entries); %s has %d "
            "entries again",
            abandoned["paths"],
            len(dropped),
            sum(int(s["count"]) for s in dropped),
            out,
            manifest["count"],
        )
    return Datastore.open(out)


def build_subset_index(
    datastore: Datastore,
    config: SubsetConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    out: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> SubsetIndex:
    """Build (or extend) the Subset kNN-MT index of ``datastore`` (:meth:`SubsetIndex.build`).

    Trains PQ codebooks on a sample of keys and encodes every key (reused when a previous build for
    the same datastore and PQ settings exists, unless ``force``), stores the entry ranges of every
    sentence and builds ``config.sentence_search`` over the datastore's source sentences (``dense``
    needs the ``model`` and ``tokenizer`` the datastore was built with). Building the other sentence
    search later adds it beside the first; ``config.sentence_search`` becomes the default.
    """
    embed: SourceEmbedder | None = None
    if model is not None and tokenizer is not None:

        def embed(sources: Sequence[str], *, source_prefix: str = "", progress: bool = False) -> np.ndarray:
            return embed_sources(model, tokenizer, sources, source_prefix=source_prefix, progress=progress)

    return SubsetIndex.build(datastore, config, embed=embed, out=out, progress=progress, force=force)
