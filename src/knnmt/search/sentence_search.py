"""Sentence search for Subset kNN-MT: the datastore sentences whose *source* side is nearest to an input.

Two interchangeable searchers, both stored in a directory and returning ``[B, n]`` int64 global
sentence ids (``-1`` where fewer than ``n`` were found):

* :class:`BM25SentenceSearch` - lexical, BM25 over lower-cased word tokens (``bm25s``, in process,
  no server); sentences sharing no word with the input are not returned.
* :class:`DenseSentenceSearch` - the model's own encoder states mean-pooled over the non-pad tokens
  and L2-normalised (so nearest by L2 = nearest by cosine), in a faiss index.

Running the model to get those vectors is not done here (this layer knows no model): the encoder pass
is :func:`knnmt.hf.teacher_forcing.embed_sources`, handed in as a :class:`SourceEmbedder`; only the
pooling (:func:`mean_pool`) and the index are here.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import torch

from ..core.durable import atomic_path, fsync_tree, write_json_atomic
from ..core.errors import DatastoreError, UsageError
from ..store.datastore import Datastore
from ..store.removals import Removed
from .index import auto_factory, omp_threads

logger = logging.getLogger(__name__)

SENTENCE_SEARCHES: tuple[str, ...] = ("bm25", "dense")


class SourceEmbedder(Protocol):
    """Sentence vectors of source sentences for the dense search
    (:func:`knnmt.hf.teacher_forcing.embed_sources` with a model and tokenizer bound):
    ``[len(sources), d]`` float32, L2-normalised (:func:`mean_pool`)."""

    def __call__(
        self, sources: Sequence[str], *, source_prefix: str = "", progress: bool = False
    ) -> np.ndarray: ...


class SentenceSearch(Protocol):
    """Finds the ``n`` datastore sentences nearest to each input sentence."""

    kind: str
    #: whether :meth:`search` needs sentence embeddings (from the model's encoder) or only the text
    needs_encoder_states: bool

    def search(self, sources: Sequence[str], embeddings: np.ndarray | None, n: int) -> np.ndarray:
        """``[len(sources), n]`` int64 sentence ids, best first, ``-1`` where fewer were found.

        Args:
            sources: the input sentences (without any model-specific prefix).
            embeddings: ``[len(sources), d]`` float32 from :func:`mean_pool` (dense search only).
        """
        ...

    def save(self, directory: Path) -> None: ...


def datastore_sources(datastore: Datastore) -> Iterator[str]:
    """The source side of every datastore sentence, in global sentence-id order."""
    for shard in datastore.shards:
        with (shard.path / "sentences.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["src"]


#: Extra sentences fetched at most to replace removed ones (``n + min(removed, cap)``).
SENTENCE_OVERFETCH_CAP = 4096


def search_sentences(
    search: SentenceSearch,
    sources: Sequence[str],
    embeddings: np.ndarray | None,
    n: int,
    removed: Removed | None = None,
) -> np.ndarray:
    """``search.search`` without the ``removed`` sentences: the one sentence-level filter of deletions
    (Subset kNN-MT's subsets). Fetches ``n + min(removed, SENTENCE_OVERFETCH_CAP)`` and keeps the first
    ``n`` not removed of each row, in the search's order.

    Returns:
        ``[len(sources), n]`` int64 global sentence ids, ``-1`` padded.
    """
    if not removed:
        return search.search(sources, embeddings, n)
    found = search.search(sources, embeddings, n + min(len(removed.sentences), SENTENCE_OVERFETCH_CAP))
    found = np.where(removed.sentence_mask(found), -1, found)
    order = np.argsort(found < 0, axis=1, kind="stable")[:, :n]  # kept ones first, in their order
    kept: np.ndarray = np.take_along_axis(found, order, axis=1)
    return kept


# ---- BM25 ------------------------------------------------------------------------------------


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased word tokens (2+ word characters), no stemming, no stop-word list (any language)."""
    import bm25s

    tokens: list[list[str]] = bm25s.tokenize(
        list(texts), lower=True, stopwords=None, return_ids=False, show_progress=False
    )
    return tokens


class BM25SentenceSearch:
    """Lexical sentence search with BM25 (``bm25s``: sparse matrices, in process)."""

    kind = "bm25"
    needs_encoder_states = False

    def __init__(self, bm25: Any) -> None:
        self.bm25 = bm25
        self.count = int(bm25.scores["num_docs"])

    @classmethod
    def build(cls, sources: Sequence[str], progress: bool = False) -> BM25SentenceSearch:
        import bm25s

        bm25 = bm25s.BM25()
        corpus = bm25s.tokenize(list(sources), lower=True, stopwords=None, show_progress=progress)
        bm25.index(corpus, show_progress=progress)
        return cls(bm25)

    def search(self, sources: Sequence[str], embeddings: np.ndarray | None, n: int) -> np.ndarray:
        out = np.full((len(sources), n), -1, dtype=np.int64)
        if not sources or self.count == 0:
            return out
        for row, tokens in enumerate(bm25_tokens(sources)):
            if not tokens:
                continue
            scores = self.bm25.get_scores(tokens)  # [count]; 0 for sentences sharing no word
            # top n among the sentences sharing a word (a selection over all, mostly-zero scores is slow)
            hits = np.flatnonzero(scores > 0)
            if len(hits) > n:
                hits = hits[np.argpartition(-scores[hits], n - 1)[:n]]
            best = hits[np.lexsort((hits, -scores[hits]))]  # by score, ties by sentence id
            out[row, : len(best)] = best
        return out

    def save(self, directory: Path) -> None:
        self.bm25.save(str(directory), show_progress=False)
        fsync_tree(directory)  # bm25s writes its files in place: make them durable before settings name them

    @classmethod
    def load(cls, directory: Path) -> BM25SentenceSearch:
        import bm25s

        try:
            # memory-mapped score matrix: private memory does not grow with the number of sentences
            return cls(bm25s.BM25.load(str(directory), show_progress=False, mmap=True))
        except (OSError, ValueError, KeyError) as exc:
            raise DatastoreError(f"cannot read the BM25 sentence index {directory}: {exc}") from None


# ---- dense -----------------------------------------------------------------------------------


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """L2-normalised mean of encoder states over non-pad tokens.

    Args:
        states: ``[B, L, d]`` encoder output.
        attention_mask: ``[B, L]`` (1 for real tokens).

    Returns:
        ``[B, d]`` float32 numpy array.
    """
    mask = attention_mask.to(states.device, dtype=torch.float32).unsqueeze(-1)  # [B, L, 1]
    summed = (states.float() * mask).sum(1)
    pooled = summed / mask.sum(1).clamp(min=1.0)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return np.ascontiguousarray(pooled.cpu().numpy(), dtype=np.float32)


class DenseSentenceSearch:
    """Sentence search over mean-pooled encoder states in a faiss index (squared L2 on unit vectors)."""

    kind = "dense"
    needs_encoder_states = True
    INDEX_FILE = "sentences.faiss"

    def __init__(self, index: Any, nprobe: int = 16) -> None:
        self.index = index
        self.count = int(index.ntotal)
        self.nprobe = nprobe
        with_params = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", max(64, nprobe * 8))):
            with contextlib.suppress(RuntimeError):  # the index has no such parameter (Flat)
                with_params.set_index_parameter(index, name, value)

    @classmethod
    def build(cls, embeddings: np.ndarray, factory: str = "auto", seed: int = 1234) -> DenseSentenceSearch:
        """Index ``embeddings`` ``[n, d]``; ``factory="auto"`` is exact (``Flat``) up to 100k sentences."""
        n, dim = embeddings.shape
        name = auto_factory(n, dim) if factory == "auto" else factory
        try:
            index = faiss.index_factory(dim, name, faiss.METRIC_L2)
        except RuntimeError as exc:
            raise UsageError(
                f"faiss cannot build sentence index {name!r} for dimension {dim}: {exc}"
            ) from None
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            sample = embeddings[np.sort(rng.choice(n, size=min(n, 100_000), replace=False))]
            index.train(sample)
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        return cls(index)

    @classmethod
    def from_stored(
        cls, datastore: Datastore, factory: str = "auto", seed: int = 1234
    ) -> DenseSentenceSearch:
        """Index the sentence vectors a datastore stores (the mean-pooled encoder output of each source,
        :func:`mean_pool` of the build's own encoder pass), shard by shard: no encoder pass, and memory
        bounded by one shard's vectors plus the index. ``factory="auto"`` as in :meth:`build`; trained
        on a sample of at most 100k vectors when the factory needs training."""
        count, dim = int(datastore.manifest["sentences"]), datastore.vector_dim
        name = auto_factory(count, dim) if factory == "auto" else factory
        index = faiss.index_factory(dim, name, faiss.METRIC_L2)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            keep = np.sort(rng.choice(count, size=min(count, 100_000), replace=False))
            parts = [
                v[keep[(keep >= lo) & (keep < lo + len(v))] - lo]
                for lo, v in datastore.iter_sentence_vectors()
            ]
            index.train(np.concatenate(parts))
        for _, vectors in datastore.iter_sentence_vectors():
            index.add(vectors)
        return cls(index)

    def search(self, sources: Sequence[str], embeddings: np.ndarray | None, n: int) -> np.ndarray:
        if embeddings is None:
            raise UsageError("dense sentence search needs the sentences' encoder embeddings")
        out = np.full((len(embeddings), n), -1, dtype=np.int64)
        if len(embeddings) == 0 or self.count == 0:
            return out
        kk = min(n, self.count)
        with omp_threads(1):
            _, ids = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), kk)
        out[:, :kk] = ids
        return out

    def similarity(self, embeddings: np.ndarray, removed: Removed | None = None) -> np.ndarray:
        """``[B]`` float32 cosine similarity of each embedding to its nearest indexed sentence that is
        not ``removed`` (``-1`` when there is none among the ``1 + min(removed,``
        :data:`SENTENCE_OVERFETCH_CAP` ``)`` nearest).

        Args:
            embeddings: ``[B, d]`` L2-normalised float32 from :func:`mean_pool` (``-1`` for an empty index).
        """
        if len(embeddings) == 0 or self.count == 0:
            return np.full(len(embeddings), -1.0, dtype=np.float32)
        fetch = 1 + (min(len(removed.sentences), SENTENCE_OVERFETCH_CAP) if removed else 0)
        with omp_threads(1):
            distances, ids = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), fetch)
        if removed:
            distances = np.where((ids < 0) | removed.sentence_mask(ids), np.inf, distances).min(axis=1)
        else:
            distances = distances[:, 0]
        # unit vectors: |a - b|^2 = 2 - 2 cos(a, b)
        return np.where(np.isfinite(distances), 1.0 - distances / 2.0, -1.0).astype(np.float32)

    def save(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the index and ``settings.json`` (with ``extra`` fields) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / self.INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        write_json_atomic(
            directory / "settings.json", {**(extra or {}), "nprobe": self.nprobe, "ntotal": self.count}
        )

    @classmethod
    def load(cls, directory: Path) -> DenseSentenceSearch:
        file = directory / cls.INDEX_FILE
        if not file.is_file():
            raise DatastoreError(
                f"dense sentence index {file} is missing; rebuild with `knnmt index --subset`"
            )
        settings = json.loads((directory / "settings.json").read_text(encoding="utf-8"))
        return cls(faiss.read_index(str(file)), nprobe=int(settings.get("nprobe", 16)))


def load_sentence_search(kind: str, directory: Path) -> SentenceSearch:
    """Load the sentence searcher ``kind`` (``"bm25"``/``"dense"``) stored in ``directory``."""
    if kind == "bm25":
        return BM25SentenceSearch.load(directory)
    if kind == "dense":
        return DenseSentenceSearch.load(directory)
    raise UsageError(f"unknown sentence search {kind!r}; expected one of {SENTENCE_SEARCHES}")
