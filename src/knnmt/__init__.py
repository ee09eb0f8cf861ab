"""knnmt: nearest-neighbour machine translation (kNN-MT) for Hugging Face seq2seq models.

The front door is :class:`KNNMT`; plain functions build what it needs::

    from knnmt import KNNMT, KNNConfig, CorpusSpec, build_datastore, build_index, load_model
"""

from __future__ import annotations

from .core.config import BuildConfig, IndexConfig, KNNConfig
from .core.errors import (
    CorpusError,
    DatastoreError,
    IncompatibleError,
    KnnmtError,
    UnsupportedModelError,
    UsageError,
)
from .core.version import __version__
from .hf.registry import register_architecture, supported_architectures
from .pipeline.build import build_datastore, build_subset_index
from .pipeline.translator import KNNMT, Translation, load_model
from .search.index import SearchIndex, build_index, drop_keys, exact_index
from .search.subset import SubsetConfig, SubsetRetriever, SubsetSearch
from .store.corpus import CorpusSpec
from .store.datastore import Datastore

__all__ = [
    "KNNMT",
    "BuildConfig",
    "CorpusError",
    "CorpusSpec",
    "Datastore",
    "DatastoreError",
    "IncompatibleError",
    "IndexConfig",
    "KNNConfig",
    "KnnmtError",
    "SearchIndex",
    "SubsetConfig",
    "SubsetRetriever",
    "SubsetSearch",
    "Translation",
    "UnsupportedModelError",
    "UsageError",
    "__version__",
    "build_datastore",
    "build_index",
    "build_subset_index",
    "drop_keys",
    "exact_index",
    "load_model",
    "register_architecture",
    "supported_architectures",
]
