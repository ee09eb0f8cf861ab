"""With λ = 1 and k = 1 over a datastore of the reference pairs, greedy decoding walks the datastore:
every step's nearest key is the reference's own teacher-forced key, so the references come back exactly.

Run for each architecture family of the registry: Marian (BART-style ``fc1``), T5 (``DenseReluDense``)
and M2M100 (``fc1``, decoder start ``</s>`` then a forced target-language token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import RETRIEVAL_MODES, build_test_subset, strip_pad, translator_for
from knnmt.core.config import BuildConfig, KNNConfig
from knnmt.hf.logits_processor import knn_generation
from knnmt.hf.toy import toy_corpus
from knnmt.pipeline.build import build_datastore
from knnmt.pipeline.translator import KNNMT
from knnmt.search.index import exact_index
from knnmt.search.retriever import IndexRetriever

#: Reference pairs not seen by the T5/M2M100 tokenizers' training (seed 1) in this order.
REFERENCES = toy_corpus(30, seed=5)


def _recover(
    model: Any, tokenizer: Any, make_corpus: Any, tmp_path: Path, retrieval: str = "index", **gen: Any
) -> None:
    spec = make_corpus(REFERENCES)
    store = build_datastore(model, tokenizer, spec, tmp_path / "ds", BuildConfig(), progress=False)
    assert store.manifest["sentences"] == len(REFERENCES)
    if retrieval != "index":  # Subset kNN-MT: each source must find its own sentence among 4
        build_test_subset(store, model, tokenizer)
    knn = translator_for(
        retrieval, model, tokenizer, store, config=KNNConfig(lambda_=1.0, k=1), subset_size=4
    )
    sources = [s for s, _ in REFERENCES]
    out = knn.translate(sources, batch_size=8, max_new_tokens=60, **gen)
    expected = tokenizer(text_target=[t for _, t in REFERENCES])["input_ids"]
    start, pad = model.config.decoder_start_token_id, tokenizer.pad_token_id
    for translation, reference, (source, target) in zip(out, expected, REFERENCES, strict=True):
        assert translation.token_ids[0] == start
        generated = strip_pad(translation.token_ids[1:], pad)
        assert generated == list(reference), f"{source!r} -> {translation.text!r}, expected {target!r}"
    # the same model without retrieval does not produce the references (the datastore did the work)
    plain = knn.translate(sources[:4], knn=False, max_new_tokens=20, **gen)
    assert all(p.text != t for p, (_, t) in zip(plain, REFERENCES[:4], strict=True))


@pytest.mark.parametrize("retrieval", RETRIEVAL_MODES)
def test_marian_reproduces_references(marian, make_corpus, tmp_path: Path, retrieval: str) -> None:
    model, tokenizer = marian
    _recover(model, tokenizer, make_corpus, tmp_path, retrieval)
    if retrieval != "index":
        return
    # and the detokenised text is the reference sentence itself
    store_out = KNNMT(
        model,
        tokenizer,
        build_datastore(
            model, tokenizer, make_corpus(REFERENCES[:5], name="five"), tmp_path / "ds5", progress=False
        ),
        config=KNNConfig(lambda_=1.0, k=1),
    ).translate([s for s, _ in REFERENCES[:5]])
    assert [t.text for t in store_out] == [t for _, t in REFERENCES[:5]]


@pytest.mark.parametrize("retrieval", RETRIEVAL_MODES)
def test_t5_reproduces_references(t5, make_corpus, tmp_path: Path, retrieval: str) -> None:
    model, tokenizer = t5
    _recover(model, tokenizer, make_corpus, tmp_path, retrieval)


def test_m2m100_reproduces_references(m2m100, make_corpus, tmp_path: Path) -> None:
    """Through the lower-level API (``knn_generation`` inside ``model.generate``); the front door is
    ``test_m2m100_front_door``."""
    model, tokenizer = m2m100
    assert (tokenizer.src_lang, tokenizer.tgt_lang) == ("en", "de")
    store = build_datastore(model, tokenizer, make_corpus(REFERENCES), tmp_path / "ds", progress=False)
    retriever = IndexRetriever(exact_index(store), store)
    sources = [s for s, _ in REFERENCES]
    inputs = tokenizer(sources, return_tensors="pt", padding=True)
    de = tokenizer.get_lang_id("de")
    with (
        torch.inference_mode(),
        knn_generation(
            model,
            retriever,
            store.values,
            KNNConfig(lambda_=1.0, k=1),
            batch_size=len(sources),
            finished_ids=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        ) as proc,
    ):
        out = model.generate(**inputs, logits_processor=[proc], forced_bos_token_id=de, max_new_tokens=60)
    expected = tokenizer(text_target=[t for _, t in REFERENCES])["input_ids"]
    for row, reference in zip(out.tolist(), expected, strict=True):
        assert row[:2] == [model.config.decoder_start_token_id, de]
        assert strip_pad(row[1:], tokenizer.pad_token_id) == list(reference)


def test_m2m100_front_door(m2m100, make_corpus, tmp_path: Path) -> None:
    model, tokenizer = m2m100
    store = build_datastore(model, tokenizer, make_corpus(REFERENCES[:5]), tmp_path / "ds", progress=False)
    knn = KNNMT(model, tokenizer, store, config=KNNConfig(lambda_=1.0, k=1))
    assert knn.generate_defaults == {"forced_bos_token_id": tokenizer.get_lang_id("de")}
    _recover(model, tokenizer, make_corpus, tmp_path / "again")


@pytest.mark.parametrize("family", ["t5", "m2m100"])
def test_manifest_records_architecture(
    family: str, request: pytest.FixtureRequest, make_corpus, tmp_path: Path
) -> None:
    model, tokenizer = request.getfixturevalue(family)
    store = build_datastore(model, tokenizer, make_corpus(REFERENCES[:3]), tmp_path / "ds", progress=False)
    manifest = store.manifest
    assert manifest["model"]["config_class"] == type(model.config).__name__
    assert manifest["key"]["dim"] == 32
    expected_module = (
        "decoder.block.1.layer.2.DenseReluDense" if family == "t5" else "model.decoder.layers.1.fc1"
    )
    assert manifest["key"]["module"] == expected_module
    assert manifest["tokenization"]["tgt_lang"] == getattr(tokenizer, "tgt_lang", None)
