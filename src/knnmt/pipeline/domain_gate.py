"""Sentence-level domain gate: retrieval only for inputs that resemble the memory's sources.

A translation memory of one domain helps text of that domain and can hurt other text: its
terminology overrides the model's on inputs the memory never saw. The domain gate decides per input
sentence, before decoding, whether to retrieve at all. Its signal is the cosine similarity between
the input's mean-pooled encoder states and those of the nearest memory *source* sentence.
Sentences below ``KNNConfig.domain_gate`` are translated by the plain model and searched nowhere,
which also saves all of their search time.

Where the memory's sentence vectors come from: every datastore built since they were stored keeps
each source's mean-pooled encoder output (``sentence_vectors.npy`` per shard, written by the build from
the same teacher-forced pass as the keys, so they cost no extra model time). ``knnmt index`` saves a
faiss index over them in ``<datastore>/sentences`` (:func:`build_sentence_index`); without it the gate
indexes the stored vectors in memory when it loads. Datastores from before keep the older source: the
dense sentence index of Subset kNN-MT (``knnmt index --subset --sentence-search dense``).

``knnmt tune`` sets the threshold on the dev sets: with out-of-domain dev sources, the similarity that
best separates them from the in-domain ones (:func:`threshold_separating`); with in-domain dev
sources alone, the similarity that keeps retrieval on for a chosen share of them
(:func:`threshold_for_recall`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import DatastoreError, UsageError
from ..hf.teacher_forcing import embed_sources
from ..search.sentence_search import DenseSentenceSearch, mean_pool
from ..store.datastore import Datastore
from ..store.removals import Removed

logger = logging.getLogger(__name__)

#: the sentence search the gate reads (its embeddings are the model's own encoder states)
GATE_SEARCH = "dense"
#: ``<datastore>/sentences``: the saved index over the datastore's stored sentence vectors
SENTENCE_DIR = "sentences"
#: up to this many sentences the sentence index is exact (``Flat``, 4·d bytes a sentence); above, an
#: IVF index with 8-bit scalar quantisation (d bytes a sentence, cosine error ~1e-3)
EXACT_SENTENCES = 200_000


def sentence_factory(sentences: int, dim: int) -> str:
    """The faiss factory string of a datastore's sentence index (see :data:`EXACT_SENTENCES`)."""
    if sentences <= EXACT_SENTENCES:
        return "Flat"
    return f"IVF{max(64, int(4 * math.sqrt(sentences)))},SQ8"


def build_sentence_index(
    datastore: Datastore, factory: str = "auto", *, force: bool = False
) -> dict[str, Any]:
    """Index the datastore's stored sentence vectors into ``<datastore>/sentences`` for the domain gate.

    Holds the datastore's write lock. ``factory="auto"`` follows :func:`sentence_factory`.

    Returns:
        the saved settings (factory, sentences, datastore fingerprint, build seconds).

    Raises:
        DatastoreError: the datastore has no stored sentence vectors, or an index exists (no ``force``).
    """
    from ..store.writelock import WriteLock

    target = datastore.path / SENTENCE_DIR
    with WriteLock(datastore.path, "index (sentences)"):
        if (target / DenseSentenceSearch.INDEX_FILE).is_file() and not force:
            raise DatastoreError(f"a sentence index already exists at {target}; pass --force to rebuild it")
        count = int(datastore.manifest["sentences"])
        name = sentence_factory(count, datastore.vector_dim) if factory == "auto" else factory
        start = time.perf_counter()
        search = DenseSentenceSearch.from_stored(datastore, name)
        settings = {
            "factory": name,
            "sentences": count,
            "dim": datastore.vector_dim,
            "datastore_fingerprint": datastore.fingerprint,
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        search.save(target, extra=settings)
    logger.info("sentence index %s: %d sentences in %.1fs", name, count, settings["build_seconds"])
    return settings


def index_sentences(datastore: Datastore, *, force: bool = True) -> dict[str, Any] | None:
    """What ``knnmt index`` (and the demo) do for the domain gate after the key index: index the stored
    sentence vectors (:func:`build_sentence_index`, seconds). An existing index is kept unless ``force``.

    Returns:
        the sentence index's settings, or ``None`` for a datastore built before sentence vectors were
        stored (logged; the gate can then use Subset kNN-MT's dense sentence index instead).
    """
    if not datastore.vector_dim:
        logger.info(
            "%s has no stored sentence vectors (built by an older knnmt): no sentence index; the domain "
            "gate can use `knnmt index %s --subset --sentence-search dense` instead",
            datastore.path,
            datastore.path,
        )
        return None
    existing = datastore.path / SENTENCE_DIR / DenseSentenceSearch.INDEX_FILE
    if existing.is_file() and not force:
        return None
    return build_sentence_index(datastore, force=True)


class DomainGate:
    """Similarity of input sentences to the nearest memory source sentence.

    Args:
        search: the datastore's dense sentence index (unit-length mean-pooled encoder states).
        datastore: whose removed sentences (deletions) are not counted as near (``None``: none are).
    """

    def __init__(self, search: DenseSentenceSearch, datastore: Datastore | None = None) -> None:
        self.search = search
        self.datastore = datastore

    def _removed(self) -> Removed | None:
        return self.datastore.removed if self.datastore is not None else None

    @classmethod
    def load(cls, datastore: Datastore, subset_dir: str | Path | None = None) -> DomainGate:
        """The gate of ``datastore``.

        From its stored sentence vectors when it has them: the saved index in ``<datastore>/sentences``
        if it belongs to this datastore (sentences appended since are added from the stored vectors),
        else an index built now in memory. Older datastores: the dense sentence index of the subset
        directory (``subset_dir``, default ``<datastore>/subset``); one built before pairs were appended
        is used with a warning (inputs are compared with the sentences it covers).
        """
        if datastore.vector_dim and subset_dir is None:
            return cls(_load_stored(datastore), datastore)
        from ..search.subset import SUBSET_DIR, checked_settings

        directory = Path(subset_dir) if subset_dir is not None else datastore.path / SUBSET_DIR
        settings = checked_settings(directory, datastore, allow_grown=True)
        if GATE_SEARCH not in settings.get("sentence_search", {}):
            raise UsageError(
                f"the domain gate needs the dense sentence index of {datastore.path}; build it with "
                f"`knnmt index {datastore.path} --subset --sentence-search dense`"
            )
        return cls(DenseSentenceSearch.load(directory / GATE_SEARCH), datastore)

    def add(self, vectors: np.ndarray) -> None:
        """Count more memory sources: ``[n, d]`` unit sentence vectors (e.g. a new shard's stored ones)."""
        self.search.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.search.count = int(self.search.index.ntotal)

    def similarity(self, encoder_states: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """``[B]`` cosine similarity of each input to its nearest memory source sentence.

        Args:
            encoder_states: ``[B, L, d]`` the model's encoder output for the batch.
            attention_mask: ``[B, L]`` 1 for real tokens.
        """
        return self.search.similarity(mean_pool(encoder_states, attention_mask), self._removed())

    def similarity_of(
        self, model: Any, tokenizer: Any, sources: Sequence[str], source_prefix: str = ""
    ) -> np.ndarray:
        """``[len(sources)]`` similarities of raw input sentences (encodes them with ``model``)."""
        if not sources:
            return np.zeros(0, dtype=np.float32)
        embeddings = embed_sources(model, tokenizer, sources, source_prefix=source_prefix)
        return self.search.similarity(embeddings, self._removed())


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


#: :attr:`knnmt.pipeline.tuning.TuningResult.domain_rule` of a gate set by :func:`threshold_separating`
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


def _load_stored(datastore: Datastore) -> DenseSentenceSearch:
    """The sentence search over ``datastore``'s stored vectors (see :meth:`DomainGate.load`)."""
    import json

    directory = datastore.path / SENTENCE_DIR
    settings_file = directory / "settings.json"
    count = int(datastore.manifest["sentences"])
    if settings_file.is_file():
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        covered = int(settings.get("sentences", -1))
        prefix_ok = 0 <= covered <= count and _prefix_fingerprint(datastore, covered) == settings.get(
            "datastore_fingerprint"
        )
        if prefix_ok:
            search = DenseSentenceSearch.load(directory)
            if covered < count:  # pairs appended since: their stored vectors join the loaded index
                gate = DomainGate(search)
                for first, vectors in datastore.iter_sentence_vectors():
                    if covered - first < len(vectors):
                        gate.add(vectors[max(covered - first, 0) :])
            return search
        logger.warning(
            "the sentence index at %s belongs to another datastore; indexing the stored sentence vectors "
            "in memory (rebuild it with `knnmt index %s --force`)",
            directory,
            datastore.path,
        )
    start = time.perf_counter()
    search = DenseSentenceSearch.from_stored(datastore, sentence_factory(count, datastore.vector_dim))
    logger.info(
        "domain gate: indexed %d stored sentence vectors in memory in %.1fs (`knnmt index` saves this index)",
        count,
        time.perf_counter() - start,
    )
    return search


def _prefix_fingerprint(datastore: Datastore, sentences: int) -> str | None:
    """The fingerprint the datastore had when it held its first ``sentences`` sentences (whole shards as
    written, merged ones counted by their parts)."""
    from ..store.datastore import manifest_fingerprint, prefixes

    for prefix in prefixes(datastore.manifest, sentences=sentences):
        corpora = 1 + max((int(s["corpus"]) for s in prefix["shards"]), default=-1)  # appended since go
        return manifest_fingerprint({**prefix, "corpora": prefix["corpora"][:corpora]})
    return None
