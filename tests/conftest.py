"""Shared fixtures: tiny offline models (Marian, T5, M2M100), a toy corpus and datastores built from it.

Everything is built once per session under ``tmp_path_factory`` from locally trained SentencePiece
models; nothing touches the model hub. Model sizes are tiny so the whole suite stays fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from knnmt.core.config import BuildConfig
from knnmt.hf.toy import build_toy_model, toy_corpus, train_sentencepiece
from knnmt.pipeline.build import build_datastore
from knnmt.pipeline.translator import KNNMT, load_model
from knnmt.store.corpus import CorpusSpec
from knnmt.store.datastore import Datastore
from knnmt.store.synthetic import write_synthetic_datastore  # noqa: F401  (tests import it from here)

#: Sentence pairs in the session's toy corpus (and its datastore).
TOY_SENTENCES = 400


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "ignore:Recommended. pip install sacremoses")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # The suite runs on 2 shared cores: one OpenMP thread avoids faiss spin-waiting under contention
    # (PQ training is ~3x faster single-threaded on a loaded machine); the models are too small to gain.
    import faiss

    faiss.omp_set_num_threads(1)


# ---- plain helpers (also reachable through fixtures) ------------------------------------------


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def write_text_corpus(directory: Path, pairs: Sequence[tuple[str, str]], name: str = "corpus") -> CorpusSpec:
    """Write ``pairs`` as ``name.en`` / ``name.de`` in ``directory``; returns the text CorpusSpec."""
    directory.mkdir(parents=True, exist_ok=True)
    src, tgt = directory / f"{name}.en", directory / f"{name}.de"
    src.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    tgt.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return CorpusSpec((str(src), str(tgt)), "text")


def strip_pad(ids: Sequence[int], pad_id: int, start_id: int | None = None) -> list[int]:
    """Drop the leading decoder start token (when given) and trailing padding from generated ids."""
    out = list(ids)
    if start_id is not None and out and out[0] == start_id:
        out = out[1:]
    while out and out[-1] == pad_id:
        out.pop()
    return out


def all_entries(store: Datastore) -> dict[str, np.ndarray]:
    """Every per-entry array of ``store`` concatenated in global id order (keys as float32)."""
    ids = np.arange(store.count)
    sent, pos = store.provenance(ids)
    return {
        "keys": store.get_keys(ids),
        "values": np.asarray(store.values),
        "sentence_ids": sent,
        "positions": pos,
    }


def all_sentences(store: Datastore) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for shard in store.shards:
        with (shard.path / "sentences.jsonl").open(encoding="utf-8") as handle:
            out.extend(json.loads(line) for line in handle)
    return out


# ---- tokenizers and models for T5 and M2M100 -------------------------------------------------


def _spm_pieces(model_path: Path) -> list[tuple[str, float]]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def make_t5(texts: list[str], directory: Path, seed: int = 0) -> tuple[Any, Any]:
    """A real ``T5Tokenizer`` (tokenizers-backed in transformers 5) over a local SentencePiece unigram
    vocabulary, and a randomly initialised T5 with ``d_model=32``."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    pieces = _spm_pieces(train_sentencepiece(texts, directory / "spm"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, s) for p, s in pieces if p not in ("<unk>", "</s>", "<pad>")]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=64)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config.max_length = 64
    return model, tokenizer


def make_m2m100(texts: list[str], directory: Path, seed: int = 0) -> tuple[Any, Any]:
    """An ``M2M100Tokenizer`` from a local ``vocab.json`` + SentencePiece model (src en, tgt de) and a
    randomly initialised M2M100 with ``d_model=32``."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    spm_path = train_sentencepiece(texts, directory / "spm")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece, _ in _spm_pieces(spm_path):
        vocab.setdefault(piece, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = M2M100Tokenizer(
        vocab_file=str(directory / "vocab.json"),
        spm_file=str(spm_path),
        src_lang="en",
        tgt_lang="de",
        language_codes="wmt21",
        num_madeup_words=0,
    )
    # language tokens live after the SentencePiece vocabulary and are not all counted by len(tokenizer)
    vocab_size = max([len(tokenizer) - 1, *tokenizer.lang_code_to_id.values()]) + 1
    torch.manual_seed(seed)
    config = M2M100Config(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=0,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    model = M2M100ForConditionalGeneration(config).eval()
    model.generation_config.max_length = 64
    return model, tokenizer


# ---- session fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``build_toy_model`` output: ``model/`` (tiny random Marian + tokenizer) and ``corpus.{en,de}``."""
    return build_toy_model(tmp_path_factory.mktemp("toy"), n_sentences=TOY_SENTENCES)


@pytest.fixture(scope="session")
def toy_pairs(toy_dir: Path) -> list[tuple[str, str]]:
    src, tgt = read_lines(toy_dir / "corpus.en"), read_lines(toy_dir / "corpus.de")
    assert len(src) == len(tgt) == TOY_SENTENCES
    return list(zip(src, tgt, strict=True))


@pytest.fixture(scope="session")
def toy_spec(toy_dir: Path) -> CorpusSpec:
    return CorpusSpec((str(toy_dir / "corpus.en"), str(toy_dir / "corpus.de")), "text")


@pytest.fixture(scope="session")
def marian(toy_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) loaded back from disk the way users load them. Do not modify."""
    return load_model(str(toy_dir / "model"))


@pytest.fixture(scope="session")
def datastore(
    marian: tuple[Any, Any], toy_spec: CorpusSpec, tmp_path_factory: pytest.TempPathFactory
) -> Datastore:
    """Datastore of the whole toy corpus in 3 shards (150 + 150 + 100 sentences). Read-only."""
    model, tokenizer = marian
    out = tmp_path_factory.mktemp("datastore") / "ds"
    return build_datastore(model, tokenizer, toy_spec, out, BuildConfig(shard_sentences=150), progress=False)


@pytest.fixture(scope="session")
def translator(marian: tuple[Any, Any], datastore: Datastore) -> KNNMT:
    model, tokenizer = marian
    return KNNMT(model, tokenizer, datastore)


@pytest.fixture(scope="session")
def t5(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    pairs = toy_corpus(200, seed=1)
    return make_t5([t for p in pairs for t in p], tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def m2m100(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    pairs = toy_corpus(200, seed=1)
    return make_m2m100([t for p in pairs for t in p], tmp_path_factory.mktemp("m2m100"))


@pytest.fixture
def make_corpus(tmp_path: Path) -> Callable[..., CorpusSpec]:
    """Factory: ``make_corpus(pairs, name="corpus")`` writes a text corpus under this test's tmp_path."""

    def make(pairs: Sequence[tuple[str, str]], name: str = "corpus") -> CorpusSpec:
        return write_text_corpus(tmp_path / "corpora", pairs, name)

    return make


# ---- retrieval modes (vanilla index and Subset kNN-MT) ----------------------------------------

#: Every retrieval mode the generation oracles run for.
#: ``subset-{sentence search}-{scorer}``: both sentence searches and both PQ scorers are covered.
RETRIEVAL_MODES = ("index", "subset-bm25-faiss", "subset-dense-adc")
#: Subset size of the oracle tests: small enough that sentences search different subsets.
ORACLE_SUBSET_SIZE = 32


def build_test_subset(store: Datastore, model: Any, tokenizer: Any, out: Path | None = None) -> Path:
    """A Subset kNN-MT index with both sentence searches (4-bit PQ: fast to train) over ``store``."""
    from knnmt.pipeline.build import build_subset_index
    from knnmt.search.subset import SUBSET_DIR, SubsetConfig

    target = out or store.path / SUBSET_DIR
    build_subset_index(store, SubsetConfig(pq_bits=4), out=target, progress=False)
    build_subset_index(
        store,
        SubsetConfig(sentence_search="dense", pq_bits=4),
        model=model,
        tokenizer=tokenizer,
        out=target,
        progress=False,
    )
    return target


def translator_for(
    mode: str,
    model: Any,
    tokenizer: Any,
    store: Datastore,
    subset_dir: Path | None = None,
    subset_size: int = ORACLE_SUBSET_SIZE,
    **kwargs: Any,
) -> KNNMT:
    """A :class:`KNNMT` over ``store`` retrieving with ``mode`` (one of :data:`RETRIEVAL_MODES`)."""
    from knnmt.search.subset import SubsetRetriever, SubsetSearch

    if mode == "index":
        return KNNMT(model, tokenizer, store, **kwargs)
    _, search, scorer = mode.split("-")
    options = SubsetSearch(sentence_search=search, scorer=scorer, subset_size=subset_size)
    retriever = SubsetRetriever.load(store, subset_dir, options)
    return KNNMT(model, tokenizer, store, retriever=retriever, **kwargs)


@pytest.fixture(scope="session")
def subset_dir(
    marian: tuple[Any, Any], datastore: Datastore, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Subset kNN-MT index (BM25 and dense) of the session datastore, stored outside it."""
    model, tokenizer = marian
    return build_test_subset(datastore, model, tokenizer, tmp_path_factory.mktemp("subset") / "subset")


@pytest.fixture(scope="session", params=RETRIEVAL_MODES)
def any_translator(request: pytest.FixtureRequest, marian: tuple[Any, Any], datastore: Datastore) -> KNNMT:
    """The session translator for each retrieval mode (vanilla exact index, Subset kNN-MT BM25/dense)."""
    model, tokenizer = marian
    if request.param == "index":
        translator: KNNMT = request.getfixturevalue("translator")
        return translator
    return translator_for(request.param, model, tokenizer, datastore, request.getfixturevalue("subset_dir"))
