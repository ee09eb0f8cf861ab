"""One kNN-MT formula, three call sites: generation (:class:`KNNLogitsProcessor`), the tuning grid
(:func:`grid_log_likelihood`) and ``explain`` (:meth:`KNNMT.explain`) give the same ``P(y)`` for the same
model probabilities and neighbours, including λ = 0 (exactly the model), λ = 1, the adaptive λ, missing
neighbours (faiss ``-1`` ids, ``inf`` distances) and ``-inf`` masks in the model's log-probabilities.

Each path is run through its own public entry point, so a change of formula in one of them fails here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from knnmt.core.config import KNNConfig
from knnmt.hf.logits_processor import KNNLogitsProcessor
from knnmt.pipeline.translator import KNNMT
from knnmt.pipeline.tuning import grid_log_likelihood
from knnmt.search.retriever import Retriever, WholeMemoryRetriever
from knnmt.store.datastore import Datastore

SETTINGS = [
    pytest.param(lam, half, tau, id=f"lambda={lam}-half={half}-tau={tau}")
    for lam, half, tau in [
        (0.0, None, 10.0),
        (0.3, None, 10.0),
        (1.0, None, 10.0),
        (0.6, None, 3.0),
        (0.0, 20.0, 10.0),
        (0.7, 20.0, 10.0),
        (1.0, 20.0, 10.0),
    ]
]


class _Capture:
    """Stands in for :class:`ActivationCapture`: the key module's input at the current step."""

    def __init__(self, queries: torch.Tensor) -> None:
        self.last = queries  # [R, 1, dim]


class _FixedNeighbours(WholeMemoryRetriever):
    """A :class:`Retriever` whose answers are given: row ``r`` of ``distances``/``ids`` for the query whose
    first coordinate is ``r`` (``by_first_coordinate``), else for the ``r``-th query."""

    def __init__(self, distances: np.ndarray, ids: np.ndarray, by_first_coordinate: bool) -> None:
        self.distances, self.ids, self.by_first = distances, ids, by_first_coordinate

    def describe(self) -> str:
        return "fixed"

    def search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.rint(queries[:, 0]).astype(int) if self.by_first else np.arange(len(queries))
        return self.distances[rows, :k].astype(np.float32), self.ids[rows, :k].astype(np.int64)


def generation(
    log_p_mt: torch.Tensor, distances: np.ndarray, ids: np.ndarray, values: np.ndarray, config: KNNConfig
) -> torch.Tensor:
    """``[R, V]`` log P of a decoding step whose rows have these model log-probs and neighbours."""
    rows = log_p_mt.shape[0]
    queries = torch.randn(rows, 1, 4)
    queries[:, 0, 0] = torch.arange(rows, dtype=torch.float32)  # the fake retriever's row
    retriever: Retriever = _FixedNeighbours(distances, ids, by_first_coordinate=True)
    processor = KNNLogitsProcessor(_Capture(queries), retriever, values, config, rows, finished_ids=[])
    input_ids = torch.zeros(rows, 1, dtype=torch.long)
    return processor(input_ids, log_p_mt.clone())  # type: ignore[arg-type]


def tuning(log_p_y: float, distances: np.ndarray, tokens: np.ndarray, y: int, config: KNNConfig) -> float:
    """log P of reference token ``y`` as the tuning grid scores it (a one-cell, one-token grid), from its
    log p_MT and the step's neighbours (``tokens [k]``, -1 missing), as tuning's reference statistics
    store them (``inf`` distances where missing, ``match``: the neighbour votes for ``y``)."""
    grid = grid_log_likelihood(
        np.array([log_p_y], dtype=np.float64),
        np.where(tokens >= 0, distances, np.inf)[None].astype(np.float64),
        (tokens == y)[None],
        [config.k],
        [config.temperature],
        [config.lambda_],
        [config.half_distance],
    )
    return float(grid[0, 0, 0, 0, 0])


def random_case(seed: int) -> dict[str, Any]:
    """Model log-probs with masks, and neighbours with repeated tokens and missing entries."""
    rng = np.random.default_rng(seed)
    rows, vocab, k, entries = 8, 30, 6, 40
    values = rng.integers(0, 12, entries).astype(np.int32)  # few tokens: neighbours often agree
    ids = rng.integers(0, entries, (rows, k)).astype(np.int64)
    distances = np.sort(rng.gamma(2.0, 8.0, (rows, k)), axis=1).astype(np.float32)
    ids[2], distances[2] = -1, np.inf  # nothing retrieved
    ids[3, 3:], distances[3, 3:] = -1, np.inf  # fewer than k
    ids[6, 4:], distances[6, 4:] = -1, 3.4028235e38  # faiss's float max as "missing": ids decide
    log_p_mt = torch.log_softmax(torch.from_numpy(rng.standard_normal((rows, vocab))).float() * 2, dim=-1)
    tokens = np.where(ids >= 0, values[np.clip(ids, 0, None)], -1)
    voted = int(tokens[4, 0])
    log_p_mt[4, [voted, 25, 26]] = -math.inf  # masks, one of them on a voted token (bad_words_ids)
    log_p_mt[4] = torch.log_softmax(log_p_mt[4], dim=-1)
    log_p_mt[5] = -math.inf
    log_p_mt[5, 29] = 0.0  # a forced token (forced_eos_token_id) that no neighbour votes for
    return {"log_p_mt": log_p_mt, "distances": distances, "ids": ids, "values": values, "tokens": tokens}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("lam", "half", "tau"), SETTINGS)
def test_generation_and_tuning_agree(seed: int, lam: float, half: float | None, tau: float) -> None:
    case = random_case(seed)
    log_p_mt, distances, ids, tokens = case["log_p_mt"], case["distances"], case["ids"], case["tokens"]
    config = KNNConfig(k=ids.shape[1], lambda_=lam, temperature=tau, half_distance=half)

    out = generation(log_p_mt, distances, ids, case["values"], config)

    rows, vocab = log_p_mt.shape
    assert out.shape == (rows, vocab)
    if lam == 0.0:
        assert torch.equal(out, torch.log_softmax(log_p_mt, dim=-1))  # exactly the model
    for r in range(rows):
        if r == 5 and lam == 1.0 and half is None:
            # λ_q = 1 and every token a neighbour votes for is masked: generation keeps the model's
            # distribution (a row-level rule of generation; teacher-forced tuning has no masks). With a
            # half distance λ_q < 1 and the row is mixed as any other.
            assert torch.equal(out[r], log_p_mt[r])
            continue
        for y in range(vocab):
            expected = tuning(float(log_p_mt[r, y]), distances[r], tokens[r], y, config)
            got = float(out[r, y])
            if math.isinf(expected) or math.isinf(got):
                assert got == expected, (r, y, got, expected)
            else:
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-5), (r, y)
    # missing neighbours: a row without any keeps the model; masks stay masked whatever the neighbours say
    assert torch.equal(out[2], torch.log_softmax(log_p_mt[2], dim=-1))
    assert torch.isneginf(out[4, [int(tokens[4, 0]), 25, 26]]).all()
    assert torch.isneginf(out[5, :29]).all()
    # where the model is not masked, P is a distribution
    for r in (0, 1, 2, 3, 6, 7):
        assert float(out[r].exp().sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("lam", "half", "tau"), SETTINGS)
def test_explain_agrees_with_generation_and_tuning(
    marian: tuple[Any, Any], datastore: Datastore, toy_pairs: list[tuple[str, str]], lam: float, half, tau
) -> None:
    model, tokenizer = marian
    source, target = toy_pairs[17]
    steps = len(tokenizer(text_target=[target])["input_ids"][0])
    rng = np.random.default_rng(3)
    k = 5
    pool = rng.choice(datastore.count, 8, replace=False)  # few entries: neighbours share tokens
    ids = pool[rng.integers(0, len(pool), (steps, k))].astype(np.int64)
    distances = np.sort(rng.gamma(2.0, 8.0, (steps, k)), axis=1).astype(np.float32)
    ids[1], distances[1] = -1, np.inf  # nothing retrieved at step 1
    ids[2, 2:], distances[2, 2:] = -1, np.inf  # fewer than k at step 2
    config = KNNConfig(k=k, lambda_=lam, temperature=tau, half_distance=half)
    knn = KNNMT(model, tokenizer, datastore, config=config, retriever=_FixedNeighbours(distances, ids, False))

    explained = knn.explain(source, target)

    assert len(explained) == steps
    values = np.asarray(datastore.values)
    tokens = np.where(ids >= 0, values[np.clip(ids, 0, None)], -1)
    vocab = 40
    for t, e in enumerate(explained):
        log_p = math.log(e.p_mt)
        # tuning: the reference token's log P from its log p_MT and the step's neighbours
        assert e.p_final == pytest.approx(
            math.exp(tuning(log_p, distances[t], tokens[t], e.token_id, config)), rel=1e-5, abs=1e-9
        )
        # generation: a step whose model gives the token p_MT (the rest spread over other tokens)
        row = torch.full((1, vocab), math.log((1 - e.p_mt) / (vocab - 1)))
        local = {tok: i for i, tok in enumerate(dict.fromkeys([e.token_id, *tokens[t][tokens[t] >= 0]]))}
        row[0, 0] = log_p
        step_values = np.array([local[v] for v in values[ids[t][ids[t] >= 0]]] or [0], dtype=np.int32)
        step_ids = np.where(ids[t] >= 0, np.cumsum(ids[t] >= 0) - 1, -1)[None]
        out = generation(row, distances[t : t + 1], step_ids, step_values, config)
        assert e.p_final == pytest.approx(float(out[0, 0].exp()), rel=1e-5, abs=1e-9)
        if lam == 0.0:
            assert e.p_final == pytest.approx(e.p_mt, rel=1e-6) and e.weight == 0.0
    assert explained[1].p_final == pytest.approx(explained[1].p_mt, rel=1e-6)  # nothing retrieved
    assert explained[1].weight == 0.0
