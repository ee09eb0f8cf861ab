"""From neighbours to probabilities: ``p_kNN`` and its interpolation with ``p_MT``, in log space.

Shapes: ``R`` rows (live hypotheses), ``k`` neighbours, ``V`` vocabulary.
Nothing here builds a dense ``[R, V]`` kNN distribution: the at most ``k`` tokens a row's
neighbours vote for are handled as a sparse ``[R, k]`` set and written into the output once.
"""

from __future__ import annotations

import math

import torch


def knn_log_probs(distances: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log p_kNN(v_i)`` for each neighbour's token.

    ``p_kNN(y) ∝ Σ_{i: v_i = y} exp(-d_i / T)``; neighbours with ``values < 0`` (faiss ``-1``)
    get no weight. Entries of a row that vote for the same token all carry that token's total.

    Args:
        distances: ``[R, k]`` squared L2 distances.
        values: ``[R, k]`` int64 token ids, ``-1`` for missing neighbours.
        temperature: ``T > 0``.

    Returns:
        ``[R, k]`` float32 log-probabilities (``-inf`` for missing neighbours; a row with no
        neighbour at all is all ``-inf``).
    """
    valid = values >= 0
    logits = torch.where(
        valid, -distances.float() / temperature, torch.full_like(distances, -math.inf, dtype=torch.float32)
    )
    log_weights = torch.log_softmax(logits, dim=-1)  # NaN for all-missing rows, fixed below
    log_weights = torch.where(valid, log_weights, torch.full_like(log_weights, -math.inf))
    same = (values.unsqueeze(2) == values.unsqueeze(1)) & valid.unsqueeze(1)  # [R, k, k]
    # log Σ_{j: v_j = v_i} w_j
    masked = log_weights.unsqueeze(1).expand_as(same).masked_fill(~same, -math.inf)
    out = torch.logsumexp(masked, dim=-1)
    return out.masked_fill(~valid, -math.inf)


def retrieval_weights(
    distances: torch.Tensor,
    values: torch.Tensor,
    lambda_: float,
    temperature: float,
    half_distance: float | None,
) -> torch.Tensor:
    """The weight ``λ_q`` of ``p_kNN`` for each row (see :class:`knnmt.core.config.KNNConfig`).

    Args:
        distances: ``[R, k]`` squared L2 distances.
        values: ``[R, k]`` token ids, ``-1`` for missing neighbours.

    Returns:
        ``[R]`` float32: ``lambda_`` everywhere when ``half_distance`` is ``None``, else
        ``lambda_ · S / (S + exp(-half_distance / T))`` with ``S = Σ_i exp(-d_i / T)`` (0 for a row
        without neighbours).
    """
    rows = distances.shape[0]
    if half_distance is None:
        return torch.full((rows,), float(lambda_), dtype=torch.float32)
    missing = torch.full_like(distances, -math.inf, dtype=torch.float64)
    logits = torch.where(values >= 0, -distances.double() / temperature, missing)
    log_total = torch.logsumexp(logits, dim=-1)  # [R] log S, -inf without neighbours
    virtual = torch.full_like(log_total, -half_distance / temperature)
    share = torch.exp(log_total - torch.logaddexp(log_total, virtual))  # S / (S + w0), 0 when S = 0
    return (lambda_ * share).float()


def interpolate(
    log_p_mt: torch.Tensor, tokens: torch.Tensor, log_p_knn: torch.Tensor, lambda_: float | torch.Tensor
) -> torch.Tensor:
    """``log((1 - λ) p_MT + λ p_kNN)`` over the vocabulary; ``-inf`` entries of ``log_p_mt`` stay ``-inf``.

    Args:
        log_p_mt: ``[R, V]`` model log-probabilities (rows need not be normalised masks-wise).
        tokens: ``[R, k]`` int64 token ids of the neighbours (``-1`` missing).
        log_p_knn: ``[R, k]`` from :func:`knn_log_probs`.
        lambda_: interpolation weight in ``[0, 1]``: one for all rows, or ``[R]`` per row
            (:func:`retrieval_weights`).

    Returns:
        ``[R, V]`` new tensor (inputs are not modified). Rows whose neighbours are all missing
        keep ``log_p_mt``.
    """
    if isinstance(lambda_, torch.Tensor):
        lam = lambda_.to(device=log_p_mt.device, dtype=torch.float64).unsqueeze(1)  # [R, 1]
        log_mt_weight: float | torch.Tensor = torch.log1p(-lam).to(log_p_mt.dtype)  # -inf at λ = 1
        log_knn_weight: float | torch.Tensor = torch.log(lam).to(log_p_mt.dtype)  # -inf at λ = 0
        full = lam.squeeze(1) >= 1.0  # [R]
    else:
        log_mt_weight = math.log1p(-lambda_) if lambda_ < 1.0 else -math.inf
        log_knn_weight = math.log(lambda_) if lambda_ > 0.0 else -math.inf
        full = torch.full((log_p_mt.shape[0],), lambda_ >= 1.0, device=log_p_mt.device)
    out = log_p_mt + log_mt_weight
    valid = tokens >= 0
    # missing neighbours borrow the row's first valid one, so duplicate scatter writes agree
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    tokens = torch.where(valid, tokens, tokens.gather(1, first)).clamp(min=0)
    log_p_knn = torch.where(valid, log_p_knn, log_p_knn.gather(1, first))
    mt_at = log_p_mt.gather(1, tokens)
    mixed = torch.logaddexp(mt_at + log_mt_weight, log_p_knn + log_knn_weight)
    mixed = torch.where(torch.isneginf(mt_at), mt_at, mixed)  # keep -inf masks
    out.scatter_(1, tokens, mixed)  # ``out`` is our own new tensor
    # rows with no neighbour, or (at λ = 1, where only neighbour tokens are finite) whose neighbours
    # are all masked: fall back to the model. Checked on [R, k], never on [R, V].
    fallback = ~valid.any(dim=1) | (full & ~torch.isfinite(mixed).any(dim=1))
    if bool(fallback.any()):
        out = torch.where(fallback.unsqueeze(1), log_p_mt, out)
    return out
