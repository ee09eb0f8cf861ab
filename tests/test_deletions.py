"""A deleted pair is absent from every reading path: vanilla search (translate, evaluate, tune and
explain all search through the retriever), Subset kNN-MT (BM25 and dense sentence search, both
scorers), and the domain gate; deleted by the library (``knnmt memory delete``'s code), seen by a
datastore opened afterwards. Each check first shows the pair is found before the deletion."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import build_test_subset, translator_for
from knnmt.core.config import KNNConfig
from knnmt.core.errors import DatastoreError
from knnmt.hf.teacher_forcing import embed_sources
from knnmt.pipeline.memory import delete_sentences, sentence_record
from knnmt.pipeline.translator import KNNMT
from knnmt.store.datastore import Datastore
from knnmt.store.removals import tombstones_file

SENTENCE = 7
MODES = ("index", "subset-bm25-faiss", "subset-dense-adc")


def _readers(model: Any, tokenizer: Any, store: Datastore, subset: Path) -> dict[str, KNNMT]:
    config = KNNConfig(k=8, lambda_=0.5, temperature=10.0)
    return {
        mode: translator_for(mode, model, tokenizer, store, subset, subset_size=8, config=config)
        for mode in MODES
    }


def _found(knn: KNNMT, pair: dict[str, Any], store: Datastore) -> dict[str, Any]:
    """What each reading path finds for the stored pair: the sentences of its neighbours when the pair
    is explained, and those of the 8 nearest entries of its own keys (queries of a step)."""
    explained = knn.explain(pair["src"], pair["tgt"], top=8)
    lo, hi = store.sentence_entries(SENTENCE)
    knn.retriever.prepare([pair["src"]], *_encoder_states(knn, pair["src"]))
    _, ids = knn.retriever.search(store.get_keys(np.arange(lo, hi)), 8, np.zeros(hi - lo, dtype=np.int64))
    sentences, _ = store.provenance(ids)
    return {
        "explain": {n.sentence_id for token in explained for n in token.neighbours},
        "search": set(sentences[ids >= 0].tolist()),
        "exact_hit": bool((ids[:, 0] == np.arange(lo, hi)).all()),
    }


def _encoder_states(knn: KNNMT, source: str) -> tuple[Any, ...]:
    if not knn.retriever.needs_encoder_states:
        return ()
    inputs = knn.tokenizer([source], return_tensors="pt")
    with torch.no_grad():
        states = knn.model.get_encoder()(**inputs).last_hidden_state
    return states, inputs["attention_mask"]


def test_a_deleted_pair_is_absent_from_every_reading_path(marian, datastore, tmp_path: Path) -> None:
    model, tokenizer = marian
    store = Datastore.open(shutil.copytree(datastore.path, tmp_path / "ds"))
    subset = build_test_subset(store, model, tokenizer, tmp_path / "subset")
    pair = store.sentence(SENTENCE)
    readers = _readers(model, tokenizer, store, subset)
    for mode, knn in readers.items():
        before = _found(knn, pair, store)
        assert before["exact_hit"], mode  # each of its keys finds itself first
        assert SENTENCE in before["explain"] and SENTENCE in before["search"], mode
    gate = readers["index"]
    assert gate.source_similarity([pair["src"]])[0] > 0.999  # the identical source is in the memory

    report = delete_sentences(store.path, [SENTENCE])
    entries = int(np.diff(store.sentence_entries(SENTENCE))[0])
    assert report == {"removed": [SENTENCE], "entries": entries, "removed_total": 1}
    assert sentence_record(Datastore.open(store.path), SENTENCE)["removed"]

    reopened = Datastore.open(store.path)  # what a new `knnmt translate/evaluate/tune/explain` reads
    for mode, knn in _readers(model, tokenizer, reopened, subset).items():
        after = _found(knn, pair, reopened)
        assert SENTENCE not in after["explain"] and SENTENCE not in after["search"], mode
        assert len(after["search"]) > 0, mode  # other sentences fill the k neighbours
        if mode != "index":  # the sentence search itself no longer returns the pair's sentence
            assert SENTENCE not in knn.retriever.last_sentence_ids.tolist()[0], mode
            assert (knn.retriever.last_sentence_ids >= 0).all(), mode  # and its place is filled
        else:
            # the domain gate compares the input with the nearest sentence still in the memory
            vectors = np.concatenate([v for _, v in reopened.iter_sentence_vectors()])
            cosine = vectors @ embed_sources(model, tokenizer, [pair["src"]])[0]
            nearest_other = np.delete(cosine, SENTENCE).max()
            similarity = knn.source_similarity([pair["src"]])[0]
            np.testing.assert_allclose(similarity, nearest_other, atol=1e-4)  # fp16 stored vectors
            assert cosine[SENTENCE] - nearest_other > 3e-4  # so the check tells the two apart

    # readers opened before the deletion are not told (a new process is); a corrupt list is refused
    tombstones_file(store.path).write_text("{broken")
    with pytest.raises(DatastoreError, match="corrupt list of removed sentences"):
        _ = Datastore.open(store.path).removed


def test_delete_refuses_unknown_sentences_and_writes_nothing(datastore, tmp_path: Path) -> None:
    store = Datastore.open(shutil.copytree(datastore.path, tmp_path / "ds"))
    with pytest.raises(KeyError, match="no sentence 400"):
        delete_sentences(store.path, [3, 400])
    assert not tombstones_file(store.path).exists()
    assert delete_sentences(store.path, [3, 3, 5])["removed"] == [3, 5]
    assert delete_sentences(store.path, [3])["removed_total"] == 2  # deleting twice is harmless


def test_memory_command_adds_lists_deletes_and_compacts(toy_dir, datastore, tmp_path: Path, capsys) -> None:
    from knnmt.apps.cli import main
    from knnmt.core.config import IndexConfig
    from knnmt.search.index import SearchIndex, build_index
    from knnmt.store.writelock import WriteLock

    store = Datastore.open(shutil.copytree(datastore.path, tmp_path / "ds"))
    build_index(store, IndexConfig(factory="Flat"), progress=False, force=True)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("the new sentence\tder neue satz\nanother one\tnoch einer\n", encoding="utf-8")
    ds, model = str(store.path), str(toy_dir / "model")
    add = ["-q", "memory", "add", ds, "-i", str(pairs), "--model", model, "--idempotency-key", "batch-1"]

    assert main(add) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["ids"] == [400, 401] and added["entries"] > 0 and not added["replayed"]
    assert main(add) == 0  # the same key and file again: nothing added twice
    assert json.loads(capsys.readouterr().out)["replayed"]
    assert Datastore.open(ds).manifest["sentences"] == 402

    assert main(["-q", "memory", "delete", ds, "400"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [400]
    assert main(["-q", "memory", "list", ds]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["memory"], r["removed"], r["src"]) for r in listed] == [
        (400, True, True, "the new sentence"),
        (401, True, False, "another one"),
    ]
    assert main(["-q", "memory", "list", ds, "--removed"]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [400]

    assert main(["-q", "memory", "compact", ds]) == 0  # the saved index now covers the added pairs
    assert json.loads(capsys.readouterr().out)["compacted"] == added["entries"]
    assert SearchIndex.load(store.path / "index", Datastore.open(ds)).ntotal == store.count + added["entries"]

    assert main(["-q", "memory", "delete", ds, "402"]) == 2  # no such sentence: a usage error
    with WriteLock(store.path, "serve"):  # another writer (a running service) holds the datastore
        assert main(["-q", "memory", "delete", ds, "401"]) == 1
    assert 401 not in Datastore.open(ds).removed.sentences


def test_a_memory_without_keys_still_learns(marian, datastore, tmp_path: Path) -> None:
    """Key storage none and the live memory: appended pairs keep their keys (side index, compaction),
    the main index searches without re-rank instead of failing on the dropped keys."""
    from knnmt.core.config import IndexConfig
    from knnmt.pipeline.memory import LiveMemory, add_pairs, load_main_index
    from knnmt.search.index import build_index

    model, tokenizer = marian
    path = shutil.copytree(datastore.path, tmp_path / "ds")
    config = IndexConfig(factory="IVF4,SQ8", nprobe=4, train_size=1000)
    other = path / "index-other"  # a second index over the same entries, built while keys were there
    build_index(Datastore.open(path), config, other, progress=False)
    build_index(Datastore.open(path), replace(config, drop_keys=True), progress=False, force=True)
    assert Datastore.open(path).key_storage == "none"
    add_pairs(path, [("the new sentence", "der neue satz")], model, tokenizer)
    store = Datastore.open(path)
    assert store.key_storage == "none+fp16"
    assert json.loads((other / "index.json").read_text())["rerank"] == 8  # saved before the drop
    main, covered, index_dir = load_main_index(store, other)
    assert main.rerank == 0 and covered == datastore.count
    memory = LiveMemory(store, main, covered, index_dir, model, tokenizer, compact_every=0)
    try:
        lo, hi = store.sentence_entries(400)
        queries = store.get_keys(np.arange(lo, hi))
        _, ids = memory.retriever.search(queries, 4, np.zeros(hi - lo, dtype=np.int64))
        assert (ids[:, 0] == np.arange(lo, hi)).all()  # the added pair's keys find themselves
        old = datastore.get_keys(np.arange(0, 5))  # and the main index still answers, by its own codes
        _, ids = memory.retriever.search(old, 4, np.zeros(5, dtype=np.int64))
        assert (ids[:, 0] == np.arange(5)).mean() >= 0.6
        assert memory.compact(wait=True) and memory.compactions == 1
    finally:
        memory.close()
