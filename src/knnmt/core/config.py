"""Frozen, validated configuration objects, saved as JSON next to the data they describe."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal, TypeVar

from .durable import write_json_atomic
from .errors import UsageError

KeyLayer = Literal["ffn_input", "decoder_output"]
KEY_LAYERS: tuple[str, ...] = ("ffn_input", "decoder_output")
#: Where an index's inverted lists live (IndexConfig.storage).
INDEX_STORAGES: tuple[str, ...] = ("auto", "ram", "disk")
#: How a datastore stores its keys (:mod:`knnmt.store.keycodec`): fp16, or 8-bit scalar-quantised.
KEY_STORAGES: tuple[str, ...] = ("fp16", "sq8")

T = TypeVar("T")


def require(condition: bool, message: str) -> None:
    """Validate a setting: raise :class:`UsageError` with ``message`` unless ``condition`` holds (the
    configuration dataclasses and the service's request models check their values with it)."""
    if not condition:
        raise UsageError(message)


class JsonConfig:
    """Mixin: dataclass <-> JSON file, ignoring unknown keys with a clear error."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**data)

    def save(self, path: str | Path, about: dict[str, Any] | None = None) -> None:
        """Write the fields as JSON; ``about`` (how the setting was chosen, for people) goes with them
        under the key :data:`ABOUT`, which :meth:`load` skips."""
        data = {**self.to_dict(), **({ABOUT: about} if about else {})}
        write_json_atomic(path, data, sort_keys=True)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data.pop(ABOUT, None)
        return cls.from_dict(data)  # type: ignore[attr-defined]


#: the key of a saved config's note on how it was chosen (``knnmt tune`` writes one into ``knn.json``)
ABOUT = "about"


def read_about(path: str | Path) -> dict[str, Any]:
    """The ``about`` note of a saved config (empty when it has none)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    about = data.get(ABOUT) if isinstance(data, dict) else None
    return about if isinstance(about, dict) else {}


@dataclasses.dataclass(frozen=True)
class KNNConfig(JsonConfig):
    """How retrieval is mixed into the model's distribution.

    ``P(y) = lambda_ * p_kNN(y) + (1 - lambda_) * p_MT(y)`` with
    ``p_kNN(y) ∝ Σ_{i: v_i = y} exp(-d_i / temperature)`` over the ``k`` nearest keys
    (``d_i`` squared L2 distance).

    ``half_distance`` makes λ depend on how near the neighbours are (``None``: the constant λ of the
    formula above). The model counts as one more, virtual, neighbour at squared distance
    ``half_distance``: with ``S = Σ_i exp(-d_i / temperature)`` the weight of retrieval at a step is
    ``λ_q = lambda_ · S / (S + exp(-half_distance / temperature))``, so it is ``lambda_`` when the
    neighbours are much nearer than ``half_distance``, half of it when they weigh as much as one
    neighbour at that distance, and falls towards 0 (the plain model) for text unlike the memory.

    ``confidence_gate`` skips retrieval where the model is already sure: at a step where the model's
    most likely token has probability ``>= confidence_gate`` that hypothesis is not searched and keeps
    ``p_MT`` (its λ is 0). ``None`` searches at every step. The gate is decided from ``p_MT`` alone,
    before any search, so it saves the search itself (most tokens of familiar text are confident), and
    it keeps a memory of one domain from overriding a confident model on other text.

    ``domain_gate`` decides per input *sentence*: only inputs whose mean-pooled encoder states have a
    cosine similarity ``>= domain_gate`` to the nearest memory source sentence are searched; the others
    are translated by the plain model (:mod:`knnmt.pipeline.domain_gate`; it reads the sentence vectors
    the build stores, indexed by ``knnmt index``). ``None`` searches for every input.
    """

    k: int = 8
    lambda_: float = 0.5
    temperature: float = 100.0
    half_distance: float | None = None
    confidence_gate: float | None = None
    domain_gate: float | None = None

    def __post_init__(self) -> None:
        require(
            isinstance(self.k, int) and 1 <= self.k <= 4096,
            f"k must be an integer in [1, 4096], got {self.k!r}",
        )
        require(0.0 <= self.lambda_ <= 1.0, f"lambda must be in [0, 1], got {self.lambda_!r}")
        require(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature must be a positive number, got {self.temperature!r}",
        )
        require(
            self.half_distance is None or (math.isfinite(self.half_distance) and self.half_distance >= 0),
            f"half_distance must be a squared distance >= 0 or None, got {self.half_distance!r}",
        )
        require(
            self.confidence_gate is None or 0.0 < self.confidence_gate <= 1.0,
            f"confidence_gate must be a probability in (0, 1] or None, got {self.confidence_gate!r}",
        )
        require(
            self.domain_gate is None or -1.0 <= self.domain_gate <= 1.0,
            f"domain_gate must be a cosine similarity in [-1, 1] or None, got {self.domain_gate!r}",
        )

    @property
    def log_gate(self) -> float:
        """``log(confidence_gate)`` (``+inf`` without a gate: no step is skipped)."""
        return math.inf if self.confidence_gate is None else math.log(self.confidence_gate)


@dataclasses.dataclass(frozen=True)
class BuildConfig(JsonConfig):
    """How a datastore is built from a parallel corpus."""

    key_layer: str = "ffn_input"
    #: Maximum number of (source + target) tokens per teacher-forcing batch (padding included).
    max_tokens: int = 4096
    #: Sentences per shard; each shard is tokenised, sorted by length and written as one unit.
    shard_sentences: int = 20000
    #: Truncate sentences longer than the model's maximum (counted), or fail on the first one.
    truncate: bool = True
    #: Skip pairs with an empty side (counted), or fail on the first one.
    skip_empty: bool = True
    #: Maximum tokens per side; ``None`` uses the model's own maximum (its positions and tokenizer's
    #: limit), which it may not exceed.
    max_length: int | None = None
    #: How keys are stored: ``fp16`` (2 bytes per dimension, exact re-rank) or ``sq8`` (1 byte per
    #: dimension, faiss's 8-bit scalar quantizer; half the disk, for large memories).
    key_storage: str = "fp16"

    def __post_init__(self) -> None:
        require(
            self.key_layer in KEY_LAYERS, f"key_layer must be one of {KEY_LAYERS}, got {self.key_layer!r}"
        )
        require(
            self.key_storage in KEY_STORAGES,
            f"key_storage must be one of {KEY_STORAGES}, got {self.key_storage!r}",
        )
        require(self.max_tokens >= 16, f"max_tokens must be >= 16, got {self.max_tokens}")
        require(self.shard_sentences >= 1, f"shard_sentences must be >= 1, got {self.shard_sentences}")
        require(
            self.max_length is None or self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}"
        )


@dataclasses.dataclass(frozen=True)
class IndexConfig(JsonConfig):
    """A faiss index over a datastore's keys, named by a faiss factory string."""

    factory: str = "auto"
    #: IVF lists probed per query (IVF indexes only).
    nprobe: int = 16
    #: HNSW search breadth (HNSW indexes only).
    ef_search: int = 128
    #: Vectors sampled to train the index (IVF/PQ/OPQ).
    train_size: int = 200_000
    #: Vectors added per chunk when filling the index from the memory-mapped shards.
    add_chunk: int = 100_000
    seed: int = 1234
    use_gpu: bool = False
    #: Approximate indexes: fetch ``rerank × k`` candidates and keep the ``k`` nearest by exact distance
    #: to the stored fp16 keys (0 = trust the index's own, e.g. PQ, distances).
    rerank: int = 8
    #: OpenMP threads faiss uses per search. 1 by default: a decoding step searches a few dozen
    #: queries, and faiss's idle OpenMP threads spin between steps, starving the model's own threads
    #: (measured 5-15x slower decoding on 2 cores with 2 search threads; see docs/BENCHMARKS.md).
    search_threads: int = 1
    #: IVF indexes: find the ``nprobe`` nearest lists with an HNSW graph over the coarse centroids
    #: (built when the index is loaded, in seconds) explored with this efSearch, instead of comparing
    #: the query with every centroid; 0 = exact coarse search. Measured 1.5x faster IVF-PQ search at
    #: the same recall on 2M keys (docs/BENCHMARKS.md).
    coarse_ef_search: int = 32
    #: Where the IVF lists live when searching: ``ram`` (read into memory), ``disk`` (faiss
    #: ``OnDiskInvertedLists``: filled shard by shard in bounded memory and memory-mapped at search
    #: time, so private memory does not grow with the datastore; 8-bit PQ or SQ codes, not fast-scan),
    #: or ``auto`` (disk once the in-RAM index would take more than a quarter of the machine's memory,
    #: ``knnmt.search.index.RAM_INDEX_SHARE``: from about 115M entries at d=256 on 24 GiB).
    storage: str = "auto"
    #: Key storage ``none``: once the index is saved, delete the datastore's stored keys (``dim`` bytes
    #: per entry with sq8, ``2·dim`` with fp16), which only the exact re-rank, index rebuilds and the
    #: Subset index read. Searches then use the index's own (PQ) distances. For memories too large to
    #: keep keys beside the index (1B entries at d=256: 256 GB of sq8 keys against ~50 GB of index).
    drop_keys: bool = False

    def __post_init__(self) -> None:
        require(bool(self.factory.strip()), "factory must be a faiss factory string or 'auto'")
        require(
            self.storage in INDEX_STORAGES, f"storage must be one of {INDEX_STORAGES}, got {self.storage!r}"
        )
        require(self.coarse_ef_search >= 0, f"coarse_ef_search must be >= 0, got {self.coarse_ef_search}")
        require(self.nprobe >= 1, f"nprobe must be >= 1, got {self.nprobe}")
        require(self.ef_search >= 1, f"ef_search must be >= 1, got {self.ef_search}")
        require(self.train_size >= 1000, f"train_size must be >= 1000, got {self.train_size}")
        require(self.add_chunk >= 1, f"add_chunk must be >= 1, got {self.add_chunk}")
        require(0 <= self.rerank <= 64, f"rerank must be in [0, 64], got {self.rerank}")
        require(
            self.search_threads >= 0,
            f"search_threads must be >= 0 (0 = faiss default), got {self.search_threads}",
        )
