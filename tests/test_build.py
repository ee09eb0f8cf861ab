"""Datastore build: sharding and batching do not change the content, an interrupted build resumes to
exactly the uninterrupted result, and existing datastores are protected or extended as asked."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import knnmt.pipeline.build
from conftest import all_entries, all_sentences
from knnmt.core.config import BuildConfig
from knnmt.core.errors import DatastoreError, IncompatibleError
from knnmt.hf.registry import open_reusable
from knnmt.hf.toy import make_marian_model
from knnmt.pipeline.build import build_datastore
from knnmt.store.corpus import CorpusSpec
from knnmt.store.datastore import MANIFEST, Datastore, ShardWriter, read_manifest

SMALL = BuildConfig(shard_sentences=7, max_tokens=64)
LARGE = BuildConfig(shard_sentences=10_000, max_tokens=1_000_000)


def _corpus_with_empties(toy_pairs: list[tuple[str, str]], n: int = 40) -> list[tuple[str, str]]:
    pairs = list(toy_pairs[:n])
    pairs.insert(3, ("", "Leere Quelle."))
    pairs.insert(16, ("Empty target.", ""))
    pairs.insert(17, ("   ", "\t"))
    pairs.insert(30, ("", ""))
    return pairs


def assert_same_content(a: Datastore, b: Datastore, exact_keys: bool) -> None:
    assert (a.count, a.manifest["sentences"], a.dim) == (b.count, b.manifest["sentences"], b.dim)
    ea, eb = all_entries(a), all_entries(b)
    for name in ("values", "sentence_ids", "positions"):
        np.testing.assert_array_equal(ea[name], eb[name], err_msg=name)
    if exact_keys:
        np.testing.assert_array_equal(ea["keys"], eb["keys"])
    else:  # batches with other padding may round the last fp16 bit differently
        np.testing.assert_allclose(ea["keys"], eb["keys"], rtol=2**-10, atol=1e-6)
    assert all_sentences(a) == all_sentences(b)


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def test_sharded_build_equals_one_shot(marian, toy_pairs, make_corpus, tmp_path: Path) -> None:
    model, tokenizer = marian
    spec = make_corpus(toy_pairs[:40])
    sharded = build_datastore(model, tokenizer, spec, tmp_path / "sharded", SMALL, progress=False)
    one = build_datastore(model, tokenizer, spec, tmp_path / "one", LARGE, progress=False)

    assert len(sharded.shards) == 6 and len(one.shards) == 1  # 40 sentences = 5 x 7 + 5
    assert [s.sentences for s in sharded.shards] == [7, 7, 7, 7, 7, 5]
    ea, eb = all_entries(sharded), all_entries(one)
    for name in ("values", "sentence_ids", "positions"):
        np.testing.assert_array_equal(ea[name], eb[name], err_msg=name)
    np.testing.assert_allclose(ea["keys"], eb["keys"], rtol=2**-10, atol=1e-6)
    differing = int((ea["keys"] != eb["keys"]).any(axis=1).sum())
    assert differing <= 0.01 * sharded.count, f"{differing} keys differ beyond the last fp16 bit"
    assert all_sentences(sharded) == all_sentences(one)
    # provenance is global: sentence ids run 0..39 in corpus order, positions restart per sentence
    sentences = all_sentences(sharded)
    assert [s["id"] for s in sentences] == list(range(40))
    assert [(s["src"], s["tgt"]) for s in sentences] == toy_pairs[:40]
    expected_values = [v for _, t in toy_pairs[:40] for v in tokenizer(text_target=[t])["input_ids"][0]]
    assert ea["values"].tolist() == expected_values


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, shards_ok: int) -> list[str]:
    """Make ``write_shard`` die on call ``shards_ok + 1``, after creating that shard's ``.tmp`` directory."""
    real = knnmt.pipeline.build.write_shard
    calls: list[str] = []

    def flaky(out: Path, name: str, encoded: list[Any], *args: Any, **kwargs: Any) -> int:
        calls.append(name)
        if len(calls) > shards_ok:
            writer = ShardWriter(out, name, 5, 64, 1)  # a half-written shard left behind
            writer.keys[:] = 1.0
            raise RuntimeError("simulated crash while writing a shard")
        return real(out, name, encoded, *args, **kwargs)

    monkeypatch.setattr(knnmt.pipeline.build, "write_shard", flaky)
    return calls


def test_resumed_build_equals_uninterrupted(
    marian, toy_pairs, make_corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = marian
    spec = make_corpus(_corpus_with_empties(toy_pairs))
    reference = build_datastore(model, tokenizer, spec, tmp_path / "reference", SMALL, progress=False)
    out = tmp_path / "resumed"

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_datastore(model, tokenizer, spec, out, SMALL, progress=False)
    manifest = read_manifest(out)
    assert manifest["state"] == "building"
    assert [s["name"] for s in manifest["shards"]] == ["00000", "00001"]
    assert (out / "shards" / "00002.tmp").is_dir()
    with pytest.raises(
        DatastoreError, match=r"incomplete.*interrupted build.*run the same `knnmt build` again"
    ):
        Datastore.open(out)
    assert open_reusable(out, model, tokenizer) is None  # a cache user rebuilds it
    # resuming with other settings is refused, with both settings in the message
    with pytest.raises(IncompatibleError, match="resume it with the same settings"):
        build_datastore(
            model, tokenizer, spec, out, BuildConfig(shard_sentences=9, max_tokens=64), progress=False
        )
    # appending another corpus to an interrupted datastore is refused too
    with pytest.raises(DatastoreError, match="interrupted build of another corpus"):
        build_datastore(
            model,
            tokenizer,
            make_corpus(toy_pairs[50:55], name="other"),
            out,
            SMALL,
            append=True,
            progress=False,
        )

    with monkeypatch.context() as patch:
        calls = _interrupt_after(patch, 1_000)
        resumed = build_datastore(model, tokenizer, spec, out, SMALL, progress=False)
    assert calls == ["00002", "00003", "00004", "00005"]  # finished shards were not redone
    assert not list((out / "shards").glob("*.tmp")), "the half-written shard was not cleaned up"
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"{i:05d}" for i in range(6)]

    assert_same_content(resumed, reference, exact_keys=True)
    got, want = resumed.manifest, reference.manifest
    assert got["shards"] == want["shards"]
    drop = {"started", "finished", "paths"}
    assert [{k: v for k, v in c.items() if k not in drop} for c in got["corpora"]] == [
        {k: v for k, v in c.items() if k not in drop} for c in want["corpora"]
    ]
    assert got["corpora"][0]["skipped_empty"] == 4
    assert got["sentences"] == 40


def test_existing_datastore_is_not_overwritten(marian, toy_pairs, make_corpus, tmp_path: Path) -> None:
    model, tokenizer = marian
    out = tmp_path / "ds"
    build_datastore(model, tokenizer, make_corpus(toy_pairs[:10]), out, progress=False)
    before = _tree_digest(out)
    other = make_corpus(toy_pairs[10:20], name="other")
    with pytest.raises(DatastoreError, match=r"already exists \(\d+ entries\).*--append.*--force"):
        build_datastore(model, tokenizer, other, out, progress=False)
    assert _tree_digest(out) == before
    # a directory that is not a datastore is not replaced either
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(DatastoreError, match="not an empty directory nor a datastore"):
        build_datastore(model, tokenizer, other, junk, progress=False)
    assert (junk / "notes.txt").read_text(encoding="utf-8") == "keep me"
    # with force the datastore is replaced by the new corpus
    replaced = build_datastore(model, tokenizer, other, out, force=True, progress=False)
    assert [s["src"] for s in all_sentences(replaced)] == [s for s, _ in toy_pairs[10:20]]
    assert len(replaced.manifest["corpora"]) == 1


def test_append_continues_sentence_ids(marian, toy_pairs, make_corpus, tmp_path: Path) -> None:
    model, tokenizer = marian
    first, second = make_corpus(toy_pairs[:10], name="a"), make_corpus(toy_pairs[10:15], name="b")
    out = tmp_path / "ds"
    base = build_datastore(model, tokenizer, first, out, SMALL, progress=False)
    base_count = base.count
    alone = build_datastore(model, tokenizer, second, tmp_path / "alone", SMALL, progress=False)

    grown = build_datastore(model, tokenizer, second, out, SMALL, append=True, progress=False)

    assert grown.count == base_count + alone.count
    assert grown.manifest["sentences"] == 15
    assert [c["paths"] for c in grown.manifest["corpora"]] == [list(first.paths), list(second.paths)]
    assert grown.manifest["corpora"][1]["first_sentence"] == 10
    entries = all_entries(grown)
    appended = slice(base_count, grown.count)
    np.testing.assert_array_equal(entries["sentence_ids"][appended], all_entries(alone)["sentence_ids"] + 10)
    np.testing.assert_array_equal(entries["values"][appended], alone.values)
    np.testing.assert_array_equal(entries["keys"][appended], all_entries(alone)["keys"])
    record = grown.sentence(12)
    assert (record["src"], record["tgt"], record["corpus"], record["line"]) == (*toy_pairs[12], 1, 3)
    assert grown.sentence(3)["corpus"] == 0
    # the appended datastore has a new identity (indexes built for the old one no longer match)
    assert grown.fingerprint != base.fingerprint


def test_append_to_missing_datastore_creates_it(marian, toy_pairs, make_corpus, tmp_path: Path) -> None:
    model, tokenizer = marian
    store = build_datastore(
        model, tokenizer, make_corpus(toy_pairs[:3]), tmp_path / "new", append=True, progress=False
    )
    assert store.manifest["sentences"] == 3 and store.manifest["state"] == "complete"


def test_open_reusable_only_for_the_model_it_was_built_with(
    marian, toy_pairs, make_corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = marian
    out = tmp_path / "ds"
    assert open_reusable(out, model, tokenizer) is None  # nothing there yet
    built = build_datastore(model, tokenizer, make_corpus(toy_pairs[:5]), out, progress=False)
    reused = open_reusable(out, model, tokenizer)
    assert reused is not None and reused.fingerprint == built.fingerprint
    before = _tree_digest(out)
    with caplog.at_level(logging.WARNING, logger="knnmt.hf.registry"):
        assert open_reusable(out, make_marian_model(tokenizer, seed=1), tokenizer) is None
    assert "was built with model" in caplog.text and "not reused" in caplog.text
    assert _tree_digest(out) == before  # only a verdict: the caller decides whether to rebuild


def test_append_with_another_model_is_refused(marian, toy_pairs, make_corpus, tmp_path: Path) -> None:
    model, tokenizer = marian
    out = tmp_path / "ds"
    build_datastore(model, tokenizer, make_corpus(toy_pairs[:5]), out, progress=False)
    before = _tree_digest(out)
    other_model = make_marian_model(tokenizer, seed=1)
    with pytest.raises(IncompatibleError, match=r"different model .*--force"):
        build_datastore(
            other_model, tokenizer, make_corpus(toy_pairs[5:9], name="b"), out, append=True, progress=False
        )
    assert _tree_digest(out) == before
    with pytest.raises(IncompatibleError, match="different key layer"):
        build_datastore(
            model,
            tokenizer,
            make_corpus(toy_pairs[5:9], name="b"),
            out,
            BuildConfig(key_layer="decoder_output"),
            append=True,
            progress=False,
        )
    with pytest.raises(IncompatibleError, match="different tokenization"):
        build_datastore(
            model,
            tokenizer,
            make_corpus(toy_pairs[5:9], name="b"),
            out,
            append=True,
            source_prefix="translate: ",
            progress=False,
        )
    assert _tree_digest(out) == before


def test_tsv_and_jsonl_corpora_build_the_same_datastore(marian, toy_pairs, tmp_path: Path) -> None:
    import json

    model, tokenizer = marian
    pairs = toy_pairs[:12]
    text = CorpusSpec.from_args(source=str(tmp_path / "c.en"), target=str(tmp_path / "c.de"))
    Path(text.paths[0]).write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    Path(text.paths[1]).write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    tsv = tmp_path / "c.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"src": s, "tgt": t}, ensure_ascii=False) + "\n" for s, t in pairs),
        encoding="utf-8",
    )
    stores = [
        build_datastore(model, tokenizer, spec, tmp_path / name, progress=False)
        for name, spec in (
            ("text", text),
            ("tsv", CorpusSpec.from_args(corpus=str(tsv))),
            ("jsonl", CorpusSpec.from_args(corpus=str(jsonl))),
        )
    ]
    assert [s.manifest["corpora"][0]["format"] for s in stores] == ["text", "tsv", "jsonl"]
    for other in stores[1:]:
        assert_same_content(stores[0], other, exact_keys=True)


def test_manifest_describes_the_build(datastore, marian, toy_spec) -> None:
    _, tokenizer = marian
    m = read_manifest(datastore.path)
    assert m["state"] == "complete"
    assert m["model"]["config_class"] == "MarianConfig"
    assert m["key"] == {
        "layer": "ffn_input",
        "module": "model.decoder.layers.1.fc1",
        "dim": 64,
        "dtype": "float16",
    }
    assert m["tokenizer"]["vocab_size"] == len(tokenizer)
    assert m["corpora"][0]["paths"] == list(toy_spec.paths)
    assert m["corpora"][0]["lines"] == 400 and m["corpora"][0]["sentences"] == 400
    assert [s["sentences"] for s in m["shards"]] == [150, 150, 100]
    assert sum(s["count"] for s in m["shards"]) == m["count"] == datastore.count
    described = datastore.describe()
    assert described["entries"] == datastore.count and described["shards"] == 3
    assert (datastore.path / MANIFEST).is_file()


def test_keys_beyond_fp16_range_are_refused(
    marian, toy_pairs, make_corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from knnmt.hf.teacher_forcing import ForcedBatch, KeyExtractor

    model, tokenizer = marian
    real = KeyExtractor.run

    def huge_for_line_3(self: KeyExtractor, *args: Any, **kwargs: Any) -> ForcedBatch:
        forced = real(self, *args, **kwargs)
        keys = [k * 1e6 if pair.line == 3 else k for pair, k in zip(forced.pairs, forced.keys, strict=True)]
        return dataclasses.replace(forced, keys=keys)

    monkeypatch.setattr(KeyExtractor, "run", huge_for_line_3)
    with pytest.raises(
        DatastoreError, match=r"keys of sentence 2 \(line 3\) reach .* beyond float16's range"
    ):
        build_datastore(model, tokenizer, make_corpus(toy_pairs[:5]), tmp_path / "ds", progress=False)
