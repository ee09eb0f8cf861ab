"""Layer 2, search: turning query vectors into neighbours. The :class:`~.retriever.Retriever` protocol
and its faiss-index implementation with exact re-ranking (:mod:`.retriever`), the faiss indexes
(:mod:`.index`), Subset kNN-MT (:mod:`.subset`) with its product quantiser (:mod:`.pq`) and sentence
search (:mod:`.sentence_search`). Imports ``knn``, ``store`` and ``core``; knows no model."""
