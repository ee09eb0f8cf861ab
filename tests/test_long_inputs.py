"""Sentences longer than the model's maximum (issue 15, item 3), on every path that feeds the model.

The model here has 32 positions while its tokenizer declares 64 tokens, so neither the tokenizer's own
truncation nor a hard-coded length keeps the inputs inside the position embeddings: only the model's
own maximum (:func:`knnmt.hf.teacher_forcing.sequence_limit`) does. Over-long sides are truncated and
counted, or (memory appends) refused with a message for API users.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import write_text_corpus
from knnmt.apps.cli import EXIT_OK, main
from knnmt.core.config import BuildConfig, KNNConfig
from knnmt.core.errors import UsageError
from knnmt.hf.teacher_forcing import TooLongError, embed_sources, pair_queries, sequence_limit
from knnmt.hf.toy import make_marian_model, make_marian_tokenizer, toy_corpus
from knnmt.pipeline.build import build_datastore
from knnmt.pipeline.translator import KNNMT, load_model
from knnmt.pipeline.tuning import tune
from knnmt.store.datastore import Datastore

#: Positions of the test model (its tokenizer declares more: 64).
POSITIONS = 32
TOKEN = "long-inputs-token"


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return toy_corpus(120, seed=3)


@pytest.fixture(scope="module")
def long_pair(pairs: list[tuple[str, str]]) -> tuple[str, str]:
    """One pair whose both sides have well over 64 tokens (and 1,000 characters at most)."""
    return " ".join(s for s, _ in pairs[:12]), " ".join(t for _, t in pairs[:12])


@pytest.fixture(scope="module")
def short_model_dir(pairs: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Marian with 32 positions whose tokenizer and generation config allow 64 tokens."""
    out = tmp_path_factory.mktemp("short") / "model"
    tokenizer = make_marian_tokenizer([t for p in pairs for t in p], out, model_max_length=64)
    model = make_marian_model(tokenizer, d_model=32, layers=1, max_positions=POSITIONS)
    model.generation_config.max_length = 64  # more than the positions: generation must not follow it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def short_model(short_model_dir: Path) -> tuple[Any, Any]:
    return load_model(str(short_model_dir))


@pytest.fixture(scope="module")
def short_store(
    short_model: tuple[Any, Any],
    pairs: list[tuple[str, str]],
    long_pair: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Datastore:
    """The pairs and, last, the over-long pair (both sides truncated by the build)."""
    model, tokenizer = short_model
    base = tmp_path_factory.mktemp("short-store")
    spec = write_text_corpus(base / "corpus", [*pairs, long_pair])
    return build_datastore(model, tokenizer, spec, base / "ds", BuildConfig(), progress=False)


@pytest.fixture(scope="module")
def short_knn(short_model: tuple[Any, Any], short_store: Datastore) -> KNNMT:
    model, tokenizer = short_model
    return KNNMT(model, tokenizer, short_store, config=KNNConfig(k=4, lambda_=0.5, temperature=10.0))


def _tokens(tokenizer: Any, text: str, target: bool = False) -> int:
    return len(tokenizer(text_target=text)["input_ids"] if target else tokenizer(text)["input_ids"])


def test_the_limit_is_the_models_positions(short_model: tuple[Any, Any], long_pair: tuple[str, str]) -> None:
    model, tokenizer = short_model
    assert tokenizer.model_max_length == 64 > POSITIONS == model.config.max_position_embeddings
    assert sequence_limit(model, tokenizer) == POSITIONS
    assert sequence_limit(model, tokenizer, 20) == 20
    with pytest.raises(UsageError, match="more than the model's maximum of 32"):
        sequence_limit(model, tokenizer, 100)
    assert _tokens(tokenizer, long_pair[0]) > 64 and _tokens(tokenizer, long_pair[1], target=True) > 64


def test_build_truncates_and_counts(
    short_model: tuple[Any, Any],
    short_store: Datastore,
    pairs: list[tuple[str, str]],
    long_pair: tuple[str, str],
    tmp_path: Path,
) -> None:
    assert short_store.manifest["corpora"][0]["truncated"] == 2  # both sides of the long pair
    last = short_store.sentence(len(pairs))
    assert (last["src"], last["tgt"]) == long_pair
    _, positions = short_store.provenance(list(range(short_store.count - POSITIONS, short_store.count)))
    assert positions.tolist() == list(range(POSITIONS))  # its target is cut to the model's maximum
    model, tokenizer = short_model
    spec = write_text_corpus(tmp_path / "corpus", [pairs[0], long_pair])
    too_long = r"corpus\.en:2: source sentence has \d+ tokens.*drop --no-truncate"
    with pytest.raises(TooLongError, match=too_long):
        build_datastore(model, tokenizer, spec, tmp_path / "ds", BuildConfig(truncate=False), progress=False)
    with pytest.raises(UsageError, match="max_length 100 is more than the model's maximum of 32"):
        build_datastore(model, tokenizer, spec, tmp_path / "ds", BuildConfig(max_length=100), progress=False)


def test_pair_queries_truncates_to_the_models_maximum(
    short_model: tuple[Any, Any], pairs: list[tuple[str, str]], long_pair: tuple[str, str], caplog: Any
) -> None:
    model, tokenizer = short_model
    with caplog.at_level(logging.WARNING, logger="knnmt"):
        queries = pair_queries(model, tokenizer, [pairs[5], long_pair], path="test pairs")
    assert [len(q) for q in queries] == [_tokens(tokenizer, pairs[5][1], target=True), POSITIONS]
    assert "test pairs: truncated 2 over-long sentence side(s) to the model's maximum of 32" in caplog.text


def _tune_grid() -> dict[str, Any]:
    return {"ks": (1, 2), "temperatures": (10.0,), "lambdas": (0.0, 0.5), "half_distances": [None]}


def test_tune_runs_on_over_long_dev_pairs(
    short_knn: KNNMT, pairs: list[tuple[str, str]], long_pair: tuple[str, str], caplog: Any
) -> None:
    dev = [*pairs[20:24], long_pair]
    with caplog.at_level(logging.WARNING, logger="knnmt"):
        result = tune(
            short_knn,
            [s for s, _ in dev],
            [t for _, t in dev],
            **_tune_grid(),
            gates=(None,),
            confirm=1,
            ood_sources=[long_pair[0]],
            ood_references=[long_pair[1]],
            max_new_tokens=100,  # capped to the positions by translate
        )
    assert result.truncated == 4  # both sides of the long pair, in the dev and the out-of-domain set
    tokenizer = short_knn.tokenizer
    assert result.tokens == sum(_tokens(tokenizer, t, target=True) for _, t in dev[:-1]) + POSITIONS
    assert "dev: truncated 2 over-long" in caplog.text
    assert "out-of-domain dev: truncated 2 over-long" in caplog.text
    assert result.to_dict()["truncated"] == 4


def test_cli_tune_runs_on_over_long_dev_pairs(
    short_model_dir: Path,
    short_store: Datastore,
    pairs: list[tuple[str, str]],
    long_pair: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_dir = tmp_path / "ds"
    shutil.copytree(short_store.path, store_dir)
    dev = [*pairs[30:33], long_pair]
    src, ref = tmp_path / "dev.en", tmp_path / "dev.de"
    src.write_text("".join(s + "\n" for s, _ in dev), encoding="utf-8")
    ref.write_text("".join(t + "\n" for _, t in dev), encoding="utf-8")
    code = main(
        [
            *("-q", "tune", "--model", str(short_model_dir), "--datastore", str(store_dir)),
            *("--source", str(src), "--reference", str(ref), "--ks", "1,2", "--temperatures", "10"),
            *("--lambdas", "0,0.5", "--confirm", "1", "--max-new-tokens", "100"),
        ]
    )
    assert code == EXIT_OK
    assert "chosen:" in capsys.readouterr().out
    assert (store_dir / "knn.json").is_file()


def test_explain_truncates_over_long_source_and_target(
    short_knn: KNNMT, long_pair: tuple[str, str], caplog: Any
) -> None:
    source, target = long_pair
    with caplog.at_level(logging.WARNING, logger="knnmt"):
        explained = short_knn.explain(source, target)
    assert [e.position for e in explained] == list(range(POSITIONS))
    assert "explain: truncated 2 over-long" in caplog.text
    ids = short_knn.tokenizer(text_target=target)["input_ids"]
    assert len(short_knn.explain(source, ids)) == POSITIONS  # token ids (e.g. a translation) are cut too
    assert [e.token_id for e in short_knn.explain(source, ids)] == ids[:POSITIONS]


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")  # min_new_tokens, on purpose
@pytest.mark.parametrize("knn", [False, True], ids=["plain", "knn"])
@pytest.mark.parametrize("beams", [1, 2])
def test_translate_over_long_source(
    short_knn: KNNMT, pairs: list[tuple[str, str]], long_pair: tuple[str, str], knn: bool, beams: int
) -> None:
    """The source is cut (counted) and the decoder stops at its positions, whatever length is asked."""
    sources = [long_pair[0], pairs[40][0]]
    for asked in ({}, {"max_new_tokens": 100}, {"max_length": 100}):
        out = short_knn.translate(sources, knn=knn, num_beams=beams, min_new_tokens=80, **asked)
        assert short_knn.last_stats["truncated_sources"] == 1
        assert all(len(t.token_ids) <= POSITIONS for t in out)
    assert max(len(t.token_ids) for t in out) == POSITIONS  # min_new_tokens pushed it to the limit
    explained = short_knn.translate(sources, knn=knn, num_beams=beams, return_neighbors=True)
    assert all(t.explanation for t in explained)


def test_dense_sentence_embedding_truncates(short_model: tuple[Any, Any], long_pair: tuple[str, str]) -> None:
    model, tokenizer = short_model
    assert embed_sources(model, tokenizer, [long_pair[0], "short"]).shape == (2, 32)


def test_memory_append_refuses_over_long_pair(
    short_model: tuple[Any, Any], short_store: Datastore, long_pair: tuple[str, str], tmp_path: Path
) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from knnmt.apps.service import ServeConfig, Service, create_app

    store_dir = tmp_path / "served"
    shutil.copytree(short_store.path, store_dir)
    config = ServeConfig(token=TOKEN, compact_every=0, allowed_hosts=("testserver",))  # TestClient's Host
    service = Service.open(short_model, store_dir, config)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with TestClient(create_app(service, close_on_shutdown=False)) as client:
            entries = client.get("/health").json()["entries"]
            ok_pair = {"source": "the red house", "target": "das rote Haus"}
            for body, side in (
                (
                    [ok_pair, {"source": long_pair[0], "target": "kurz"}],
                    "source",
                ),
                ([ok_pair, {"source": "short", "target": long_pair[1]}], "target"),
            ):
                response = client.post("/memory", headers=auth, json={"pairs": body})
                assert response.status_code == 422, response.text
                detail = response.json()["detail"]
                assert f"pair 1's {side} has " in detail
                assert "more than the maximum of 32 the model takes; split it" in detail
                assert "--" not in detail  # no command-line flag in an HTTP answer
            assert client.get("/health").json()["entries"] == entries  # nothing added
            translated = client.post("/translate", json={"sentences": [long_pair[0]], "neighbours": True})
            assert translated.status_code == 200, translated.text
    finally:
        service.close()
