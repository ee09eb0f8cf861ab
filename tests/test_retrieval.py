"""p_kNN and its interpolation with p_MT against hand computations and a dense numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knnmt.knn.distribution import interpolate, knn_log_probs, retrieval_weights


def test_knn_log_probs_hand_computed_softmax() -> None:
    # row 0: token 5 twice, token 7 once, one missing neighbour (-1)
    # row 1: every neighbour missing; row 2: the first neighbour is missing, one token only
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0], [9.0, 2.0, 6.0, 4.0]])
    values = torch.tensor([[5, 7, 5, -1], [-1, -1, -1, -1], [-1, 3, 3, 3]])
    temperature = 2.0

    out = knn_log_probs(distances, values, temperature)

    assert out.dtype == torch.float32 and out.shape == (3, 4)
    w = np.exp(-np.array([1.0, 2.0, 3.0]) / temperature)
    w /= w.sum()  # softmax over the three valid neighbours only
    p5, p7 = w[0] + w[2], w[1]
    np.testing.assert_allclose(out[0, :3].numpy(), np.log([p5, p7, p5]), rtol=1e-6)
    assert out[0, 3].item() == -math.inf
    assert torch.isneginf(out[1]).all()
    assert out[2, 0].item() == -math.inf
    np.testing.assert_allclose(out[2, 1:].numpy(), 0.0, atol=1e-6)  # all the mass on token 3
    # the probabilities of the distinct tokens of a row sum to one
    assert math.isclose(p5 + p7, 1.0)
    assert math.isclose(math.exp(out[0, 0].item()) + math.exp(out[0, 1].item()), 1.0, rel_tol=1e-6)


def test_knn_log_probs_temperature_sharpens() -> None:
    distances = torch.tensor([[1.0, 5.0]])
    values = torch.tensor([[1, 2]])
    soft = knn_log_probs(distances, values, 100.0).exp()[0]
    sharp = knn_log_probs(distances, values, 0.5).exp()[0]
    np.testing.assert_allclose(soft.numpy(), np.exp([-0.01, -0.05]) / np.exp([-0.01, -0.05]).sum(), rtol=1e-6)
    np.testing.assert_allclose(sharp.numpy(), np.exp([-2.0, -10.0]) / np.exp([-2.0, -10.0]).sum(), rtol=1e-5)


def dense_reference(
    log_p_mt: np.ndarray, tokens: np.ndarray, log_p_knn: np.ndarray, lam: float
) -> np.ndarray:
    """``log((1-λ) p_MT + λ p_kNN)`` with a dense p_kNN; -inf where p_MT is masked; rows with no
    neighbour, or with no finite entry left, keep ``log_p_mt``."""
    rows, vocab = log_p_mt.shape
    p_knn = np.zeros((rows, vocab))
    for r in range(rows):
        for tok, lp in zip(tokens[r], log_p_knn[r], strict=True):
            if tok >= 0:
                p_knn[r, tok] = math.exp(lp)  # duplicates carry the token's total: assign, do not add
    with np.errstate(divide="ignore"):
        out = np.log((1 - lam) * np.exp(log_p_mt.astype(np.float64)) + lam * p_knn)
    out[np.isneginf(log_p_mt)] = -np.inf
    for r in range(rows):
        if not (tokens[r] >= 0).any() or not np.isfinite(out[r]).any():
            out[r] = log_p_mt[r]
    return out


@pytest.fixture
def mixing_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows, vocab, k = 6, 11, 4
    log_p_mt = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * 2, dim=-1)
    log_p_mt[1, [2, 5]] = -math.inf  # masked tokens (e.g. bad_words_ids), one of them voted for below
    log_p_mt[4, :] = -math.inf
    log_p_mt[4, 9] = 0.0  # a forced token (e.g. forced BOS/EOS): everything else masked
    tokens = torch.tensor(
        [
            [3, 3, 7, -1],  # repeated token and a missing neighbour
            [5, 1, 5, 10],  # votes for a masked token
            [-1, -1, -1, -1],  # nothing retrieved
            [-1, 8, 0, 8],  # first neighbour missing
            [2, 2, 2, 2],  # only votes for a token the model masked
            [6, 4, 9, 10],  # all distinct
        ]
    )
    distances = torch.rand(rows, k, generator=gen) * 50
    distances, _ = torch.sort(distances, dim=1)
    log_p_knn = knn_log_probs(distances, tokens, 10.0)
    return log_p_mt, tokens, log_p_knn


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_interpolate_matches_dense_reference(mixing_case, lam: float) -> None:
    log_p_mt, tokens, log_p_knn = mixing_case
    before = [t.clone() for t in mixing_case]

    out = interpolate(log_p_mt, tokens, log_p_knn, lam)

    for original, now in zip(before, mixing_case, strict=True):
        assert torch.equal(original, now), "interpolate modified its input"
    expected = dense_reference(log_p_mt.numpy(), tokens.numpy(), log_p_knn.numpy(), lam)
    assert out.shape == log_p_mt.shape
    np.testing.assert_array_equal(np.isneginf(out.numpy()), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(out.numpy()[finite], expected[finite], rtol=1e-5, atol=1e-6)
    # masks are preserved whatever the retrieval says
    assert torch.isneginf(out[1, [2, 5]]).all()
    assert torch.isneginf(out[4, torch.arange(11) != 9]).all()


def test_interpolate_edge_cases(mixing_case) -> None:
    log_p_mt, tokens, log_p_knn = mixing_case
    # λ = 0: exactly the model
    assert torch.equal(interpolate(log_p_mt, tokens, log_p_knn, 0.0), log_p_mt)
    # λ = 1: exactly p_kNN on the voted tokens, -inf elsewhere (rows with a usable neighbour)
    out = interpolate(log_p_mt, tokens, log_p_knn, 1.0)
    for row in (0, 3, 5):
        voted = tokens[row][tokens[row] >= 0]
        mask = torch.ones(11, dtype=torch.bool)
        mask[voted] = False
        assert torch.isneginf(out[row, mask]).all()
        for tok, lp in zip(tokens[row].tolist(), log_p_knn[row].tolist(), strict=True):
            if tok >= 0:
                assert out[row, tok].item() == pytest.approx(lp, abs=1e-6)
        assert out[row].exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # no neighbour at all, or every voted token masked at λ = 1: the model's distribution
    assert torch.equal(out[2], log_p_mt[2])
    assert torch.equal(out[4], log_p_mt[4])
    # for unmasked rows the mixture stays a distribution
    mixed = interpolate(log_p_mt, tokens, log_p_knn, 0.3)
    for row in (0, 2, 3, 5):
        assert mixed[row].exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_per_row_lambda_equals_each_rows_own_scalar_mix(mixing_case) -> None:
    log_p_mt, tokens, log_p_knn = mixing_case
    lams = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0, 0.7])
    out = interpolate(log_p_mt, tokens, log_p_knn, lams)
    for row, lam in enumerate(lams.tolist()):
        alone = interpolate(log_p_mt[row : row + 1], tokens[row : row + 1], log_p_knn[row : row + 1], lam)
        torch.testing.assert_close(out[row : row + 1], alone, rtol=1e-6, atol=1e-6)


def test_retrieval_weights_follow_the_virtual_neighbour_formula() -> None:
    distances = torch.tensor([[1.0, 4.0, 9.0], [50.0, 60.0, 70.0], [2.0, 3.0, 0.0]])
    values = torch.tensor([[5, 6, -1], [1, 2, 3], [-1, -1, -1]])
    tau, lam, half = 10.0, 0.8, 20.0
    got = retrieval_weights(distances, values, lam, tau, half)
    for row in range(3):
        s = sum(
            np.exp(-d / tau)
            for d, v in zip(distances[row].tolist(), values[row].tolist(), strict=True)
            if v >= 0
        )
        want = lam * s / (s + np.exp(-half / tau))
        assert got[row].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert got[0] > 0.7 and got[1] < 0.06 and got[2] == 0.0  # near: ≈ λ; far: ≈ 0; none: 0
    # without a half distance the weight is the constant λ, and 0 where nothing was retrieved (the
    # model alone, as generation does for such rows)
    assert torch.equal(retrieval_weights(distances, values, lam, tau, None), torch.tensor([lam, lam, 0.0]))
