"""``KNNMT.explain``: per target token, p_MT, p_kNN, the mixture and the neighbours with their provenance."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import strip_pad
from knnmt.core.config import KNNConfig


def test_explain_reference_finds_itself_with_provenance(translator, marian, datastore, toy_pairs) -> None:
    _, tokenizer = marian
    sid = 157  # in the second shard: global entry ids and sentence ids must be resolved across shards
    record = datastore.sentence(sid)
    source, target = record["src"], record["tgt"]
    assert (source, target) == toy_pairs[record["line"] - 1]
    config = KNNConfig(k=4, lambda_=0.3, temperature=10.0)

    explanation = translator.explain(source, target, config)

    target_ids = tokenizer(text_target=[target])["input_ids"][0]
    assert [e.token_id for e in explanation] == target_ids
    assert [e.position for e in explanation] == list(range(len(target_ids)))
    for t, e in enumerate(explanation):
        assert e.token == tokenizer.convert_ids_to_tokens(target_ids[t])
        assert len(e.neighbours) == config.k
        assert [n.distance for n in e.neighbours] == sorted(n.distance for n in e.neighbours)
        nearest = e.neighbours[0]
        # the reference's own entry (or an identical duplicate pair) is at distance ~0
        assert nearest.distance < 1e-3
        assert (nearest.source, nearest.target, nearest.position, nearest.token_id) == (
            source,
            target,
            t,
            e.token_id,
        )
        for n in e.neighbours:
            stored = datastore.sentence(n.sentence_id)
            assert (n.source, n.target) == (stored["src"], stored["tgt"])
            assert int(datastore.values[n.entry_id]) == n.token_id
            sent, pos = datastore.provenance(np.array([n.entry_id]))
            assert (int(sent[0]), int(pos[0])) == (n.sentence_id, n.position)
            # the neighbour's token really is token `position` of its stored target sentence
            assert tokenizer(text_target=[n.target])["input_ids"][0][n.position] == n.token_id
            assert n.token == tokenizer.convert_ids_to_tokens(n.token_id)
        # probabilities are consistent with each other
        p_knn = sum(
            np.exp(-n.distance / config.temperature) for n in e.neighbours if n.token_id == e.token_id
        )
        p_knn /= sum(np.exp(-n.distance / config.temperature) for n in e.neighbours)
        assert e.p_knn == pytest.approx(p_knn, rel=1e-4, abs=1e-6)
        assert e.p_final == pytest.approx(config.lambda_ * e.p_knn + (1 - config.lambda_) * e.p_mt)
        assert 0.0 <= e.p_mt <= 1.0 and len(e.top_mt) == 5
        assert sum(p for _, p in e.top_knn) == pytest.approx(1.0, abs=1e-5)


def test_translate_with_neighbours_explains_its_own_output(translator, marian, toy_pairs) -> None:
    _, tokenizer = marian
    sources = [s for s, _ in toy_pairs[200:203]]
    config = KNNConfig(k=3, lambda_=0.6)
    out = translator.translate(sources, knn=config, return_neighbors=True, max_new_tokens=24)
    start = translator.model.config.decoder_start_token_id
    for t in out:
        assert t.explanation is not None
        ids = strip_pad(t.token_ids, tokenizer.pad_token_id, start)
        assert [e.token_id for e in t.explanation] == ids
        assert all(len(e.neighbours) == 3 for e in t.explanation)
        as_dict = t.to_dict()
        assert (
            as_dict["explanation"][0]["neighbours"][0]["sentence_id"]
            == t.explanation[0].neighbours[0].sentence_id
        )
