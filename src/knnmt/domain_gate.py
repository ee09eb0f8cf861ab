"""Sentence-level domain gate: retrieval only for inputs that resemble the memory's sources.

A translation memory of one domain helps text of that domain and can hurt other text: its
terminology overrides the model's on inputs the memory never saw. The domain gate decides per input
sentence, before decoding, whether to retrieve at all. Its signal is the cosine similarity between
the input's mean-pooled encoder states and those of the nearest memory *source* sentence (the dense
sentence index that ``knnmt index --subset --sentence-search dense`` builds for Subset kNN-MT).
Sentences below ``KNNConfig.domain_gate`` are translated by the plain model and searched nowhere,
which also saves all of their search time.

``knnmt tune`` sets the threshold on the dev sets: with out-of-domain dev sources, the similarity that
best separates them from the in-domain ones (:func:`threshold_separating`); with in-domain dev
sources alone, the similarity that keeps retrieval on for a chosen share of them
(:func:`threshold_for_recall`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datastore import Datastore
from .errors import UsageError
from .sentence_search import DenseSentenceSearch, embed_sources, mean_pool

logger = logging.getLogger(__name__)

#: the sentence search the gate reads (its embeddings are the model's own encoder states)
GATE_SEARCH = "dense"


class DomainGate:
    """Similarity of input sentences to the nearest memory source sentence.

    Args:
        search: the datastore's dense sentence index (unit-length mean-pooled encoder states).
    """

    def __init__(self, search: DenseSentenceSearch) -> None:
        self.search = search

    @classmethod
    def load(cls, datastore: Datastore, subset_dir: str | Path | None = None) -> DomainGate:
        """The gate of ``datastore``, from the dense sentence index of its subset directory
        (``subset_dir``, default ``<datastore>/subset``). An index built before pairs were appended
        is used with a warning: inputs are compared with the sentences it covers."""
        from .subset import SUBSET_DIR, checked_settings

        directory = Path(subset_dir) if subset_dir is not None else datastore.path / SUBSET_DIR
        settings = checked_settings(directory, datastore, allow_grown=True)
        if GATE_SEARCH not in settings.get("sentence_search", {}):
            raise UsageError(
                f"the domain gate needs the dense sentence index of {datastore.path}; build it with "
                f"`knnmt index {datastore.path} --subset --sentence-search dense`"
            )
        return cls(DenseSentenceSearch.load(directory / GATE_SEARCH))

    def similarity(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """``[B]`` cosine similarity of each input to its nearest memory source sentence.

        Args:
            encoder_states: ``[B, L, d]`` the model's encoder output for the batch.
            attention_mask: ``[B, L]`` 1 for real tokens.
        """
        return self.search.similarity(mean_pool(encoder_states, attention_mask))

    def similarity_of(
        self, model: Any, tokenizer: Any, sources: Sequence[str], source_prefix: str = ""
    ) -> np.ndarray:
        """``[len(sources)]`` similarities of raw input sentences (encodes them with ``model``)."""
        if not sources:
            return np.zeros(0, dtype=np.float32)
        return self.search.similarity(embed_sources(model, tokenizer, sources, source_prefix=source_prefix))


def threshold_for_recall(similarities: np.ndarray, recall: float) -> float:
    """The domain gate that keeps retrieval on for a ``recall`` share of the given (in-domain) sentences.

    The threshold is the ``1 - recall`` quantile of their similarities, rounded down to 4 decimals
    (so that it stays below the sentences it is meant to keep).
    """
    if not 0.0 < recall <= 1.0:
        raise UsageError(f"domain recall must be in (0, 1], got {recall!r}")
    values = np.asarray(similarities, dtype=np.float64)
    if values.size == 0:
        raise UsageError("the domain gate needs at least one in-domain sentence to set its threshold")
    return _round_down(float(np.quantile(values, 1.0 - recall, method="lower")))


def _round_down(value: float) -> float:
    """A threshold just below ``value`` (4 decimals), so that the sentence at ``value`` passes it."""
    return max(-1.0, math.floor(value * 10_000) / 10_000)


#: :attr:`knnmt.tuning.TuningResult.domain_rule` of a gate set by :func:`threshold_separating`
SEPARATE = "separate"
#: ... and of one set by :func:`threshold_for_recall`
RECALL = "recall"


def threshold_separating(in_domain: np.ndarray, out_of_domain: np.ndarray) -> float | None:
    """The domain gate that best tells in-domain from out-of-domain sentences by their similarities.

    It maximises (share of ``in_domain`` kept) − (share of ``out_of_domain`` kept), Youden's J, over
    thresholds at the in-domain values; among equal scores the lowest threshold (keeping the most
    in-domain sentences) wins. Rounded down to 4 decimals like :func:`threshold_for_recall`, unless
    that would let an out-of-domain sentence through. ``None`` when no threshold keeps a larger share
    of in-domain than of out-of-domain sentences (the similarity does not separate them).

    Args:
        in_domain: ``[N]`` similarities of in-domain (dev) sentences, whose retrieval should stay on.
        out_of_domain: ``[M]`` similarities of out-of-domain (dev) sentences, which retrieval should leave
            alone.
    """
    ins = np.sort(np.asarray(in_domain, dtype=np.float64))
    outs = np.sort(np.asarray(out_of_domain, dtype=np.float64))
    if ins.size == 0 or outs.size == 0:
        raise UsageError(
            "separating the domains needs in-domain and out-of-domain sentences, got "
            f"{ins.size} and {outs.size}"
        )
    candidates = np.unique(ins)  # ascending
    kept_in = 1.0 - np.searchsorted(ins, candidates, side="left") / ins.size
    kept_out = 1.0 - np.searchsorted(outs, candidates, side="left") / outs.size
    score = kept_in - kept_out
    if score.max() <= 0:
        return None
    value = float(candidates[int(np.flatnonzero(score >= score.max() - 1e-12)[0])])
    rounded = _round_down(value)
    return rounded if not np.any((outs >= rounded) & (outs < value)) else value
