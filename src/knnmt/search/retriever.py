"""Retrievers: turn query vectors into neighbour ids. The generation code only sees this interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ..store.datastore import Datastore
from ..store.removals import Removed
from .index import SearchIndex


class Retriever(Protocol):
    """Finds the ``k`` nearest datastore entries of each query.

    A retriever is used in this order: :meth:`prepare` once per batch of source sentences (with their
    encoder states when :attr:`needs_encoder_states`; :func:`prepare_retrieval` does this), then
    :meth:`search` at every decoding step. ``groups[i]`` of :meth:`search` is the index (within the
    prepared batch) of the source sentence that query ``i`` belongs to; sentence-dependent retrievers
    (Subset kNN-MT) use it, others ignore it and make :meth:`prepare` a no-op.
    """

    @property
    def needs_encoder_states(self) -> bool:
        """Whether :meth:`prepare` needs the batch's ``encoder_states`` and ``attention_mask`` (the
        encoder is then run before ``generate`` and its output reused by it)."""
        ...

    def prepare(
        self,
        sources: Sequence[str],
        encoder_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Get ready to search for the queries of the next batch (called once per batch).

        Args:
            sources: ``B`` source sentences (without model prefix), in batch order.
            encoder_states: ``[B, L, d]`` encoder output, given when :attr:`needs_encoder_states`.
            attention_mask: ``[B, L]`` of the encoder input, given with ``encoder_states``.
        """
        ...

    def search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``queries [n, dim]`` float32, ``groups [n]`` int64 -> ``(D [n, k] float32 squared L2,
        I [n, k] int64 global entry ids)``, ``-1``/``inf`` where fewer than ``k`` entries are found."""
        ...

    def describe(self) -> str:
        """A one-line label of the retrieval method and its settings, for reports (e.g. ``index(Flat)``)."""
        ...


def prepare_retrieval(
    retriever: Retriever,
    model: Any,
    sources: Sequence[str],
    inputs: dict[str, torch.Tensor],
    encoder_outputs: Any = None,
) -> dict[str, Any]:
    """Give the retriever its batch before decoding (:meth:`Retriever.prepare`); returns extra
    ``generate`` kwargs.

    When the retriever :attr:`~Retriever.needs_encoder_states`, the encoder is run here once and its
    output is returned as ``{"encoder_outputs": ...}`` so that ``generate`` reuses it instead of
    encoding again. Other retrievers get the sources only (a no-op for :class:`IndexRetriever`).

    Args:
        sources: the batch's source sentences (without model prefix).
        inputs: the tokenised batch (``input_ids``, ``attention_mask`` ``[B, L]``).
        encoder_outputs: the encoder's output for ``inputs`` when the caller already has it.
    """
    if not retriever.needs_encoder_states:
        retriever.prepare(list(sources))
        return {}
    if encoder_outputs is None:
        encoder_outputs = model.get_encoder()(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=True
        )
    retriever.prepare(list(sources), encoder_outputs.last_hidden_state, inputs["attention_mask"])
    return {"encoder_outputs": encoder_outputs}


class WholeMemoryRetriever:
    """Base of retrievers that search the whole memory for every query (not sentence-dependent):
    :meth:`Retriever.prepare` has nothing to do and needs no encoder states."""

    needs_encoder_states = False

    def prepare(
        self,
        sources: Sequence[str],
        encoder_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Nothing to do: every query searches the whole memory."""


class IndexRetriever(WholeMemoryRetriever):
    """Vanilla kNN-MT: one faiss search over the whole datastore.

    For an approximate index with ``index.rerank = r > 0`` the index returns ``r·k`` candidates,
    whose exact squared-L2 distances to the stored fp16 keys pick and sort the final ``k``
    (PQ distances are coarse; this recovers most of the exact neighbours cheaply).
    """

    def __init__(self, index: SearchIndex, datastore: Datastore) -> None:
        self.index = index
        self.datastore = datastore

    def describe(self) -> str:
        rerank = self.index.rerank
        return f"index({self.index.factory}" + (f", rerank={rerank})" if rerank > 0 else ")")

    def search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest entries not removed (:func:`search_excluding`)."""
        return search_excluding(self.search_all, queries, k, self.datastore.removed, self.datastore.count)

    def search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest entries, removed ones included (re-ranked when the index says so)."""
        rerank = self.index.rerank
        if rerank <= 0:
            return self.search_index(queries, k)
        _, ids = self.search_index(queries, k * rerank)
        return exact_rerank(self.datastore, queries, ids, k)

    def search_index(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's own ``k`` nearest (before any re-rank): ``queries [n, dim]`` -> ``(D, I) [n, k]``;
        a distributed retriever answers it with the index's parts."""
        return self.index.search(queries, k)


#: Candidates fetched per query at most to replace removed entries: ``k + min(removed, cap)``.
OVERFETCH_CAP = 1024


def search_excluding(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    k: int,
    removed: Removed,
    total: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest entries of each query that are not ``removed``: the one filter of deletions
    for every retriever that searches the whole memory.

    Without removals this is ``search(queries, k)``. Otherwise ``k + min(removed, 2k)`` candidates are
    fetched, the removed dropped and the ``k`` nearest kept; rows left short are searched again with 4x
    more, up to ``k +`` min(removed, :data:`OVERFETCH_CAP`) (more removed neighbours of one query
    than that leave its row short, ``-1`` padded, rather than scanning without end).

    Args:
        search: ``(queries [n, dim], fetch) -> (D [n, fetch], I [n, fetch])`` sorted, ``-1`` padded.
        queries: ``[n, dim]`` float32.
        removed: what to skip (:attr:`knnmt.store.datastore.Datastore.removed`).
        total: entries searchable, removed ones included.

    Returns:
        ``(D [n, k] float32, I [n, k] int64)``, ``inf``/``-1`` padded.
    """
    if not removed:
        return search(queries, k)
    most = k + min(removed.entry_count, OVERFETCH_CAP)
    fetch = k + min(removed.entry_count, 2 * k)
    dist, ids = nearest_kept(*search(queries, fetch), k, removed)
    reachable = min(k, total - removed.entry_count)
    while fetch < min(total, most):
        short = (ids >= 0).sum(axis=1) < reachable
        if not short.any():
            break
        fetch = min(fetch * 4, most)
        dist[short], ids[short] = nearest_kept(*search(queries[short], fetch), k, removed)
    return dist, ids


def nearest_kept(
    dist: np.ndarray, ids: np.ndarray, k: int, removed: Removed | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(D, I) [n, c]`` (any order) -> the ``k`` nearest of each row that are not ``-1`` nor removed,
    sorted, ``inf``/``-1`` padded to ``[n, k]``."""
    bad = ids < 0
    if removed:
        bad |= removed.entry_mask(ids)
    dist = np.where(bad, np.inf, dist).astype(np.float32)
    ids = np.where(bad, -1, ids).astype(np.int64)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    dist, ids = np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return dist, ids


def exact_rerank(
    datastore: Datastore, queries: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` candidates of each row nearest to its query by exact squared L2 to the stored keys.

    Args:
        queries: ``[n, dim]`` float32.
        ids: ``[n, c]`` candidate entry ids (``-1`` missing), ``c >= k`` or fewer.

    Returns:
        ``(D [n, k], I [n, k])``, ``-1``/``inf`` where fewer than ``k`` candidates exist.
    """
    keys = datastore.get_keys(ids)  # [n, c, dim] float32
    q = np.asarray(queries, dtype=np.float32)
    keys -= q[:, None, :]  # in place: ``keys`` is our own array; exact differences, no expansion
    exact = np.einsum("ncd,ncd->nc", keys, keys)
    exact = np.where(ids >= 0, exact, np.inf).astype(np.float32)
    kk = min(k, ids.shape[1])
    best = torch.topk(torch.from_numpy(exact), kk, dim=1, largest=False, sorted=True)
    distances = best.values.numpy()
    out_ids = np.where(np.isfinite(distances), np.take_along_axis(ids, best.indices.numpy(), axis=1), -1)
    if kk < k:  # pad to k columns, faiss style
        pad = k - kk
        distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
    return distances, out_ids
