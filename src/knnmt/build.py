"""Datastore build: stream a parallel corpus through the model and write shards.

Memory stays bounded by one shard of sentences (``BuildConfig.shard_sentences``): a shard is
read, tokenised, sorted into length batches under a token budget, teacher-forced, and written
in corpus order; then the manifest is updated. A build that stops keeps its finished shards
and resumes from them when the same command runs again.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import __version__
from .config import BuildConfig
from .corpus import CorpusInfo, CorpusSpec, check_not_empty, inspect_corpus, is_empty, iter_pairs, target_path
from .datastore import FORMAT, MANIFEST, VERSION, Datastore, ShardWriter, read_manifest, write_json_atomic
from .errors import DatastoreError, IncompatibleError
from .models import key_dim, key_module_name, model_fingerprint, tokenizer_fingerprint
from .teacher_forcing import (
    EncodedPair,
    KeyExtractor,
    encode_pairs,
    length_batches,
    sequence_limit,
    warn_truncated,
)

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
            "dtype": "float16",
        },
        "values_dtype": "int32",
        "tokenization": tokenization,
    }


def _check_same_identity(path: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """An existing datastore can only grow with the same model, tokenizer, layer and tokenization."""
    checks = [
        ("model", manifest["model"]["fingerprint"], identity["model"]["fingerprint"]),
        ("tokenizer", manifest["tokenizer"]["fingerprint"], identity["tokenizer"]["fingerprint"]),
        ("key layer", manifest["key"]["layer"], identity["key"]["layer"]),
        ("key dimension", manifest["key"]["dim"], identity["key"]["dim"]),
        ("tokenization", manifest.get("tokenization"), identity["tokenization"]),
    ]
    for what, have, want in checks:
        if have != want:
            raise IncompatibleError(
                f"datastore {path} was built with a different {what} ({have!r}); this build uses {want!r}. "
                "Build into a new directory, or pass --force to replace it"
            )


def _prepare(
    out: Path, info: CorpusInfo, identity: dict[str, Any], config: BuildConfig, *, append: bool, force: bool
) -> dict[str, Any]:
    """Decide between new build, resume and append; returns the manifest to continue from."""
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
    if out.exists() and (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        building = manifest["state"] == "building"
        last = manifest["corpora"][-1] if manifest["corpora"] else None
        if building and last is not None and last["sha256"] == info.sha256 and not force:
            _check_same_identity(out, manifest, identity)
            if manifest["build"] != config.to_dict():
                raise IncompatibleError(
                    f"datastore {out} has an interrupted build with settings {manifest['build']}; "
                    f"resume it with the same settings (this run: {config.to_dict()}) or pass --force"
                )
            logger.info(
                "resuming the interrupted build of %s from %d finished shard(s)", out, len(manifest["shards"])
            )
            return manifest
        if force:
            logger.warning("--force: removing the existing datastore %s", out)
            shutil.rmtree(out)
        elif building and last is not None and last["paths"] == list(info.spec.paths):
            raise DatastoreError(
                f"datastore {out} has an interrupted build of {last['paths']}, but these files changed since "
                "it started (checksum differs); restore them to resume, or pass --force to start over"
            )
        elif building:
            raise DatastoreError(
                f"datastore {out} has an interrupted build of another corpus ({last and last['paths']}); "
                "rerun that build to resume it, or pass --force to start over"
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
    elif out.exists() and any(out.iterdir()):
        if not force:
            raise DatastoreError(
                f"{out} exists and is not an empty directory nor a datastore; pass --force to replace it"
            )
        shutil.rmtree(out)
    elif append:
        logger.info("--append: %s does not exist yet, creating it", out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
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


class _Rate:
    """Target tokens per second since the build (or resume) started, for the progress bar."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def _write_shard(
    out: Path,
    name: str,
    encoded: list[EncodedPair],
    extractor: KeyExtractor,
    dim: int,
    config: BuildConfig,
    corpus_index: int,
    bar: Any,
    rate: _Rate,
) -> int:
    """Teacher-force ``encoded`` (one shard's pairs) and publish the shard; returns its entry count."""
    offsets = [0]
    for pair in encoded:
        offsets.append(offsets[-1] + len(pair.target_ids))
    writer = ShardWriter(out, name, offsets[-1], dim, len(encoded))
    writer.offsets[:] = offsets
    for batch_idx in length_batches(encoded, config.max_tokens):
        batch = [encoded[i] for i in batch_idx]
        for i, pair, keys in zip(batch_idx, batch, extractor(batch), strict=True):
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
        rate.tokens += sum(len(p.target_ids) for p in batch)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{rate.per_second():,.0f}", refresh=False)
    writer.finish(
        [
            {"id": p.sentence_id, "src": p.source, "tgt": p.target, "corpus": corpus_index, "line": p.line}
            for p in encoded
        ]
    )
    return offsets[-1]


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

    Returns:
        the finished datastore.
    """
    config = config or BuildConfig()
    out = Path(out)
    info = inspect_corpus(corpus, config.skip_empty)  # input errors surface before anything is written
    tokenization = {
        "source_prefix": source_prefix,
        "src_lang": getattr(tokenizer, "src_lang", None),
        "tgt_lang": getattr(tokenizer, "tgt_lang", None),
    }
    identity = _identity(model, tokenizer, config, model_name, tokenization)
    fresh = not (out / MANIFEST).is_file()
    manifest = _prepare(out, info, identity, config, append=append, force=force)
    corpus_index = len(manifest["corpora"]) - 1
    try:
        return _fill(
            model, tokenizer, corpus, info, out, manifest, corpus_index, config, source_prefix, progress
        )
    except BaseException:
        _forget_unstarted(out, manifest, corpus_index, fresh)
        raise


def _forget_unstarted(out: Path, manifest: dict[str, Any], corpus_index: int, fresh: bool) -> None:
    """After a failure before the first shard of this corpus: leave things as they were before."""
    if any(s["corpus"] == corpus_index for s in manifest["shards"]):
        return  # finished shards are kept; the same command resumes from them
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        return
    if manifest["corpora"] and len(manifest["corpora"]) == corpus_index + 1 and corpus_index > 0:
        manifest["corpora"].pop()
        manifest["state"] = "complete"
        write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / "shards" / f"{len(manifest['shards']):05d}.tmp", ignore_errors=True)


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
) -> Datastore:
    """The streaming part of :func:`build_datastore`: shard after shard, manifest after each."""
    entry = manifest["corpora"][corpus_index]
    done_sentences = sum(s["sentences"] for s in manifest["shards"] if s["corpus"] == corpus_index)
    truncated = sum(s["truncated"] for s in manifest["shards"] if s["corpus"] == corpus_index)
    max_length = sequence_limit(model, tokenizer, config.max_length)
    dim = int(manifest["key"]["dim"])
    extractor = KeyExtractor(model, tokenizer.pad_token_id, config.key_layer)

    counter = {"skipped_empty": 0}  # every empty pair seen so far in this corpus
    pairs = _kept_pairs(corpus, config.skip_empty, counter)
    for _ in itertools.islice(pairs, done_sentences):  # resume: skip what finished shards hold
        pass
    bar = tqdm(
        total=info.lines, unit="sent", desc=f"build {out.name}", disable=not progress, dynamic_ncols=True
    )
    bar.update(done_sentences + counter["skipped_empty"])
    next_sentence = entry["first_sentence"] + done_sentences
    rate = _Rate()
    while True:
        before = counter["skipped_empty"]
        chunk = list(itertools.islice(pairs, config.shard_sentences))
        skipped_now = counter["skipped_empty"] - before
        bar.update(skipped_now)
        if not chunk:
            break
        rows = [(next_sentence + i, line, src, tgt) for i, (line, src, tgt) in enumerate(chunk)]
        encoded, cut = encode_pairs(
            tokenizer,
            rows,
            max_length=max_length,
            truncate=config.truncate,
            paths=(corpus.paths[0], target_path(corpus)),
            source_prefix=source_prefix,
            hint="allow truncation (drop --no-truncate) or shorten it",
        )
        name = f"{len(manifest['shards']):05d}"
        count = _write_shard(out, name, encoded, extractor, dim, config, corpus_index, bar, rate)
        truncated += cut
        manifest["shards"].append(
            {
                "name": name,
                "count": count,
                "sentences": len(encoded),
                "first_sentence": next_sentence,
                "corpus": corpus_index,
                "skipped_empty": skipped_now,
                "truncated": cut,
            }
        )
        manifest["count"] += count
        manifest["sentences"] += len(encoded)
        next_sentence += len(encoded)
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
    write_json_atomic(out / MANIFEST, manifest)
    if counter["skipped_empty"]:
        logger.warning("skipped %d pair(s) with an empty side", counter["skipped_empty"])
    warn_truncated(truncated, max_length, f"build {out.name}")
    logger.info("datastore %s: %d entries from %d sentences", out, manifest["count"], manifest["sentences"])
    return Datastore.open(out)
