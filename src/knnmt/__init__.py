"""knnmt: nearest-neighbour machine translation (kNN-MT) for Hugging Face seq2seq models."""

from __future__ import annotations

__version__ = "0.1.0"
