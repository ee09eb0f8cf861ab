"""From neighbours to probabilities: ``p_kNN``, the weight λ and the interpolation with ``p_MT``, in log
space. The one place of the kNN-MT formula: generation (:mod:`knnmt.hf.logits_processor`), the tuning
grid (:func:`knnmt.pipeline.tuning.grid_log_likelihood`) and ``explain``
(:meth:`knnmt.pipeline.translator.KNNMT.explain`) all compute it with these functions.

The formula (Khandelwal et al., 2021, eq. 2-3), with squared L2 distances ``d_i`` of the ``k`` neighbours
and their tokens ``v_i``::

    p_kNN(y) = Σ_{i: v_i = y} exp(-d_i / τ) / S,        S = Σ_i exp(-d_i / τ)
    P(y)     = λ_q · p_kNN(y) + (1 - λ_q) · p_MT(y)

with ``λ_q = λ`` (the paper), or the adaptive ``λ_q = λ · S / (S + exp(-half_distance / τ))``
(:class:`knnmt.core.config.KNNConfig`). Two rules complete it where the paper has nothing to say:

* a row without any neighbour (faiss ``-1`` ids, ``inf`` distances; e.g. an empty Subset kNN-MT
  subset) has no ``p_kNN``: its ``λ_q`` is 0 and ``P = p_MT``;
* a token the model's log-probabilities mask (``-inf``, e.g. ``bad_words_ids`` or a forced token in
  ``generate``) stays masked, whatever its neighbours say.

The building blocks broadcast, so that the tuning grid evaluates many τ and λ at once:
:func:`neighbour_logits` -> :func:`log_total` and :func:`knn_log_prob` -> :func:`mixture_log_weights`
-> :func:`mix`. :func:`knn_log_probs`, :func:`retrieval_weights` and :func:`interpolate` are the same
formula on the sparse per-neighbour sets generation uses (``R`` rows, ``k`` neighbours, ``V`` vocabulary):
nothing here builds a dense ``[R, V]`` kNN distribution; the at most ``k`` tokens a row's neighbours vote
for are handled as a sparse ``[R, k]`` set and written into the output once.
"""

from __future__ import annotations

import math

import torch


def neighbour_logits(
    distances: torch.Tensor, valid: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """``-d_i / τ`` where the neighbour exists, ``-inf`` where it is missing.

    Args:
        distances: ``[..., k]`` squared L2 distances (any value where missing).
        valid: ``[..., k]`` bool, the neighbour exists.
        temperature: ``τ > 0``, a number or a tensor broadcastable against ``distances``.

    Returns:
        ``[..., k]`` in the dtype of ``distances`` (float32 for integer inputs).
    """
    dtype = distances.dtype if distances.is_floating_point() else torch.float32
    logits = -distances.to(dtype) / temperature
    return torch.where(valid, logits, torch.full_like(logits, -math.inf))


def log_total(logits: torch.Tensor) -> torch.Tensor:
    """``log S = log Σ_i exp(-d_i / τ)`` over the last dimension: ``[..., k] -> [...]`` (``-inf`` for a row
    without neighbours)."""
    return torch.logsumexp(logits, dim=-1)


def knn_log_prob(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """``log p_kNN(y)`` of one token per row: ``log Σ_{i: match_i} exp(-d_i / τ) - log S``.

    Args:
        logits: ``[..., k]`` from :func:`neighbour_logits`.
        match: ``[..., k]`` bool (broadcastable), neighbour ``i`` votes for the token (``v_i = y``).

    Returns:
        ``[...]``: ``-inf`` where no existing neighbour votes for the token, or none exists.
    """
    total = log_total(logits)
    hit = torch.logsumexp(logits.masked_fill(~match, -math.inf), dim=-1)
    return torch.where(torch.isfinite(total), hit - total, torch.full_like(total, -math.inf))


def mixture_log_weights(
    total: torch.Tensor,
    lambda_: float | torch.Tensor,
    temperature: float | torch.Tensor,
    half_distance: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log λ_q, log(1 - λ_q))`` of each row, from its ``log S`` (:func:`log_total`).

    ``λ_q = λ`` with ``half_distance=None``, else ``λ · S / (S + w0)`` with ``w0 = exp(-half_distance / τ)``
    and then ``1 - λ_q = (1 - λ) + λ · w0 / (S + w0)`` (computed so, without cancellation). Rows without
    neighbours (``S = 0``) get ``λ_q = 0``. ``total``, ``lambda_`` (in ``[0, 1]``) and ``temperature``
    broadcast against each other (the tuning grid: ``total [T, 1]``, ``lambda_ [L]``).
    """
    lam = torch.as_tensor(lambda_, dtype=total.dtype, device=total.device)
    log_lam, log_rest = torch.log(lam), torch.log1p(-lam)  # -inf at λ = 0 and at λ = 1
    found = torch.isfinite(total)
    if half_distance is None:
        log_w = torch.where(found, log_lam, -math.inf)
        log_1mw = torch.where(found, log_rest, 0.0)
        return log_w, log_1mw
    virtual = -half_distance / temperature  # log w0
    norm = torch.logaddexp(total, torch.as_tensor(virtual, dtype=total.dtype, device=total.device))
    log_w = log_lam + (total - norm)  # -inf where S = 0
    log_1mw = torch.logaddexp(log_rest, log_lam + (virtual - norm))  # log 1 = 0 where S = 0
    return log_w, log_1mw


def mix(
    log_p_mt: torch.Tensor,
    log_p_knn: torch.Tensor,
    log_w: float | torch.Tensor,
    log_1mw: float | torch.Tensor,
) -> torch.Tensor:
    """``log P = logaddexp(log(1 - λ_q) + log p_MT, log λ_q + log p_kNN)``, elementwise (broadcasting);
    ``-inf`` (masked) entries of ``log_p_mt`` stay ``-inf``."""
    mixed = torch.logaddexp(log_1mw + log_p_mt, log_w + log_p_knn)
    return torch.where(torch.isneginf(log_p_mt), log_p_mt, mixed)


def knn_log_probs(
    distances: torch.Tensor, values: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """``log p_kNN(v_i)`` for each neighbour's token (:func:`knn_log_prob` of every neighbour's token).

    Neighbours with ``values < 0`` (faiss ``-1``) get no weight. Entries of a row that vote for the
    same token all carry that token's total.

    Args:
        distances: ``[R, k]`` squared L2 distances.
        values: ``[R, k]`` int64 token ids, ``-1`` for missing neighbours.
        temperature: ``τ > 0``.

    Returns:
        ``[R, k]`` float32 log-probabilities (``-inf`` for missing neighbours; a row with no
        neighbour at all is all ``-inf``).
    """
    valid = values >= 0
    logits = neighbour_logits(distances.float(), valid, temperature)
    same = (values.unsqueeze(2) == values.unsqueeze(1)) & valid.unsqueeze(1)  # [R, k, k]: v_j = v_i
    out = knn_log_prob(logits.unsqueeze(1), same)
    return out.masked_fill(~valid, -math.inf)


def retrieval_weights(
    distances: torch.Tensor,
    values: torch.Tensor,
    lambda_: float,
    temperature: float,
    half_distance: float | None,
) -> torch.Tensor:
    """The weight ``λ_q`` of ``p_kNN`` for each row (:func:`mixture_log_weights`).

    Args:
        distances: ``[R, k]`` squared L2 distances.
        values: ``[R, k]`` token ids, ``-1`` for missing neighbours.

    Returns:
        ``[R]`` float32: ``lambda_`` when ``half_distance`` is ``None``, else
        ``lambda_ · S / (S + exp(-half_distance / T))`` with ``S = Σ_i exp(-d_i / T)``; 0 for a row
        without neighbours.
    """
    logits = neighbour_logits(distances.double(), values >= 0, temperature)
    log_w, _ = mixture_log_weights(log_total(logits), lambda_, temperature, half_distance)
    return log_w.exp().float()


def interpolate(
    log_p_mt: torch.Tensor, tokens: torch.Tensor, log_p_knn: torch.Tensor, lambda_: float | torch.Tensor
) -> torch.Tensor:
    """:func:`mix` over the vocabulary: ``log((1 - λ) p_MT + λ p_kNN)``; ``-inf`` entries of ``log_p_mt``
    stay ``-inf``.

    Args:
        log_p_mt: ``[R, V]`` model log-probabilities (rows need not be normalised masks-wise).
        tokens: ``[R, k]`` int64 token ids of the neighbours (``-1`` missing).
        log_p_knn: ``[R, k]`` from :func:`knn_log_probs`.
        lambda_: interpolation weight in ``[0, 1]``: one for all rows, or ``[R]`` per row
            (:func:`retrieval_weights`).

    Returns:
        ``[R, V]`` new tensor (inputs are not modified). Rows whose neighbours are all missing
        keep ``log_p_mt`` (``λ_q = 0``); so do rows at ``λ = 1`` whose voted tokens are all masked
        (nothing else would be left).
    """
    if isinstance(lambda_, torch.Tensor):
        lam = lambda_.to(device=log_p_mt.device, dtype=torch.float64).unsqueeze(1)  # [R, 1]
        log_knn_weight: float | torch.Tensor = torch.log(lam).to(log_p_mt.dtype)  # -inf at λ = 0
        log_mt_weight: float | torch.Tensor = torch.log1p(-lam).to(log_p_mt.dtype)  # -inf at λ = 1
        full = lam.squeeze(1) >= 1.0  # [R]
    else:
        log_knn_weight = math.log(lambda_) if lambda_ > 0.0 else -math.inf
        log_mt_weight = math.log1p(-lambda_) if lambda_ < 1.0 else -math.inf
        full = torch.full((log_p_mt.shape[0],), lambda_ >= 1.0, device=log_p_mt.device)
    # tokens no neighbour votes for: mix() with p_kNN = 0, i.e. log(1 - λ) + log p_MT (-inf stays -inf)
    out = log_p_mt + log_mt_weight
    valid = tokens >= 0
    # missing neighbours borrow the row's first valid one, so duplicate scatter writes agree
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    tokens = torch.where(valid, tokens, tokens.gather(1, first)).clamp(min=0)
    log_p_knn = torch.where(valid, log_p_knn, log_p_knn.gather(1, first))
    mixed = mix(log_p_mt.gather(1, tokens), log_p_knn, log_knn_weight, log_mt_weight)
    out.scatter_(1, tokens, mixed)  # ``out`` is our own new tensor
    # rows with no neighbour, or (at λ = 1, where only neighbour tokens are finite) whose neighbours
    # are all masked: fall back to the model. Checked on [R, k], never on [R, V].
    fallback = ~valid.any(dim=1) | (full & ~torch.isfinite(mixed).any(dim=1))
    if bool(fallback.any()):
        out = torch.where(fallback.unsqueeze(1), log_p_mt, out)
    return out
