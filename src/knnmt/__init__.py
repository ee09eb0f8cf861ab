"""knnmt: nearest-neighbour machine translation (kNN-MT) for Hugging Face seq2seq models.

The front door is :class:`KNNMT`; plain functions build what it needs::

    from knnmt import KNNMT, KNNConfig, CorpusSpec, build_datastore, build_index, load_model
"""

from __future__ import annotations

__version__ = "0.1.0"

from .build import build_datastore
from .config import BuildConfig, IndexConfig, KNNConfig
from .corpus import CorpusSpec
from .datastore import Datastore
from .errors import (
    CorpusError,
    DatastoreError,
    IncompatibleError,
    KnnmtError,
    UnsupportedModelError,
    UsageError,
)
from .index import SearchIndex, build_index, exact_index
from .models import register_architecture, supported_architectures
from .subset import SubsetConfig, SubsetRetriever, SubsetSearch, build_subset_index
from .translator import KNNMT, Translation, load_model

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
    "exact_index",
    "load_model",
    "register_architecture",
    "supported_architectures",
]
