"""Retrievers: turn query vectors into neighbour ids. The generation code only sees this interface."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .datastore import Datastore
from .index import SearchIndex


class Retriever(Protocol):
    """Finds the ``k`` nearest datastore entries of each query.

    ``groups[i]`` is the index (within the current batch) of the source sentence that query ``i``
    belongs to; sentence-dependent retrievers (Subset kNN-MT) use it, others ignore it.
    """

    def search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(D [n, k] float32 squared L2, I [n, k] int64 global entry ids, -1 missing)``."""
        ...


class IndexRetriever:
    """Vanilla kNN-MT: one faiss search over the whole datastore.

    With ``exact_distances`` the returned distances are recomputed from the stored fp16 keys and
    the neighbours re-sorted (useful with PQ, whose distances are coarse).
    """

    def __init__(self, index: SearchIndex, datastore: Datastore, exact_distances: bool = False) -> None:
        self.index = index
        self.datastore = datastore
        self.exact_distances = exact_distances

    def search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = self.index.search(queries, k)
        if self.exact_distances and not self.index.is_exact:
            keys = self.datastore.get_keys(ids)  # [n, k, dim]
            exact = ((keys - queries[:, None, :].astype(np.float32)) ** 2).sum(-1)
            exact = np.where(ids >= 0, exact, np.inf).astype(np.float32)
            order = np.argsort(exact, axis=1, kind="stable")
            distances = np.take_along_axis(exact, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        return distances, ids
