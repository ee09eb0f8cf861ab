"""Datastore keys (teacher forcing, whole target at once) are the queries that incremental decoding
(``generate`` with a KV cache, one token per step) computes for the same prefix."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from knnmt.hf.capture import ActivationCapture
from knnmt.hf.registry import key_module
from knnmt.hf.teacher_forcing import EncodedPair, KeyExtractor, pair_queries


class ForceAndRecord(LogitsProcessor):
    """Forces ``generate`` to emit ``target`` (one row) and records the captured query of every step."""

    def __init__(self, capture: ActivationCapture, target: list[int]) -> None:
        self.capture = capture
        self.target = target
        self.queries: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        assert self.capture.last is not None and self.capture.last.shape[1] == 1, (
            "expected one new token per step"
        )
        self.queries.append(self.capture.last[0, -1].float().clone())
        step = input_ids.shape[1] - 1
        forced = torch.full_like(scores, -torch.inf)
        forced[:, self.target[step]] = 0.0
        return forced


def incremental_queries(
    model: Any, tokenizer: Any, source: str, target_ids: list[int], key_layer: str = "ffn_input"
) -> np.ndarray:
    """Queries of every prefix of ``target_ids`` as ``generate`` (KV cache) computes them: ``[T, dim]``."""
    inputs = tokenizer([source], return_tensors="pt")
    with torch.inference_mode(), ActivationCapture(key_module(model, key_layer)) as capture:
        forcer = ForceAndRecord(capture, target_ids)
        out = model.generate(
            **inputs,
            logits_processor=[forcer],
            num_beams=1,
            do_sample=False,
            use_cache=True,
            max_new_tokens=len(target_ids) + 2,
        )
    assert out[0, 1:].tolist() == target_ids
    return torch.stack(forcer.queries).numpy()


def test_datastore_keys_match_incremental_decoding(marian, datastore, toy_pairs) -> None:
    model, tokenizer = marian
    sentence_ids = np.asarray(datastore.provenance(np.arange(datastore.count))[0])
    checked = 0
    for sid in (0, 1, 151, 399):  # first, second, and sentences in later shards
        record = datastore.sentence(sid)
        assert (record["src"], record["tgt"]) == toy_pairs[record["line"] - 1]
        target_ids = tokenizer(text_target=[record["tgt"]])["input_ids"][0]
        entries = np.nonzero(sentence_ids == sid)[0]
        _, positions = datastore.provenance(entries)
        assert positions.tolist() == list(range(len(target_ids)))
        assert datastore.values[entries].tolist() == target_ids
        stored = datastore.get_keys(entries)  # fp16 on disk, float32 here

        queries = incremental_queries(model, tokenizer, record["src"], target_ids)
        assert stored.shape == queries.shape == (len(target_ids), datastore.dim)
        # fp16 storage: relative rounding error 2^-11
        np.testing.assert_allclose(stored, queries, rtol=1e-3, atol=1e-3)
        assert np.abs(stored - queries).max() <= 1e-3 * np.abs(queries).max()
        # and the fp32 teacher-forcing keys match the incremental queries to float32 noise
        extractor = KeyExtractor(model, tokenizer.pad_token_id)
        pair = EncodedPair(
            sid, 1, record["src"], record["tgt"], tokenizer([record["src"]])["input_ids"][0], target_ids
        )
        (keys,) = extractor([pair])
        assert keys.dtype == torch.float32
        np.testing.assert_allclose(keys.numpy(), queries, atol=1e-4, rtol=0)
        checked += 1
    assert checked == 4


@pytest.mark.parametrize(
    ("family", "key_layer"),
    [("marian", "ffn_input"), ("marian", "decoder_output"), ("t5", "ffn_input"), ("m2m100", "ffn_input")],
)
def test_keys_match_queries_in_a_padded_batch(
    family: str, key_layer: str, request: pytest.FixtureRequest, toy_pairs
) -> None:
    """fp32 keys from a *padded, length-sorted* teacher-forcing batch equal each sentence's incremental
    queries (padding and batching change nothing), for every registered architecture family."""
    model, tokenizer = request.getfixturevalue(family)
    pairs = toy_pairs[100:104]
    encoded = [
        EncodedPair(
            i, i + 1, s, t, tokenizer([s])["input_ids"][0], tokenizer(text_target=[t])["input_ids"][0]
        )
        for i, (s, t) in enumerate(pairs)
    ]
    assert len({len(p.target_ids) for p in encoded}) > 1 or len({len(p.source_ids) for p in encoded}) > 1
    extractor = KeyExtractor(model, tokenizer.pad_token_id, key_layer)
    keys = extractor(encoded)
    for pair, k in zip(encoded, keys, strict=True):
        queries = incremental_queries(model, tokenizer, pair.source, pair.target_ids, key_layer)
        assert k.shape == queries.shape
        np.testing.assert_allclose(k.float().numpy(), queries, atol=1e-4, rtol=1e-4)


def test_pair_queries_are_each_pairs_own_keys_in_input_order(marian, toy_pairs) -> None:
    model, tokenizer = marian
    pairs = toy_pairs[:7]
    batched = pair_queries(model, tokenizer, pairs, batch_size=3)
    assert len(batched) == len(pairs)
    for (source, target), keys in zip(pairs, batched, strict=True):
        alone = pair_queries(model, tokenizer, [(source, target)], batch_size=1)[0]
        assert keys.dtype == torch.float32
        assert keys.shape == alone.shape == (len(tokenizer(text_target=target)["input_ids"]), keys.shape[1])
        torch.testing.assert_close(keys, alone, rtol=1e-4, atol=1e-4)


def test_build_tuning_and_explain_share_one_teacher_forcing(
    marian, toy_pairs, make_corpus, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The datastore build, ``tune``'s reference statistics and ``explain`` all run
    :func:`~knnmt.hf.teacher_forcing.teacher_force`: for the same pair they get the same keys (the
    build stores them as fp16), and tuning and explain the same ``log p_MT``."""
    from knnmt.hf.teacher_forcing import KeyExtractor
    from knnmt.pipeline.build import build_datastore
    from knnmt.pipeline.translator import KNNMT
    from knnmt.pipeline.tuning import reference_statistics

    model, tokenizer = marian
    source, target = toy_pairs[17]
    seen: list[Any] = []
    real = KeyExtractor.run

    def record(self: KeyExtractor, *args: Any, **kwargs: Any) -> Any:
        forced = real(self, *args, **kwargs)
        seen.append(forced)
        return forced

    monkeypatch.setattr(KeyExtractor, "run", record)
    store = build_datastore(
        model, tokenizer, make_corpus([(source, target)]), tmp_path / "ds", progress=False
    )
    knn = KNNMT(model, tokenizer, store)
    reference_statistics(knn, [source], [target], k_max=4)
    knn.explain(source, target)
    assert len(seen) == 3, "each caller runs one teacher-forced batch of this pair"
    built, tuned, explained = seen
    assert built.log_probs is None and built.vectors is not None  # the build needs no lm_head
    for forced in seen:
        assert [p.target_ids for p in forced.pairs] == [tokenizer(text_target=target)["input_ids"]]
    torch.testing.assert_close(tuned.keys[0], built.keys[0], rtol=0, atol=0)
    torch.testing.assert_close(explained.keys[0], built.keys[0], rtol=0, atol=0)
    torch.testing.assert_close(explained.log_probs[0], tuned.log_probs[0], rtol=0, atol=0)
    stored = store.get_keys(np.arange(store.count))
    np.testing.assert_array_equal(stored, built.keys[0].to(torch.float16).float().numpy())
