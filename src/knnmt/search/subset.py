"""Subset kNN-MT (Deguchi et al., ACL 2023): search only the target tokens of the sentences that are
nearest to the input sentence.

For each source sentence of a ``generate`` call (once, before decoding):

1. a sentence search (:mod:`knnmt.search.sentence_search`: BM25 or the model's own mean-pooled encoder
   states) picks the ``n`` datastore sentences whose source side is nearest (default ``n = 512``);
2. their datastore entries are located through the per-sentence entry ranges stored with the index
   (``ranges[s] .. ranges[s + 1]``, from the datastore's provenance), typically ``n × 20-30`` keys.

At every decoding step each query is then compared with its own sentence's subset only:
product-quantisation codes of all keys are stored with the index, the distances are asymmetric
(look-up tables of query-to-centroid distances summed over the codes, :mod:`knnmt.search.pq`), and the best
``rerank · k`` candidates are re-ranked by their exact squared L2 to the stored fp16 keys, so the
returned distances are exact. The scorer is selectable: ``adc`` (torch, CPU or GPU), ``faiss`` (the
same ADC in faiss's C++ scanner, CPU) or ``exact`` (the subset's keys gathered once per sentence,
one matrix product per step).

On disk (``<datastore>/subset/``)::

    subset.json      # settings, datastore fingerprint, PQ and sentence-search build records
    codebooks.npy    # [M, ksub, dsub] float32 PQ centroids
    codes.npy        # [N, code_size] uint8 PQ codes of every key, in entry-id order, bit-packed as
                     # faiss packs them (version 2: two 4-bit codes per byte; version 1: one per byte)
    ranges.npy       # [sentences + 1] int64 first entry id of each global sentence id
    bm25/ dense/     # the sentence searches built so far (one or both)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.config import JsonConfig, require
from ..core.durable import atomic_path, write_json_atomic
from ..core.errors import DatastoreError, IncompatibleError, KnnmtError, UsageError
from ..store.datastore import Datastore
from ..store.writelock import WriteLock
from .index import omp_threads
from .pq import PQCodebook, pq_subquantizers
from .retriever import exact_rerank
from .sentence_search import (
    SENTENCE_SEARCHES,
    BM25SentenceSearch,
    DenseSentenceSearch,
    SentenceSearch,
    SourceEmbedder,
    datastore_sources,
    load_sentence_search,
    mean_pool,
    search_sentences,
)

logger = logging.getLogger(__name__)

SUBSET_DIR = "subset"
SETTINGS_FILE = "subset.json"
CODEBOOK_FILE = "codebooks.npy"
CODES_FILE = "codes.npy"
RANGES_FILE = "ranges.npy"
FORMAT = "knnmt-subset"
#: 2: ``codes.npy`` bit-packed (``pq.packed``); 1: one byte per code. This code reads both.
VERSION = 2
VERSIONS = (1, 2)
SCORERS: tuple[str, ...] = ("auto", "adc", "faiss", "exact")


@dataclasses.dataclass(frozen=True)
class SubsetConfig(JsonConfig):
    """How the Subset kNN-MT index is built (and its default search settings)."""

    #: ``"bm25"`` (lexical) or ``"dense"`` (mean-pooled encoder states of the model).
    sentence_search: str = "bm25"
    #: Nearest datastore sentences whose target tokens are searched, per input sentence.
    subset_size: int = 512
    #: PQ sub-quantisers; 0 = ``dim / pq_bits`` of them, i.e. ``dim / 8`` bytes per key
    #: (:func:`knnmt.search.pq.pq_subquantizers`).
    pq_m: int = 0
    #: Bits per PQ code: 4 (16 centroids per sub-quantiser of 4 dimensions) is what faiss's fast-scan
    #: scores with SIMD look-up tables, 6.5x faster than 8-bit codes of the same size (32 bytes per key,
    #: 512 sentences' subsets, docs/BENCHMARKS.md "Scale"); 8 = 256 centroids of 8 dimensions.
    pq_bits: int = 4
    #: Keys sampled to train the PQ codebooks.
    train_size: int = 200_000
    seed: int = 1234
    #: Candidates per neighbour re-scored exactly (``rerank · k`` ADC candidates; 0 = trust ADC).
    rerank: int = 8
    #: Per-step distances: ``adc`` (torch look-up tables, CPU or GPU), ``faiss`` (faiss's C++ PQ scanner,
    #: CPU: fast-scan for 4-bit codes, whose look-up tables are rounded to 8 bits, so re-rank; the plain
    #: ADC for other widths), ``exact`` (matrix product with the subset's keys) or ``auto`` (``faiss``
    #: on a CPU, where it measured 4x faster than torch ADC with 8-bit codes; ``adc`` on a GPU).
    scorer: str = "auto"
    #: faiss factory of the dense sentence index; ``auto`` = exact up to 100k sentences.
    dense_factory: str = "auto"

    def __post_init__(self) -> None:
        require(
            self.sentence_search in SENTENCE_SEARCHES,
            f"sentence_search must be one of {SENTENCE_SEARCHES}, got {self.sentence_search!r}",
        )
        require(self.subset_size >= 1, f"subset_size must be >= 1, got {self.subset_size}")
        require(self.pq_m >= 0, f"pq_m must be >= 0 (0 = auto), got {self.pq_m}")
        require(1 <= self.pq_bits <= 8, f"pq_bits must be in [1, 8], got {self.pq_bits}")
        require(self.train_size >= 256, f"train_size must be >= 256, got {self.train_size}")
        require(0 <= self.rerank <= 64, f"rerank must be in [0, 64], got {self.rerank}")
        require(self.scorer in SCORERS, f"scorer must be one of {SCORERS}, got {self.scorer!r}")


@dataclasses.dataclass(frozen=True)
class SubsetSearch:
    """Search-time overrides of the settings saved with a subset index (``None`` = saved value)."""

    subset_size: int | None = None
    sentence_search: str | None = None
    scorer: str | None = None
    rerank: int | None = None
    #: torch device of the ``adc`` scorer (default: CPU, or the model's device through ``KNNMT.load``).
    device: str | None = None
    #: directory of the subset index (default ``<datastore>/subset``).
    path: str | None = None

    def __post_init__(self) -> None:
        require(
            self.subset_size is None or self.subset_size >= 1,
            f"subset_size must be >= 1, got {self.subset_size}",
        )
        require(
            self.sentence_search is None or self.sentence_search in SENTENCE_SEARCHES,
            f"sentence_search must be one of {SENTENCE_SEARCHES}, got {self.sentence_search!r}",
        )
        require(
            self.scorer is None or self.scorer in SCORERS,
            f"scorer must be one of {SCORERS}, got {self.scorer!r}",
        )
        require(
            self.rerank is None or 0 <= self.rerank <= 64, f"rerank must be in [0, 64], got {self.rerank}"
        )


def sentence_entry_ranges(datastore: Datastore) -> np.ndarray:
    """``[sentences + 1]`` int64: the entries of global sentence ``s`` are ``ranges[s] .. ranges[s+1]-1``."""
    parts = [np.zeros(1, dtype=np.int64)]
    expected = 0
    for shard in datastore.shards:
        if shard.first_sentence != expected:
            raise DatastoreError(
                f"shard {shard.path} starts at sentence {shard.first_sentence}, expected {expected}: "
                "sentence ids are not contiguous"
            )
        offsets = np.asarray(shard.load("offsets.npy"), dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != shard.count:
            raise DatastoreError(
                f"{shard.path / 'offsets.npy'}: offsets run {offsets[0]}..{offsets[-1]}, "
                f"expected 0..{shard.count}"
            )
        parts.append(shard.start + offsets[1:])
        expected += shard.sentences
    return np.concatenate(parts)


def _read_settings(directory: Path) -> dict[str, Any] | None:
    file = directory / SETTINGS_FILE
    if not file.is_file():
        return None
    try:
        settings: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatastoreError(f"{file}: corrupt settings ({exc.msg} at line {exc.lineno})") from None
    if settings.get("format") != FORMAT or settings.get("version") not in VERSIONS:
        raise DatastoreError(
            f"{file}: format {settings.get('format')!r} version {settings.get('version')}, "
            f"expected {FORMAT!r} version {' or '.join(map(str, VERSIONS))} (a newer knnmt wrote it, or "
            "it is damaged); rebuild it with `knnmt index --subset --force`"
        )
    return settings


def checked_settings(directory: Path, datastore: Datastore, allow_grown: bool = False) -> dict[str, Any]:
    """The settings of the subset index at ``directory``, checked to belong to ``datastore``.

    ``allow_grown`` accepts an index of fewer entries and sentences than the datastore now holds (pairs
    appended since, e.g. by the service) with a warning: it still describes the sentences it covers.
    """
    settings = _read_settings(directory)
    if settings is None:
        raise DatastoreError(
            f"no subset index at {directory} (expected {SETTINGS_FILE}); run `knnmt index --subset`"
        )
    grown = (
        allow_grown
        and int(settings.get("entries", -1)) < datastore.count
        and int(settings.get("sentences", -1)) <= int(datastore.manifest["sentences"])
    )
    if grown:
        logger.warning(
            "the subset index at %s covers %s of the datastore's %d sentences (pairs were added since); "
            "rebuild it with `knnmt index --subset --force` to include them",
            directory,
            settings.get("sentences"),
            int(datastore.manifest["sentences"]),
        )
    elif settings.get("datastore_fingerprint") != datastore.fingerprint:
        raise IncompatibleError(
            f"subset index {directory} was built for another datastore (fingerprint "
            f"{settings.get('datastore_fingerprint')}, {settings.get('entries')} entries); datastore "
            f"{datastore.path} has fingerprint {datastore.fingerprint} and {datastore.count} entries. "
            "Rebuild it with `knnmt index --subset --force`"
        )
    return settings


def _stored_vectors(datastore: Datastore, ids: np.ndarray) -> np.ndarray:
    """The stored sentence vectors of sorted sentence ``ids``: float32 ``[len(ids), d]``."""
    out = np.zeros((len(ids), datastore.vector_dim), dtype=np.float32)
    for first, vectors in datastore.iter_sentence_vectors():
        inside = (ids >= first) & (ids < first + len(vectors))
        out[inside] = vectors[ids[inside] - first]
    return out


def _self_hits(
    search: SentenceSearch,
    source: Callable[[int], str],
    count: int,
    embeddings: Callable[[np.ndarray], np.ndarray] | None,
    seed: int,
) -> float:
    """Fraction of up to 200 sampled datastore sentences (of ``count``) whose own text comes back first
    (``source``: the source text of a sentence id; ``embeddings``: the dense vectors of given ids)."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(count, size=min(200, count), replace=False))
    texts = [source(int(i)) for i in picked]
    found = search.search(texts, None if embeddings is None else embeddings(picked), 1)[:, 0]
    hits = [
        f == i or (f >= 0 and source(int(f)) == text) for f, i, text in zip(found, picked, texts, strict=True)
    ]
    return float(np.mean(hits))


def _build_subset_index(
    datastore: Datastore,
    config: SubsetConfig,
    embed: SourceEmbedder | None,
    out: str | Path | None,
    *,
    progress: bool,
    force: bool,
) -> SubsetIndex:
    target = Path(out) if out is not None else datastore.path / SUBSET_DIR
    if datastore.count == 0:
        raise DatastoreError(f"datastore {datastore.path} is empty: nothing to index")
    if config.sentence_search == "dense" and embed is None and not datastore.vector_dim:
        raise UsageError(
            "dense sentence search over a datastore without stored sentence vectors (built by an older "
            "knnmt) needs the model and tokenizer (knnmt index --model ...)"
        )
    old = _read_settings(target)
    if old is not None and old.get("datastore_fingerprint") != datastore.fingerprint and not force:
        raise DatastoreError(
            f"the subset index at {target} was built for another datastore (fingerprint "
            f"{old.get('datastore_fingerprint')}); pass --force to rebuild it"
        )
    same_store = old is not None and old.get("datastore_fingerprint") == datastore.fingerprint
    searches: dict[str, Any] = dict(old["sentence_search"]) if same_store and old else {}
    if config.sentence_search in searches and not force:
        raise DatastoreError(
            f"a {config.sentence_search} subset index already exists at {target}; pass --force to rebuild it"
        )
    m = config.pq_m or pq_subquantizers(datastore.dim, config.pq_bits)
    if datastore.dim % m:
        raise UsageError(f"pq_m {m} does not divide the key dimension {datastore.dim}")
    pq_wanted = {"m": m, "nbits": config.pq_bits, "train_size": config.train_size, "seed": config.seed}
    reuse_pq = (
        same_store
        and not force
        and old is not None
        and {k: old["pq"].get(k) for k in pq_wanted} == pq_wanted
        and (target / CODES_FILE).is_file()
    )
    target.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pq_record: dict[str, Any]
    if reuse_pq and old is not None:
        pq_record = old["pq"]
        logger.info("reusing the PQ codes at %s", target)
    else:
        datastore.check_keys()  # the codes are made from the keys: fail before the old index is touched
        searches = {k: v for k, v in searches.items() if k != config.sentence_search}
        (target / SETTINGS_FILE).unlink(missing_ok=True)  # an interrupted rebuild leaves no index, not a mix
        sample = datastore.sample_keys(config.train_size, seed=config.seed)
        logger.info("training PQ%dx%d on %d keys", m, config.pq_bits, len(sample))
        book = PQCodebook.train(sample, m, config.pq_bits, seed=config.seed)
        del sample
        with atomic_path(target / CODES_FILE) as tmp:
            shape = (datastore.count, book.code_size)
            codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            bar = tqdm(
                total=datastore.count, unit="key", desc="PQ codes", disable=not progress, dynamic_ncols=True
            )
            for lo, keys in datastore.iter_keys():
                codes[lo : lo + len(keys)] = book.encode(keys, packed=True)
                bar.update(len(keys))
            bar.close()
            codes.flush()
            del codes
        book.save(target / CODEBOOK_FILE)
        pq_record = {
            **pq_wanted,
            "packed": True,
            "trained_on": min(config.train_size, datastore.count),
            "build_seconds": round(time.perf_counter() - start, 3),
        }
    ranges = sentence_entry_ranges(datastore)
    with atomic_path(target / RANGES_FILE) as tmp:
        np.save(tmp, ranges)

    count = int(datastore.manifest["sentences"])
    if count != len(ranges) - 1:
        raise DatastoreError(
            f"datastore {datastore.path} lists {count} sentences but its offsets describe {len(ranges) - 1}"
        )
    started = time.perf_counter()
    kind = config.sentence_search
    search: SentenceSearch
    embeddings: Callable[[np.ndarray], np.ndarray] | None = None
    record: dict[str, Any] = {}
    # the source texts are read into memory only where they are indexed (BM25, or an encoder pass)
    sources: list[str] | None = None
    if kind == "bm25" or not datastore.vector_dim:
        sources = list(datastore_sources(datastore))
        if len(sources) != count:
            raise DatastoreError(
                f"datastore {datastore.path} holds {len(sources)} source sentences, its manifest {count}"
            )
    if kind == "bm25":
        assert sources is not None
        search = BM25SentenceSearch.build(sources, progress=progress)
    elif datastore.vector_dim:  # the build's own mean-pooled encoder output: no encoder pass here
        search = DenseSentenceSearch.from_stored(datastore, config.dense_factory, seed=config.seed)
        record.update(factory=config.dense_factory, vectors="stored")
        embeddings = functools.partial(_stored_vectors, datastore)
    else:
        assert embed is not None and sources is not None  # checked above, before any work
        prefix = datastore.manifest.get("tokenization", {}).get("source_prefix", "") or ""
        computed = embed(sources, source_prefix=prefix, progress=progress)
        search = DenseSentenceSearch.build(computed, config.dense_factory, seed=config.seed)
        record["factory"] = config.dense_factory
        embeddings = computed.__getitem__
    directory = target / kind
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    search.save(directory)
    source = sources.__getitem__ if sources is not None else (lambda i: str(datastore.sentence(i)["src"]))
    record.update(
        sentences=count,
        build_seconds=round(time.perf_counter() - started, 3),
        self_hit_at_1=round(_self_hits(search, source, count, embeddings, config.seed), 3),
    )
    if record["self_hit_at_1"] < 0.9:
        logger.warning(
            "%s sentence search finds only %.0f%% of datastore sentences first for their own text",
            kind,
            100 * record["self_hit_at_1"],
        )
    searches[kind] = record
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "datastore_fingerprint": datastore.fingerprint,
        "entries": datastore.count,
        "sentences": count,
        "dim": datastore.dim,
        "pq": pq_record,
        "sentence_search": searches,
        "default_sentence_search": kind,
        "subset_size": config.subset_size,
        "rerank": config.rerank,
        "scorer": config.scorer,
        "config": config.to_dict(),
        "faiss_version": getattr(faiss, "__version__", "unknown"),
    }
    write_json_atomic(target / SETTINGS_FILE, settings)
    logger.info(
        "subset index at %s: PQ%dx%d over %d keys, %s sentence search over %d sentences (self-hit %.3f)",
        target,
        m,
        config.pq_bits,
        datastore.count,
        kind,
        count,
        record["self_hit_at_1"],
    )
    return SubsetIndex.load(target, datastore)


class SubsetIndex:
    """A loaded subset index: PQ codebooks, codes of all keys, sentence entry ranges, sentence searches."""

    def __init__(
        self,
        path: Path,
        settings: dict[str, Any],
        codebook: PQCodebook,
        codes: np.ndarray,
        ranges: np.ndarray,
    ) -> None:
        self.path = path
        self.settings = settings
        self.codebook = codebook
        self.codes = codes  # [N, code_size] (packed) or [N, M] uint8, memory-mapped
        self.packed = bool(settings["pq"].get("packed", False))
        self.ranges = ranges  # [sentences + 1] int64
        self._searches: dict[str, SentenceSearch] = {}

    @property
    def sentence_searches(self) -> list[str]:
        """The sentence searches built for this index."""
        return sorted(self.settings["sentence_search"])

    def sentence_search(self, kind: str | None = None) -> SentenceSearch:
        """The sentence search ``kind`` (default: the saved default), loaded on first use."""
        kind = kind or str(self.settings["default_sentence_search"])
        if kind not in self.settings["sentence_search"]:
            raise UsageError(
                f"the subset index at {self.path} has no {kind} sentence search (built: "
                f"{', '.join(self.sentence_searches)}); build it with "
                f"`knnmt index --subset --sentence-search {kind}`"
            )
        if kind not in self._searches:
            self._searches[kind] = load_sentence_search(kind, self.path / kind)
        return self._searches[kind]

    def codes_of(self, entries: np.ndarray) -> np.ndarray:
        """PQ codes of ``entries``, one uint8 per sub-quantiser: ``[len(entries), M]``."""
        rows = np.asarray(self.codes[entries])
        return self.codebook.unpack(rows) if self.packed else rows

    def packed_codes_of(self, entries: np.ndarray) -> np.ndarray:
        """PQ codes of ``entries`` bit-packed as faiss stores them: ``[len(entries), code_size]``."""
        rows = np.asarray(self.codes[entries])
        return rows if self.packed else self.codebook.pack(rows)

    def entries_of(self, sentence_ids: np.ndarray) -> np.ndarray:
        """Sorted int64 entry ids of all target tokens of ``sentence_ids`` (``-1`` ids ignored)."""
        sids = np.sort(np.asarray(sentence_ids, dtype=np.int64))  # sorted sentences: sorted entries
        sids = sids[sids >= 0]
        starts = self.ranges[sids]
        lengths = self.ranges[sids + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        first = np.cumsum(lengths) - lengths
        return np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)

    @classmethod
    def build(
        cls,
        datastore: Datastore,
        config: SubsetConfig | None = None,
        *,
        embed: SourceEmbedder | None = None,
        out: str | Path | None = None,
        progress: bool = True,
        force: bool = False,
    ) -> SubsetIndex:
        """Build (or extend) the Subset kNN-MT index of ``datastore`` (at ``out``, default
        ``<datastore>/subset``).

        Trains PQ codebooks on a sample of keys and encodes every key (reused when a previous build for
        the same datastore and PQ settings exists, unless ``force``), stores the entry ranges of every
        sentence and builds ``config.sentence_search`` over the datastore's source sentences (``dense``
        needs ``embed``, the sentence vectors of the model the datastore was built with: see
        :func:`knnmt.pipeline.build.build_subset_index`). Building the other sentence search later adds it
        beside the first; ``config.sentence_search`` becomes the default.
        """
        with WriteLock(datastore.path, "index --subset"):  # one writer at a time
            return _build_subset_index(
                datastore, config or SubsetConfig(), embed, out, progress=progress, force=force
            )

    @classmethod
    def load(
        cls, directory: str | Path, datastore: Datastore, device: str | torch.device = "cpu"
    ) -> SubsetIndex:
        """Load the subset index at ``directory``, checking that it was built for ``datastore``."""
        path = Path(directory)
        settings = checked_settings(path, datastore)
        codebook = PQCodebook.load(path / CODEBOOK_FILE, device)
        try:
            # memory-mapped: a step reads the codes of its subset's entries only (page cache, not
            # private memory, which must not grow with the datastore)
            codes = np.load(path / CODES_FILE, mmap_mode="r")
            ranges = np.load(path / RANGES_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DatastoreError(f"subset index {path} is incomplete or corrupt: {exc}") from None
        width = codebook.code_size if settings["pq"].get("packed", False) else codebook.m
        if codes.shape != (datastore.count, width) or codes.dtype != np.uint8:
            raise DatastoreError(
                f"{path / CODES_FILE}: expected shape {(datastore.count, width)} uint8, "
                f"found {codes.shape} {codes.dtype}"
            )
        if codebook.dim != datastore.dim:
            raise IncompatibleError(
                f"subset index {path} has dimension {codebook.dim}, datastore {datastore.dim}"
            )
        if ranges.shape != (int(settings["sentences"]) + 1,) or int(ranges[-1]) != datastore.count:
            raise DatastoreError(
                f"{path / RANGES_FILE}: expected {int(settings['sentences']) + 1} offsets ending at "
                f"{datastore.count}, found {ranges.shape[0]}"
            )
        return cls(path, settings, codebook, codes, ranges)


@dataclasses.dataclass
class _Subset:
    """The per-sentence state of one ``generate`` batch row."""

    entries: np.ndarray  # [S] int64 sorted entry ids
    flat_codes: torch.Tensor | None = None  # adc: [S * M] int32 LUT offsets
    faiss_index: Any = None  # faiss: IndexPQFastScan (4-bit codes) or IndexPQ over the subset's codes
    keys: torch.Tensor | None = None  # exact: [S, dim] float32
    norms: torch.Tensor | None = None  # exact: [S] squared norms


class SubsetRetriever:
    """Subset kNN-MT retriever (see the module docstring). Call :meth:`prepare` with the source sentences
    of a batch before searching; ``groups[i]`` of :meth:`search` indexes those sentences.

    Not thread-safe: one prepared batch at a time.
    """

    def __init__(self, index: SubsetIndex, datastore: Datastore, options: SubsetSearch | None = None) -> None:
        options = options or SubsetSearch()
        self.index = index
        self.datastore = datastore
        saved = index.settings
        self.subset_size = int(options.subset_size or saved["subset_size"])
        self.kind = options.sentence_search or str(saved["default_sentence_search"])
        self.scorer = options.scorer or str(saved["scorer"])
        self.rerank = int(saved["rerank"] if options.rerank is None else options.rerank)
        self.device = torch.device(options.device or "cpu")
        if self.scorer == "auto":
            self.scorer = "faiss" if self.device.type == "cpu" else "adc"
        if not datastore.has_keys:  # keys dropped after indexing: PQ distances only
            if self.scorer == "exact":
                raise UsageError(
                    f"the exact Subset scorer reads stored keys, and datastore {datastore.path} has none "
                    f"(key storage {datastore.key_storage}): use --scorer auto"
                )
            if self.rerank > 0:
                logger.warning(
                    "datastore %s stores no keys: Subset kNN-MT ranks by PQ distances, without re-rank",
                    datastore.path,
                )
                self.rerank = 0
        if self.scorer == "adc" and index.codebook.centroids.device != self.device:
            index.codebook = PQCodebook(index.codebook.centroids.cpu().numpy(), self.device)
        self.sentences = index.sentence_search(self.kind)  # fails early when not built
        self._subsets: list[_Subset] | None = None
        self._entries: np.ndarray | None = None
        #: sentence ids of the last prepared batch, ``[B, subset_size]`` (-1 padded)
        self.last_sentence_ids: np.ndarray | None = None
        #: time spent selecting subsets and searching them, and how much was searched (benchmarks)
        self.stats: dict[str, float] = {
            "prepare_seconds": 0.0,
            "search_seconds": 0.0,
            "sentences": 0,
            "subset_entries": 0,
            "queries": 0,
        }

    @classmethod
    def load(
        cls, datastore: Datastore, directory: str | Path | None = None, options: SubsetSearch | None = None
    ) -> SubsetRetriever:
        """The retriever of the subset index at ``directory`` (default ``<datastore>/subset``)."""
        options = options or SubsetSearch()
        if directory is None and options.path is not None:
            directory = options.path
        path = Path(directory) if directory is not None else datastore.path / SUBSET_DIR
        return cls(SubsetIndex.load(path, datastore), datastore, options)

    @property
    def needs_encoder_states(self) -> bool:
        """True for the dense sentence search (it embeds the sources with the encoder), False for BM25."""
        return self.sentences.needs_encoder_states

    def describe(self) -> str:
        """``subset(n=<subset size>, <sentence search>, <scorer>, rerank=<r>)``."""
        return f"subset(n={self.subset_size}, {self.kind}, {self.scorer}, rerank={self.rerank})"

    # ---- per batch ------------------------------------------------------------------------
    def prepare(
        self,
        sources: Sequence[str],
        encoder_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Select the subset of each source sentence of the coming ``generate`` batch.

        Args:
            sources: ``B`` source sentences (without model prefix), in batch order.
            encoder_states: ``[B, L, d]`` encoder output (dense sentence search only).
            attention_mask: ``[B, L]`` of the encoder input.
        """
        started = time.perf_counter()
        embeddings = None
        if self.needs_encoder_states:
            if encoder_states is None or attention_mask is None:
                raise UsageError("dense sentence search needs the batch's encoder states and attention mask")
            embeddings = mean_pool(encoder_states, attention_mask)
        sentence_ids = search_sentences(
            self.sentences, list(sources), embeddings, self.subset_size, self.datastore.removed
        )
        self.last_sentence_ids = sentence_ids
        book = self.index.codebook
        subsets = []
        for row in sentence_ids:
            subset = _Subset(self.index.entries_of(row))
            if self.scorer == "adc":
                subset.flat_codes = book.flat_codes(self.index.codes_of(subset.entries))
            elif self.scorer == "faiss":
                packed = self.index.packed_codes_of(subset.entries)
                subset.faiss_index = book.faiss_index(packed, fast_scan=True, packed=True)
            else:
                keys = torch.from_numpy(self.datastore.get_keys(subset.entries))
                subset.keys, subset.norms = keys, (keys**2).sum(-1)
            subsets.append(subset)
        self._subsets = subsets
        widest = max([len(s.entries) for s in subsets], default=0)
        self._entries = np.full((len(subsets), widest), -1, dtype=np.int64)  # [B, widest] padded
        for row, subset in enumerate(subsets):
            self._entries[row, : len(subset.entries)] = subset.entries
        self.stats["prepare_seconds"] += time.perf_counter() - started
        self.stats["sentences"] += len(subsets)
        self.stats["subset_entries"] += sum(len(s.entries) for s in subsets)

    def subset_sizes(self) -> list[int]:
        """Entries in each prepared sentence's subset."""
        return [len(s.entries) for s in self._subsets or []]

    # ---- per step -------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(D [n, k] exact squared L2, I [n, k] entry ids, -1 missing)``; query ``i`` searches the subset
        of prepared sentence ``groups[i]``."""
        if self._subsets is None:
            raise KnnmtError("SubsetRetriever.search called before prepare(sources): no subsets selected")
        started = time.perf_counter()
        try:
            return self._search(queries, k, groups)
        finally:
            self.stats["search_seconds"] += time.perf_counter() - started
            self.stats["queries"] += len(queries)

    def _search(self, queries: np.ndarray, k: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        subsets = self._subsets
        assert subsets is not None and self._entries is not None
        q = np.ascontiguousarray(queries, dtype=np.float32)
        g = np.asarray(groups, dtype=np.int64)
        if len(g) != len(q):
            raise KnnmtError(f"{len(q)} queries but {len(g)} group ids")
        if len(g) and (g.min() < 0 or g.max() >= len(subsets)):
            raise KnnmtError(f"group ids must be in [0, {len(subsets)}), got {g.min()}..{g.max()}")
        n = len(q)
        if n == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        # rows sorted by sentence: each sentence's queries are one contiguous slice [lo, hi)
        order = np.argsort(g, kind="stable")
        gs, qs = g[order], q[order]
        present, starts, counts = np.unique(gs, return_index=True, return_counts=True)
        width = k if self.scorer == "exact" or self.rerank <= 0 else k * self.rerank
        widest = max(len(subsets[s].entries) for s in present)
        if widest == 0:
            return np.full((n, k), np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
        c = min(width, widest)
        if self.scorer == "faiss":
            approx = np.full((n, c), np.inf, dtype=np.float32)
            local = np.zeros((n, c), dtype=np.int64)
            with omp_threads(1):
                for sentence, lo, count in zip(present, starts, counts, strict=True):
                    subset = subsets[sentence]
                    cc = min(c, len(subset.entries))
                    if cc:
                        d, i = subset.faiss_index.search(qs[lo : lo + count], cc)
                        approx[lo : lo + count, :cc], local[lo : lo + count, :cc] = d, i
        else:  # adc / exact: distances to every subset entry in one padded [n, widest] buffer, one top-k
            dist = torch.full((n, widest), float("inf"), device=self.device)
            qt = torch.from_numpy(qs).to(self.device)
            book = self.index.codebook
            luts = book.luts(qt) if self.scorer == "adc" else None  # [n, M, ksub]
            for sentence, lo, count in zip(present, starts, counts, strict=True):
                subset = subsets[sentence]
                size = len(subset.entries)
                if size == 0:
                    continue
                if luts is not None:
                    assert subset.flat_codes is not None
                    dist[lo : lo + count, :size] = book.adc(luts[lo : lo + count], subset.flat_codes)
                else:
                    assert subset.keys is not None and subset.norms is not None
                    dist[lo : lo + count, :size] = subset.norms - 2 * qt[lo : lo + count] @ subset.keys.T
            top = torch.topk(dist, c, dim=1, largest=False, sorted=False)
            approx, local = top.values.cpu().numpy(), top.indices.cpu().numpy()
        cand = self._entries[gs[:, None], local]  # [n, c] entry ids
        cand[~np.isfinite(approx)] = -1
        if self.scorer == "exact" or self.rerank > 0:  # exact squared L2 to the stored keys
            distances, ids = exact_rerank(self.datastore, qs, cand, k)
        else:
            distances, ids = _sort(approx, cand, k)
        out_d, out_i = np.empty_like(distances), np.empty_like(ids)
        out_d[order], out_i[order] = distances, ids
        return out_d, out_i


def _sort(distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` columns of ``(distances, ids)`` sorted by distance (``-1``/``inf`` last)."""
    distances = np.where(ids >= 0, distances, np.inf).astype(np.float32)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    d = np.take_along_axis(distances, order, axis=1)
    i = np.where(np.isfinite(d), np.take_along_axis(ids, order, axis=1), -1)
    return d, i
