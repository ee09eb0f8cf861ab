"""Subset kNN-MT: PQ asymmetric distances against numpy and faiss, entry ranges against provenance,
the subset search against brute force (all sentences = exact search), sentence search finding a
stored sentence, the on-disk index and its identity check, and the API/CLI around it.

The generation oracles (λ = 0, batch 1 = batch N, memorisation) run for every retrieval mode in
``test_generation.py`` and ``test_exact_recovery.py`` (``RETRIEVAL_MODES`` in ``conftest.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch

from conftest import write_synthetic_datastore
from knnmt.apps.cli import main
from knnmt.core.config import IndexConfig, KNNConfig
from knnmt.core.durable import write_json_atomic
from knnmt.core.errors import DatastoreError, IncompatibleError, KnnmtError, UsageError
from knnmt.hf.teacher_forcing import embed_sources
from knnmt.pipeline.build import build_subset_index
from knnmt.pipeline.translator import KNNMT
from knnmt.search.index import build_index, drop_keys, recall_at_k
from knnmt.search.pq import PQCodebook
from knnmt.search.sentence_search import BM25SentenceSearch, datastore_sources, mean_pool
from knnmt.search.subset import (
    SETTINGS_FILE,
    SubsetConfig,
    SubsetIndex,
    SubsetRetriever,
    SubsetSearch,
    sentence_entry_ranges,
)
from knnmt.store.datastore import FORMAT, MANIFEST, VERSION, Datastore, ShardWriter

DIM, K = 32, 8
WORDS = [f"w{i}" for i in range(60)]


# ---- PQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", [4, 8])
def test_adc_matches_numpy_and_faiss(nbits: int) -> None:
    rng = np.random.default_rng(nbits)
    train = rng.standard_normal((3000, DIM)).astype(np.float32)
    book = PQCodebook.train(train, m=8, nbits=nbits)
    assert (book.m, book.ksub, book.dsub) == (8, 2**nbits, 4)
    base = rng.standard_normal((700, DIM)).astype(np.float32)
    codes = book.encode(base)
    assert codes.shape == (700, 8) and codes.dtype == np.uint8 and codes.max() < 2**nbits
    queries = rng.standard_normal((6, DIM)).astype(np.float32)

    adc = book.adc(book.luts(torch.from_numpy(queries)), book.flat_codes(codes)).numpy()

    # numpy reference: squared L2 from each query to each decoded code
    decoded = book.decode(codes)
    reference = ((queries[:, None, :].astype(np.float64) - decoded[None]) ** 2).sum(-1)
    np.testing.assert_allclose(adc, reference, rtol=1e-5, atol=1e-4)
    # faiss's own IndexPQ over the same codebooks and codes: same distances, same order
    index = book.faiss_index(codes)
    assert index.ntotal == 700
    distances, ids = index.search(queries, 700)
    np.testing.assert_allclose(np.take_along_axis(adc, ids, axis=1), distances, rtol=1e-5, atol=1e-4)
    # fast-scan (4-bit codes only) scores the same codes with look-up tables rounded to 8 bits:
    # distances within about 1 % of the ADC, and the same best candidates but for near-ties
    fast = book.faiss_index(codes, fast_scan=True)
    assert isinstance(fast, faiss.IndexPQFastScan) == (nbits == 4)
    if nbits == 4:
        fd, fi = fast.search(queries, 50)
        np.testing.assert_allclose(fd, np.take_along_axis(adc, fi, axis=1), rtol=0.03, atol=0.05)
        best = np.argsort(adc, axis=1)[:, :50]
        assert recall_at_k(fi, best) > 0.9
    # and faiss's reconstruction of those codes is ours (the bit packing of nbits < 8 agrees)
    np.testing.assert_allclose(index.reconstruct_n(0, 700), decoded, atol=1e-6)
    # codebooks survive a save/load and give the same codes
    reloaded = PQCodebook(book.centroids.numpy())
    np.testing.assert_array_equal(reloaded.encode(base), codes)


def test_adc_is_close_to_true_distance() -> None:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((4000, DIM)).astype(np.float32)
    book = PQCodebook.train(keys, m=16, nbits=8)
    q = rng.standard_normal((4, DIM)).astype(np.float32)
    adc = book.adc(book.luts(torch.from_numpy(q)), book.flat_codes(book.encode(keys))).numpy()
    true = ((q[:, None] - keys[None]) ** 2).sum(-1)
    assert np.corrcoef(adc.ravel(), true.ravel())[0, 1] > 0.9


def test_pq_rejects_bad_shapes() -> None:
    with pytest.raises(UsageError, match="must divide the key dimension"):
        PQCodebook.train(np.zeros((300, 30), dtype=np.float32), m=8)
    with pytest.raises(UsageError, match="at least 256 vectors"):
        PQCodebook.train(np.zeros((100, 32), dtype=np.float32), m=8)


# ---- a synthetic datastore of multi-token sentences --------------------------------------------


def write_sentence_datastore(
    path: Path, lengths: list[int], keys: np.ndarray, sources: list[str]
) -> Datastore:
    """A complete datastore whose sentence ``s`` owns ``lengths[s]`` consecutive entries (2 shards)."""
    path.mkdir(parents=True)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    split = len(lengths) // 2
    shards, manifest_shards = [(0, split), (split, len(lengths))], []
    for number, (s0, s1) in enumerate(shards):
        lo, hi = int(offsets[s0]), int(offsets[s1])
        name = f"{number:05d}"
        writer = ShardWriter(path, name, hi - lo, keys.shape[1], s1 - s0)
        writer.keys[:] = keys[lo:hi]
        writer.values[:] = np.arange(lo, hi) % 97
        writer.sentence_ids[:] = np.repeat(np.arange(s0, s1), lengths[s0:s1])
        writer.positions[:] = np.concatenate([np.arange(n) for n in lengths[s0:s1]])
        writer.offsets[:] = offsets[s0 : s1 + 1] - lo
        writer.finish(
            [{"id": s, "src": sources[s], "tgt": f"t{s}", "corpus": 0, "line": s + 1} for s in range(s0, s1)]
        )
        manifest_shards.append(
            {"name": name, "count": hi - lo, "sentences": s1 - s0, "first_sentence": s0, "corpus": 0}
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "state": "complete",
        "count": int(offsets[-1]),
        "sentences": len(lengths),
        "model": {"name": "synthetic", "fingerprint": "synthetic-sentences"},
        "tokenizer": {"fingerprint": "none"},
        "key": {"layer": "ffn_input", "module": "none", "dim": keys.shape[1], "dtype": "float16"},
        "tokenization": {},
        "shards": manifest_shards,
        "corpora": [{"paths": ["synthetic"], "sentences": len(lengths), "state": "complete"}],
        "build": {},
    }
    write_json_atomic(path / MANIFEST, manifest)
    return Datastore.open(path)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> tuple[Datastore, Path]:
    """(datastore of 300 sentences / ~3,300 clustered keys, its subset index with BM25, 8-bit PQ)."""
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(3, 20, 300)]
    total = sum(lengths)
    centres = 2 * rng.standard_normal((40, DIM)).astype(np.float32)
    keys = centres[rng.integers(0, 40, total)] + 0.5 * rng.standard_normal((total, DIM)).astype(np.float32)
    sources = [" ".join(rng.choice(WORDS, size=6, replace=False)) + f" uniq{s}" for s in range(300)]
    store = write_sentence_datastore(
        tmp_path_factory.mktemp("sentences") / "ds", lengths, keys.astype(np.float16), sources
    )
    out = store.path / "subset"
    build_subset_index(store, SubsetConfig(pq_m=8, train_size=2000), out=out, progress=False)
    return store, out


def brute_force(store: Datastore, queries: np.ndarray, entries: np.ndarray, k: int) -> np.ndarray:
    """Exact squared-L2 top-``k`` distances of ``queries`` among ``entries`` (float64, sorted)."""
    keys = store.get_keys(entries).astype(np.float64)
    d = ((queries[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, :k]


def test_entry_ranges_follow_provenance(sentences) -> None:
    store, out = sentences
    ranges = sentence_entry_ranges(store)
    assert ranges[0] == 0 and ranges[-1] == store.count and len(ranges) == 301
    sent_ids, positions = store.provenance(np.arange(store.count))
    np.testing.assert_array_equal(np.repeat(np.arange(300), np.diff(ranges)), sent_ids)
    assert (positions[ranges[:-1]] == 0).all()
    index = SubsetIndex.load(out, store)
    np.testing.assert_array_equal(index.ranges, ranges)
    picked = np.array([7, 150, 151, 299, -1])  # across the shard boundary; -1 is ignored
    entries = index.entries_of(picked)
    assert set(sent_ids[entries]) == {7, 150, 151, 299}
    assert len(entries) == sum(ranges[s + 1] - ranges[s] for s in (7, 150, 151, 299))


@pytest.mark.parametrize("scorer", ["exact", "adc", "faiss"])
def test_all_sentences_is_exact_search(sentences, scorer: str) -> None:
    """With every sentence in the subset and enough re-ranking, Subset kNN-MT is exact search."""
    store, out = sentences
    rng = np.random.default_rng(1)
    queries = store.get_keys(rng.choice(store.count, 40, replace=False))
    queries = (queries + 0.3 * rng.standard_normal(queries.shape)).astype(np.float32)
    everything = np.arange(store.count)
    exact_d = brute_force(store, queries, everything, K)
    exact_ids = np.argsort(((queries[:, None] - store.get_keys(everything)[None]) ** 2).sum(-1), axis=1)[
        :, :K
    ]

    options = SubsetSearch(subset_size=300, scorer=scorer, rerank=64)
    retriever = SubsetRetriever.load(store, out, options)
    retriever.sentences = _AllSentences(300)  # the subset of every sentence is the whole datastore
    retriever.prepare(["a", "b"])
    assert retriever.subset_sizes() == [store.count, store.count]
    distances, ids = retriever.search(queries, K, np.arange(40) % 2)

    assert recall_at_k(ids, exact_ids) == 1.0
    np.testing.assert_allclose(distances, exact_d, rtol=1e-5, atol=1e-4)
    true = ((store.get_keys(ids) - queries[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(distances, true, rtol=1e-5, atol=1e-4)  # D are exact, of these ids


class _AllSentences:
    kind = "all"
    needs_encoder_states = False

    def __init__(self, count: int) -> None:
        self.count = count

    def search(self, sources: Any, embeddings: Any, n: int) -> np.ndarray:
        return np.tile(np.arange(self.count), (len(sources), 1))


@pytest.mark.parametrize("scorer", ["exact", "adc", "faiss"])
def test_each_query_searches_its_own_sentences_subset(sentences, scorer: str) -> None:
    store, out = sentences
    retriever = SubsetRetriever.load(store, out, SubsetSearch(subset_size=5, scorer=scorer, rerank=64))
    sources = [s for s in datastore_sources(store)]
    batch = [sources[3], sources[200], sources[41]]
    retriever.prepare(batch)
    chosen = retriever.last_sentence_ids
    assert chosen is not None and chosen.shape == (3, 5)
    assert list(chosen[:, 0]) == [3, 200, 41]  # the identical source (its unique word) comes first
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((9, DIM)).astype(np.float32) * 2
    groups = np.array([0, 1, 2, 2, 1, 0, 0, 1, 2])

    distances, ids = retriever.search(queries, K, groups)

    sent_ids, _ = store.provenance(ids)
    ranges = sentence_entry_ranges(store)
    for row, group in enumerate(groups):
        assert set(sent_ids[row][ids[row] >= 0]) <= set(chosen[group])
        entries = np.concatenate([np.arange(ranges[s], ranges[s + 1]) for s in chosen[group]])
        kk = min(K, len(entries))
        np.testing.assert_allclose(
            distances[row, :kk],
            brute_force(store, queries[row : row + 1], entries, kk)[0],
            rtol=1e-5,
            atol=1e-4,
        )
        # the same query alone, in a batch of its sentence only, gives the same answer
        alone = SubsetRetriever.load(store, out, SubsetSearch(subset_size=5, scorer=scorer, rerank=64))
        alone.prepare([batch[group]])
        d1, _ = alone.search(queries[row : row + 1], K, np.zeros(1, dtype=np.int64))
        np.testing.assert_allclose(d1[0], distances[row], rtol=1e-6, atol=1e-6)


def test_subset_search_without_stored_keys_ranks_by_pq_alone(sentences, tmp_path: Path, caplog) -> None:
    """Key storage none (keys dropped after indexing): Subset kNN-MT answers what it answered with
    re-rank 0 before the drop; the exact scorer, which needs the keys, says so."""
    store = Datastore.open(shutil.copytree(sentences[0].path, tmp_path / "ds"))
    out = store.path / "subset"
    sources = list(datastore_sources(store))
    queries = np.random.default_rng(5).standard_normal((6, DIM)).astype(np.float32) * 2
    groups = np.array([0, 1, 1, 0, 1, 0])

    def search(datastore: Datastore, rerank: int | None) -> tuple[np.ndarray, np.ndarray]:
        retriever = SubsetRetriever.load(datastore, out, SubsetSearch(subset_size=20, rerank=rerank))
        retriever.prepare([sources[7], sources[150]])
        return retriever.search(queries, K, groups)

    before = search(store, 0)
    drop_keys(store, build_index(store, IndexConfig(factory="Flat"), progress=False))
    keyless = Datastore.open(store.path)
    with caplog.at_level("WARNING"):
        after = search(keyless, None)  # the saved rerank 8 cannot be honoured: PQ alone, with a warning
    assert "without re-rank" in caplog.text
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    with pytest.raises(UsageError, match="exact Subset scorer reads stored keys"):
        SubsetRetriever.load(keyless, out, SubsetSearch(scorer="exact"))
    with pytest.raises(DatastoreError, match="dropped after indexing"):
        build_subset_index(keyless, SubsetConfig(pq_m=8, train_size=2000), out=tmp_path / "s", progress=False)


def test_small_subsets_pad_with_missing(sentences) -> None:
    store, out = sentences
    retriever = SubsetRetriever.load(store, out, SubsetSearch(subset_size=1, scorer="adc"))
    sources = list(datastore_sources(store))
    retriever.prepare([sources[0], "nothing in common"])
    assert retriever.subset_sizes()[1] == 0  # BM25 returns no sentence without a shared word
    q = np.zeros((2, DIM), dtype=np.float32)
    distances, ids = retriever.search(q, 64, np.array([0, 1]))
    n0 = retriever.subset_sizes()[0]
    assert (ids[0, :n0] >= 0).all() and (ids[0, n0:] == -1).all() and np.isinf(distances[0, n0:]).all()
    assert (ids[1] == -1).all() and np.isinf(distances[1]).all()
    assert (np.diff(distances[0, :n0]) >= 0).all()


def test_search_needs_prepare_and_valid_groups(sentences) -> None:
    store, out = sentences
    retriever = SubsetRetriever.load(store, out)
    q = np.zeros((1, DIM), dtype=np.float32)
    with pytest.raises(KnnmtError, match=r"before prepare"):
        retriever.search(q, K, np.zeros(1, dtype=np.int64))
    retriever.prepare(["w1 w2"])
    with pytest.raises(KnnmtError, match=r"group ids must be in \[0, 1\)"):
        retriever.search(q, K, np.array([1]))


def test_saved_settings_and_identity_check(sentences, tmp_path: Path) -> None:
    store, out = sentences
    settings = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    assert settings["datastore_fingerprint"] == store.fingerprint
    assert settings["pq"]["m"] == 8 and settings["pq"]["nbits"] == 4  # 4-bit: fast-scan by default
    assert settings["subset_size"] == 512 and settings["scorer"] == "auto" and settings["rerank"] == 8
    assert settings["sentence_search"]["bm25"]["self_hit_at_1"] == 1.0
    # 8 codes of 4 bits per key, two to a byte in the file (version 2)
    assert settings["version"] == 2 and settings["pq"]["packed"] is True
    assert np.load(out / "codes.npy").shape == (store.count, 4)

    with pytest.raises(DatastoreError, match=r"a bm25 subset index already exists.*--force"):
        build_subset_index(store, SubsetConfig(pq_m=8, train_size=2000), out=out, progress=False)
    with pytest.raises(UsageError, match=r"without stored sentence vectors .* needs the model"):
        build_subset_index(
            store, SubsetConfig(sentence_search="dense", pq_m=8, train_size=2000), out=out, progress=False
        )
    with pytest.raises(
        UsageError, match=r"no dense sentence search \(built: bm25\).*--sentence-search dense"
    ):
        SubsetRetriever.load(store, out, SubsetSearch(sentence_search="dense"))

    rng = np.random.default_rng(3)
    other = write_synthetic_datastore(
        tmp_path / "other",
        rng.standard_normal((400, DIM)).astype(np.float16),
        rng.integers(0, 10, 400).astype(np.int32),
        shard_size=400,
        fingerprint="another-model",
    )
    with pytest.raises(IncompatibleError, match=r"built for another datastore.*--subset --force"):
        SubsetIndex.load(out, other)
    with pytest.raises(DatastoreError, match=r"no subset index at"):
        SubsetIndex.load(tmp_path / "nowhere", store)
    # building over a datastore that changed needs --force; then the index belongs to the new one
    with pytest.raises(DatastoreError, match=r"built for another datastore.*--force"):
        build_subset_index(other, SubsetConfig(pq_m=8, pq_bits=4), out=out, progress=False)
    copy = tmp_path / "copy"
    build_subset_index(other, SubsetConfig(pq_m=8, pq_bits=4), out=copy, progress=False)
    assert SubsetIndex.load(copy, other).codes.shape == (400, 4)


def test_version_1_indexes_with_a_byte_per_code_still_search_alike(sentences, tmp_path: Path) -> None:
    """Indexes written before the codes were bit-packed (version 1: one byte per 4-bit code) load and
    return what the packed index returns; an unknown version is refused with the rebuild command."""
    store, out = sentences
    old = tmp_path / "v1"
    old.mkdir()
    for name in ("codebooks.npy", "ranges.npy"):
        (old / name).write_bytes((out / name).read_bytes())
    shutil.copytree(out / "bm25", old / "bm25")
    index = SubsetIndex.load(out, store)
    np.save(old / "codes.npy", index.codebook.unpack(np.asarray(index.codes)))
    settings = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    settings["version"] = 1
    settings["pq"] = {k: v for k, v in settings["pq"].items() if k != "packed"}
    settings["sentence_search"] = {"bm25": settings["sentence_search"]["bm25"]}
    settings["default_sentence_search"] = "bm25"
    write_json_atomic(old / SETTINGS_FILE, settings)
    assert SubsetIndex.load(old, store).codes.shape == (store.count, 8)
    sources = list(datastore_sources(store))
    rng = np.random.default_rng(5)
    queries = (rng.standard_normal((6, DIM)) * 2).astype(np.float32)
    groups = np.array([0, 1, 0, 1, 1, 0])
    for scorer in ("faiss", "adc"):
        results = []
        for directory in (out, old):
            retriever = SubsetRetriever.load(store, directory, SubsetSearch(subset_size=8, scorer=scorer))
            retriever.prepare([sources[3], sources[77]])
            results.append(retriever.search(queries, K, groups))
        np.testing.assert_array_equal(results[0][1], results[1][1])
        np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    settings["version"] = 3
    write_json_atomic(old / SETTINGS_FILE, settings)
    with pytest.raises(DatastoreError, match=r"version 3, expected 'knnmt-subset' version 1 or 2.*--force"):
        SubsetIndex.load(old, store)


# ---- sentence search on the toy model's datastore ---------------------------------------------


def test_bm25_finds_a_stored_sentence_first(datastore) -> None:
    sources = list(datastore_sources(datastore))
    search = BM25SentenceSearch.build(sources)
    picked = list(range(0, len(sources), 9))
    found = search.search([sources[i] for i in picked], None, 3)
    assert found.shape == (len(picked), 3)
    assert all(sources[f] == sources[i] for f, i in zip(found[:, 0], picked, strict=True))


def test_dense_finds_a_stored_sentence_first(marian, datastore, subset_dir) -> None:
    model, tokenizer = marian
    sources = list(datastore_sources(datastore))
    index = SubsetIndex.load(subset_dir, datastore)
    assert index.sentence_searches == ["bm25", "dense"]
    dense = index.sentence_search("dense")
    picked = list(range(0, len(sources), 9))
    embeddings = embed_sources(model, tokenizer, [sources[i] for i in picked])
    found = dense.search([sources[i] for i in picked], embeddings, 3)
    assert all(sources[f] == sources[i] for f, i in zip(found[:, 0], picked, strict=True))


def test_dense_build_from_stored_vectors_reads_no_source_list(
    datastore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100M entries the datastore holds millions of sentences: the dense search indexes the stored
    vectors and reads only the texts of the sentences its self-check samples."""
    import knnmt.search.subset as subset_module

    def forbidden(_: Datastore) -> None:
        raise AssertionError("the dense build listed every source sentence")

    monkeypatch.setattr(subset_module, "datastore_sources", forbidden)
    out = tmp_path / "subset"
    build_subset_index(datastore, SubsetConfig(sentence_search="dense", pq_bits=4), out=out, progress=False)
    record = json.loads((out / SETTINGS_FILE).read_text())["sentence_search"]["dense"]
    assert record["vectors"] == "stored" and record["sentences"] == datastore.manifest["sentences"]
    assert record["self_hit_at_1"] == 1.0  # the stored vector of a sentence finds its own text


def test_mean_pool_ignores_padding(marian, toy_pairs) -> None:
    model, tokenizer = marian
    texts = [toy_pairs[0][0], toy_pairs[5][0] + " " + toy_pairs[6][0]]
    with torch.inference_mode():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        together = mean_pool(model.get_encoder()(**batch)[0], batch["attention_mask"])
        alone = tokenizer(texts[:1], return_tensors="pt")
        single = mean_pool(model.get_encoder()(**alone)[0], alone["attention_mask"])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 was padded
    np.testing.assert_allclose(together[0], single[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-6)


# ---- front door, explain, tuning statistics, CLI ----------------------------------------------


def test_load_with_subset_retrieval(marian, datastore, subset_dir, tmp_path: Path, toy_pairs) -> None:
    model, tokenizer = marian
    with pytest.raises(DatastoreError, match="no subset index at"):
        KNNMT.load((model, tokenizer), datastore.path, retrieval="subset")
    with pytest.raises(UsageError, match="retrieval must be 'index', 'subset' or 'ray'"):
        KNNMT.load((model, tokenizer), datastore.path, retrieval="subsets")
    retriever = SubsetRetriever.load(
        datastore, subset_dir, SubsetSearch(subset_size=16, sentence_search="dense")
    )
    knn = KNNMT(model, tokenizer, datastore, config=KNNConfig(k=4), retriever=retriever)
    assert knn._index is None  # the exact index of vanilla retrieval is never built
    source, target = toy_pairs[3]
    tokens = knn.explain(source, target)
    assert tokens and all(len(t.neighbours) == 4 for t in tokens)
    chosen = set(retriever.last_sentence_ids[0].tolist())
    assert all(n.sentence_id in chosen for t in tokens for n in t.neighbours)
    assert retriever.describe() == "subset(n=16, dense, faiss, rerank=8)"  # auto: faiss on a CPU


def test_tuning_statistics_use_each_sentences_subset(marian, datastore, subset_dir, toy_pairs) -> None:
    from knnmt.pipeline.tuning import reference_statistics

    model, tokenizer = marian
    pairs = toy_pairs[100:106]
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    vanilla = KNNMT(model, tokenizer, datastore)
    subset = KNNMT(
        model,
        tokenizer,
        datastore,
        retriever=SubsetRetriever.load(datastore, subset_dir, SubsetSearch(subset_size=400, scorer="exact")),
    )
    subset.retriever.sentences = _AllSentences(datastore.manifest["sentences"])  # type: ignore[attr-defined]
    log_mt, d_all, _, _ = reference_statistics(vanilla, sources, references, 4)
    log_mt2, d_sub, _, _ = reference_statistics(subset, sources, references, 4)
    np.testing.assert_allclose(log_mt, log_mt2, atol=1e-5)
    np.testing.assert_allclose(d_sub, d_all, rtol=1e-4, atol=1e-3)  # all sentences: the exact neighbours
    small = KNNMT(
        model,
        tokenizer,
        datastore,
        retriever=SubsetRetriever.load(datastore, subset_dir, SubsetSearch(subset_size=2)),
    )
    _, d_small, match_small, _ = reference_statistics(small, sources, references, 4)
    assert (d_small >= d_all - 1e-3).all()  # a subset never finds nearer keys than the whole datastore
    assert match_small[:, 0].mean() > 0.9  # each reference's own sentence is in its subset of 2


def test_cli_subset_index_and_evaluate(
    toy_dir, marian, make_corpus, tmp_path: Path, toy_pairs, capsys
) -> None:
    model, tokenizer = marian
    from knnmt.pipeline.build import build_datastore

    pairs = toy_pairs[:60]
    spec = make_corpus(pairs)
    store = build_datastore(
        model, tokenizer, spec, tmp_path / "ds", progress=False, model_name=str(toy_dir / "model")
    )
    assert main(["-q", "index", str(store.path), "--subset", "--pq-bits", "4", "--subset-size", "8"]) == 0
    assert (
        main(["-q", "index", str(store.path), "--subset", "--sentence-search", "dense", "--pq-bits", "4"])
        == 0
    )
    settings = json.loads((store.path / "subset" / SETTINGS_FILE).read_text(encoding="utf-8"))
    assert sorted(settings["sentence_search"]) == ["bm25", "dense"]
    assert settings["default_sentence_search"] == "dense" and settings["subset_size"] == 512
    capsys.readouterr()
    test = tmp_path / "test"
    test.mkdir()
    (test / "src").write_text("".join(s + "\n" for s, _ in pairs[:6]), encoding="utf-8")
    (test / "ref").write_text("".join(t + "\n" for _, t in pairs[:6]), encoding="utf-8")
    common = ["--model", str(toy_dir / "model"), "--datastore", str(store.path), "--max-new-tokens", "20"]
    subset_args = ["--retrieval", "subset", "--sentence-search", "bm25", "--subset-size", "4"]
    test_args = ["--source", str(test / "src"), "--reference", str(test / "ref"), "--k", "1", "--lambda", "1"]
    code = main(["-q", "evaluate", *common, *test_args, *subset_args])
    out = capsys.readouterr().out
    assert code == 0
    assert "retrieval=subset(n=4, bm25, faiss, rerank=8)" in out  # auto: faiss on a CPU
    knn_row = next(line for line in out.splitlines() if line.startswith("knn-mt"))
    assert float(knn_row.split()[1]) == 100.0  # λ = 1, k = 1 over a datastore holding the references
    assert main(["-q", "info", str(store.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["subset"]["subset_size"] == 512
    bad = main(
        ["-q", "translate", *common, "--retrieval", "subset", "--subset-size", "0", "-i", str(test / "src")]
    )
    assert bad == 2
    faiss.omp_set_num_threads(1)  # the CLI's index build may have changed it
