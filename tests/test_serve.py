"""``knnmt serve``: HTTP API (translate, memory add/get/delete, limits, auth, idempotency, metrics),
live memory (side index, tombstones, compaction, restart) and dynamic batching, on the toy Marian."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from knnmt.apps.service import BatchConfig, BatchWorker, GenerationOptions, ServeConfig, Service, create_app
from knnmt.core.config import IndexConfig, KNNConfig
from knnmt.core.errors import UsageError
from knnmt.hf.toy import toy_corpus
from knnmt.pipeline.translator import KNNMT
from knnmt.search.index import build_index
from knnmt.store.datastore import Datastore

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: λ = 1, k = 1: the output walks the memory, so an added pair is reproduced exactly.
EXACT = {"k": 1, "lambda": 1.0}
#: The Host header of Starlette's TestClient: served datastores under test answer it besides loopback.
TEST_HOST = "testserver"


@pytest.fixture(scope="module")
def new_pairs(toy_pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs whose sources are not in the toy datastore."""
    known = {s for s, _ in toy_pairs}
    fresh = [p for p in toy_corpus(300, seed=5) if p[0] not in known]
    unique = list(dict((s, (s, t)) for s, t in fresh).values())
    assert len(unique) >= 6
    return unique


@pytest.fixture
def open_service(
    marian: tuple[Any, Any], datastore: Datastore, tmp_path: Path
) -> Iterator[Callable[..., Service]]:
    """Factory: a :class:`Service` over a private copy of the toy datastore (closed after the test)."""
    opened: list[Service] = []
    copy = tmp_path / "served"

    def make(path: Path | None = None, index: Any = None, **overrides: Any) -> Service:
        if path is None:
            path = copy
            if not path.exists():
                shutil.copytree(datastore.path, path)
        settings: dict[str, Any] = {
            "token": TOKEN,
            "max_sentences": 4,
            "max_chars": 200,
            "max_body_bytes": 20_000,
            "compact_every": 0,
            "batch": BatchConfig(max_batch=8, max_wait_ms=2),
            "allowed_hosts": (TEST_HOST,),
        }
        settings.update(overrides)
        service = Service.open(marian, path, ServeConfig(**settings), index=index)
        opened.append(service)
        return service

    yield make
    for service in opened:
        service.close()


@pytest.fixture
def client(open_service: Callable[..., Service]) -> Iterator[TestClient]:
    with TestClient(create_app(open_service(), close_on_shutdown=False)) as c:
        yield c


def _translate(client: TestClient, sentences: list[str], **options: Any) -> dict[str, Any]:
    response = client.post("/translate", json={"sentences": sentences, **options})
    assert response.status_code == 200, response.text
    return response.json()


def _texts(client: TestClient, sentences: list[str], **options: Any) -> list[str]:
    return [t["text"] for t in _translate(client, sentences, **options)["translations"]]


# ---- translate -------------------------------------------------------------------------------


def test_translate_matches_library_and_explains_tokens(client, translator, toy_pairs) -> None:
    sources = [s for s, _ in toy_pairs[:3]]
    config = KNNConfig(k=4, lambda_=0.4, temperature=10.0)
    expected = [t.text for t in translator.translate(sources, knn=config, max_new_tokens=40)]
    body = _translate(
        client, sources, k=4, temperature=10.0, max_new_tokens=40, neighbours=True, **{"lambda": 0.4}
    )
    assert [t["text"] for t in body["translations"]] == expected
    assert body["config"] == {
        "knn": True,
        "k": 4,
        "lambda": 0.4,
        "temperature": 10.0,
        "half_distance": None,
        "confidence_gate": None,
        "domain_gate": None,
        "beam": 1,
        "max_new_tokens": 40,
    }
    first = body["translations"][0]
    tokens = first["explanation"]
    assert len(tokens) == len(first["token_ids"]) - 1  # every generated token (not the start token)
    for token in tokens:
        assert 0.0 <= token["p_mt"] <= 1.0 + 1e-6 and 0.0 <= token["p_knn"] <= 1.0 + 1e-6
        assert abs(token["p_final"] - (0.4 * token["p_knn"] + 0.6 * token["p_mt"])) < 1e-6
        assert len(token["neighbours"]) == 4
        for n in token["neighbours"]:
            assert n["source"] and n["target"] and n["memory"] is False
    # the plain model, and beam search, through the same endpoint
    plain = [t.text for t in translator.translate(sources, knn=False, max_new_tokens=40)]
    assert _texts(client, sources, knn=False, max_new_tokens=40) == plain
    beam = [t.text for t in translator.translate(sources, knn=config, num_beams=3, max_new_tokens=40)]
    assert (
        _texts(client, sources, k=4, temperature=10.0, beam=3, max_new_tokens=40, **{"lambda": 0.4}) == beam
    )


def test_limits_give_413_and_422_with_messages(client) -> None:
    too_many = client.post("/translate", json={"sentences": ["a b"] * 5})
    assert too_many.status_code == 413
    assert "5 sentences" in too_many.json()["detail"] and "limit is 4" in too_many.json()["detail"]
    too_long = client.post("/translate", json={"sentences": ["ok", "x" * 201]})
    assert too_long.status_code == 422
    assert too_long.json()["detail"] == "sentences 1 has 201 characters; the limit is 200"
    body = client.post("/translate", content=b'{"sentences": ["' + b"a" * 30_000 + b'"]}')
    assert body.status_code == 413 and "20000 bytes" in body.json()["detail"]
    chunked = client.post("/translate", content=iter([b'{"sentences": ["', b"a" * 30_000, b'"]}']))
    assert chunked.status_code == 413  # no Content-Length: counted while reading
    small = client.post(
        "/translate",
        content=iter([b'{"sentences": ', b'["open the file"]}']),
        headers={"Content-Type": "application/json"},
    )
    assert small.status_code == 200, small.text
    assert client.post("/translate", json={"sentences": []}).status_code == 422
    assert client.post("/translate", json={"sentences": ["  "]}).status_code == 422
    bad_lambda = client.post("/translate", json={"sentences": ["a"], "lambda": 1.5})
    assert bad_lambda.status_code == 422 and "lambda" in bad_lambda.text
    assert client.post("/translate", json={"sentences": ["a"], "colour": 1}).status_code == 422
    infinite = client.post(
        "/translate",
        content=b'{"sentences": ["a"], "temperature": 1e999}',
        headers={"Content-Type": "application/json"},
    )
    assert infinite.status_code == 422 and "temperature: Input should be a finite number" in infinite.text
    beam = client.post("/translate", json={"sentences": ["a"], "beam": 99})
    assert beam.status_code == 422 and "beam 99 is above the limit 8" in beam.text
    pairs = client.post("/memory", headers=AUTH, json={"pairs": [{"source": "a", "target": "b"}] * 5})
    assert pairs.status_code == 413


def test_writes_need_the_token(client, open_service, marian, datastore) -> None:
    pair = {"pairs": [{"source": "open the file", "target": "Datei öffnen"}]}
    missing = client.post("/memory", json=pair)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert (
        client.post("/memory", json=pair, headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    )
    assert client.delete("/memory/0").status_code == 401
    assert client.get("/memory/0").status_code == 200  # reads are open
    with pytest.raises(UsageError, match="no token is set"):
        ServeConfig(token=None)
    readonly = Service.open(
        marian, datastore.path, ServeConfig(writes=False, allowed_hosts=(TEST_HOST,)), index=None
    )
    try:
        with TestClient(create_app(readonly)) as ro:
            assert ro.post("/memory", json=pair, headers=AUTH).status_code == 403
            assert ro.post("/translate", json={"sentences": ["open the file"]}).status_code == 200
    finally:
        readonly.close()


# ---- memory --------------------------------------------------------------------------------------


def test_added_pair_is_reproduced_then_deleted(client, new_pairs) -> None:
    source, target = new_pairs[0]
    before = _texts(client, [source], **EXACT)[0]
    assert before != target
    added = client.post(
        "/memory",
        headers={**AUTH, "Idempotency-Key": "k1"},
        json={"pairs": [{"source": source, "target": target}]},
    )
    assert added.status_code == 201, added.text
    (sid,) = added.json()["ids"]
    assert added.json()["replayed"] is False and added.json()["entries"] > 0
    assert _texts(client, [source], **EXACT)[0] == target  # the very next request sees it
    explained = _translate(client, [source], neighbours=True, **EXACT)["translations"][0]["explanation"]
    assert all(t["neighbours"][0]["sentence_id"] == sid and t["neighbours"][0]["memory"] for t in explained)
    record = client.get(f"/memory/{sid}").json()
    assert (record["src"], record["tgt"], record["memory"], record["removed"]) == (
        source,
        target,
        True,
        False,
    )

    entries = client.get("/health").json()["entries"]
    again = client.post(
        "/memory",
        headers={**AUTH, "Idempotency-Key": "k1"},
        json={"pairs": [{"source": source, "target": target}]},
    )
    assert again.status_code == 201 and again.json()["ids"] == [sid] and again.json()["replayed"] is True
    assert client.get("/health").json()["entries"] == entries  # nothing added twice
    conflict = client.post(
        "/memory",
        headers={**AUTH, "Idempotency-Key": "k1"},
        json={"pairs": [{"source": source, "target": "anders"}]},
    )
    assert conflict.status_code == 409 and "already used" in conflict.json()["detail"]

    deleted = client.delete(f"/memory/{sid}", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["removed"] is True
    assert client.get(f"/memory/{sid}").json()["removed"] is True
    assert _texts(client, [source], **EXACT)[0] == before  # k stays full from the rest of the memory
    assert client.delete(f"/memory/{sid}", headers=AUTH).status_code == 200  # idempotent
    assert client.delete("/memory/999999", headers=AUTH).status_code == 404
    assert client.get("/memory/999999").status_code == 404
    too_long = client.post(
        "/memory", headers=AUTH, json={"pairs": [{"source": "x y z " * 31, "target": "x"}]}
    )
    assert too_long.status_code == 422 and "tokens, more than the maximum" in too_long.json()["detail"]


def test_deleting_a_corpus_sentence_overfetches_to_keep_k(client, datastore) -> None:
    record = datastore.sentence(10)
    body = _translate(client, [record["src"]], k=3, neighbours=True, **{"lambda": 0.5})
    first = body["translations"][0]["explanation"][0]["neighbours"]
    assert any(n["sentence_id"] == 10 for n in first)
    assert client.delete("/memory/10", headers=AUTH).status_code == 200
    body = _translate(client, [record["src"]], k=3, neighbours=True, **{"lambda": 0.5})
    for token in body["translations"][0]["explanation"]:
        assert len(token["neighbours"]) == 3
        assert all(n["sentence_id"] != 10 for n in token["neighbours"])


def test_memory_survives_restart_and_compaction(open_service, marian, new_pairs, tmp_path) -> None:
    service = open_service()
    path = service.memory.store.path
    service.close()  # the server holds the datastore's write lock while it runs
    build_index(service.memory.store, IndexConfig(factory="Flat"), progress=False)  # a saved main index

    service = open_service(path, index="auto")
    with TestClient(create_app(service, close_on_shutdown=False)) as c:
        ids = []
        for i, (s, t) in enumerate(new_pairs[:3]):
            r = c.post(
                "/memory",
                headers={**AUTH, "Idempotency-Key": f"r{i}"},
                json={"pairs": [{"source": s, "target": t}]},
            )
            ids.append(r.json()["ids"][0])
        assert c.delete(f"/memory/{ids[1]}", headers=AUTH).status_code == 200
    assert service.memory.side_entries > 0
    service.close(compact=False)  # as after a crash: the saved index covers only the first shards

    # restart: the saved index covers a prefix of the shards; the added pairs go to the side index
    service = open_service(path, index="auto")
    assert service.memory.retriever.state.main_count < service.memory.store.count
    with TestClient(create_app(service, close_on_shutdown=False)) as c:
        assert _texts(c, [new_pairs[0][0], new_pairs[2][0]], **EXACT) == [new_pairs[0][1], new_pairs[2][1]]
        assert _texts(c, [new_pairs[1][0]], **EXACT)[0] != new_pairs[1][1]  # still removed
        replay = c.post(
            "/memory",
            headers={**AUTH, "Idempotency-Key": "r2"},
            json={"pairs": [{"source": new_pairs[2][0], "target": new_pairs[2][1]}]},
        )
        assert replay.json() == {"ids": [ids[2]], "entries": 0, "replayed": True}
        assert service.memory.compact(wait=True)
        assert service.memory.side_entries == 0 and service.memory.compactions == 1
        assert _texts(c, [new_pairs[0][0]], **EXACT) == [new_pairs[0][1]]
        assert _samples(c.get("/metrics").text)[("knnmt_memory_compactions", ())] == 1
        extra = c.post(
            "/memory",
            headers=AUTH,
            json={"pairs": [{"source": new_pairs[3][0], "target": new_pairs[3][1]}]},
        )
        assert extra.status_code == 201
    service.close()  # a clean stop compacts the new pair too
    # the compacted index was saved: the plain library loads datastore + index again
    knn = KNNMT.load(marian, path, config=KNNConfig(k=1, lambda_=1.0))
    assert knn.index.ntotal == knn.datastore.count
    assert [t.text for t in knn.translate([new_pairs[0][0], new_pairs[3][0]])] == [
        new_pairs[0][1],
        new_pairs[3][1],
    ]


def test_serve_refuses_writes_without_token(toy_dir, datastore, monkeypatch, caplog) -> None:
    from knnmt.apps.cli import main
    from knnmt.apps.service.app import TOKEN_ENV

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    argv = ["serve", "--model", str(toy_dir / "model"), "--datastore", str(datastore.path)]
    assert main(argv) == 2
    assert "no token is set" in caplog.text and "--read-only" in caplog.text


def test_one_writer_per_datastore(open_service) -> None:
    from knnmt.core.errors import DatastoreError

    first = open_service()
    with pytest.raises(DatastoreError, match=r"is being written by pid \d+ \(serve: "):
        open_service()
    first.close()
    open_service().close()  # the lock is released on close


def test_unfinished_shards_are_ignored_and_cleaned(open_service, datastore, tmp_path) -> None:
    path = tmp_path / "served"
    shutil.copytree(datastore.path, path)
    (path / "shards" / "00003.tmp").mkdir()
    shutil.copytree(path / "shards" / "00002", path / "shards" / "00003")  # renamed, manifest never updated
    assert Datastore.open(path).count == datastore.count
    service = open_service(path)
    assert not (path / "shards" / "00003.tmp").exists() and not (path / "shards" / "00003").exists()
    assert service.memory.store.count == datastore.count


# ---- batching and metrics --------------------------------------------------------------------------


def test_requests_arriving_together_share_one_generate(translator, toy_pairs) -> None:
    sources = [s for s, _ in toy_pairs[20:26]]
    config = KNNConfig(k=4, lambda_=0.5)
    expected = [t.text for t in translator.translate(sources, knn=config, max_new_tokens=30)]
    calls: list[int] = []
    worker = BatchWorker(
        translator, BatchConfig(max_batch=16, max_wait_ms=200), lambda n, tok, sec: calls.append(n)
    )
    try:
        options = GenerationOptions(config, 1, 30)
        futures = [worker.translate([s], options) for s in sources]
        got = [f.result(timeout=60)[0].text for f in futures]
    finally:
        worker.close()
    assert got == expected
    assert calls == [len(sources)]


def test_batching_off_and_concurrent_http_clients(open_service, toy_pairs) -> None:
    service = open_service(batch=BatchConfig(max_batch=1, max_wait_ms=0))
    sources = [s for s, _ in toy_pairs[30:36]]
    with TestClient(create_app(service, close_on_shutdown=False)) as c:
        expected = _texts(c, sources[:4]) + _texts(c, sources[4:])
        results: dict[int, str] = {}

        def one(i: int) -> None:
            results[i] = _texts(c, [sources[i]])[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(sources))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(len(sources))] == expected
        metrics = c.get("/metrics").text
    samples = _samples(metrics)
    assert samples[("knnmt_batch_sentences_bucket", (("le", "1.0"),))] == 6  # six single-sentence calls
    posted = ("knnmt_requests_total", (("code", "200"), ("method", "POST"), ("route", "/translate")))
    assert samples[posted] == 8
    assert samples[("knnmt_datastore_entries", ())] == service.memory.store.count
    assert ("knnmt_tokens_per_second", ()) in samples
    assert any(name == "knnmt_request_duration_seconds_bucket" for name, _ in samples)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus_client: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_print_large_integers_exactly() -> None:
    """A gauge of 2,123,457 entries reads back as exactly that (a %g format printed 2.12346e+06)."""
    from knnmt.apps.service.metrics import Metrics

    metrics = Metrics({"knnmt_datastore_entries": ("Entries.", lambda: 2_123_457)})
    metrics.observe_request("POST", "/translate", 200, 0.01)
    samples = _samples(metrics.render())
    assert samples[("knnmt_datastore_entries", ())] == 2_123_457
    posted = ("knnmt_requests_total", (("code", "200"), ("method", "POST"), ("route", "/translate")))
    assert samples[posted] == 1


def test_health_info_openapi_and_page(client, datastore) -> None:
    assert client.get("/health").json()["entries"] == datastore.count
    info = client.get("/info").json()
    assert info["knn"] == {
        "k": 8,
        "lambda": 0.5,
        "temperature": 100.0,
        "half_distance": None,
        "confidence_gate": None,
        "domain_gate": None,
    }
    assert info["writes"] is True
    schema = client.get("/openapi.json").json()
    assert {"/translate", "/memory", "/memory/{sentence_id}", "/health", "/metrics"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower() and "/translate" in page.text
    assert np.isfinite(_samples(client.get("/metrics").text)[("knnmt_uptime_seconds", ())])


@pytest.mark.parametrize("removed_sentences", [0, 120, 360])  # 360 of 400: most rows need a re-fetch
def test_live_retriever_equals_exact_search_without_removed_entries(datastore, removed_sentences) -> None:
    import faiss

    from knnmt.pipeline.memory import LiveRetriever, _State
    from knnmt.search.index import SearchIndex, exact_index
    from knnmt.search.retriever import IndexRetriever
    from knnmt.store.datastore import Datastore

    rng = np.random.default_rng(0)
    split = datastore.shards[1].start  # main index: first shard; side index: the rest
    main = faiss.IndexFlatL2(datastore.dim)
    main.add(datastore.get_keys(np.arange(split)))
    side = faiss.IndexFlatL2(datastore.dim)
    side.add(datastore.get_keys(np.arange(split, datastore.count)))
    sentences, _ = datastore.provenance(np.arange(datastore.count))
    gone = rng.choice(datastore.manifest["sentences"], removed_sentences, replace=False)
    removed = np.isin(sentences, gone)
    store = Datastore(datastore.path, datastore.manifest)  # a view of the session datastore, its own removals
    store.set_removed(gone.tolist())
    np.testing.assert_array_equal(store.removed.entries, np.flatnonzero(removed))
    state = _State(store, SearchIndex(main, {"factory": "Flat"}), split, side)
    queries = datastore.get_keys(rng.choice(datastore.count, 50)) + rng.normal(0, 0.5, (50, datastore.dim))
    queries = queries.astype(np.float32)
    k = 6
    retriever = LiveRetriever(state)
    assert not retriever.needs_encoder_states
    retriever.prepare(["any source"])  # nothing to prepare
    side_count = datastore.count - split
    assert retriever.describe() == f"live(index(Flat), {side_count} appended, {removed_sentences} removed)"
    dist, ids = retriever.search(queries, k, np.zeros(50, dtype=np.int64))

    keys = datastore.get_keys(np.arange(datastore.count))
    exact = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    exact[:, removed] = np.inf
    expected = np.sort(exact, axis=1)[:, :k]
    assert (ids >= 0).all() and not removed[ids].any()
    np.testing.assert_allclose(dist, expected, rtol=5e-3)  # faiss: float32 ‖q‖² + ‖k‖² − 2q·k
    # the retriever of translate, evaluate, tune and explain skips the same entries (one filter)
    vanilla_dist, vanilla_ids = IndexRetriever(exact_index(store), store).search(queries, k, None)
    np.testing.assert_allclose(vanilla_dist, expected, rtol=5e-3)
    assert (vanilla_ids >= 0).all() and not removed[vanilla_ids].any()


def test_failed_append_leaves_nothing_behind(open_service, new_pairs, monkeypatch) -> None:
    """A failure after the shard is written but before the manifest commits (what a crash there leaves):
    nothing is acknowledged, the datastore opens unchanged, and the next append takes the slot."""
    import knnmt.pipeline.memory as memory_module

    service = open_service()
    before = service.memory.store.count

    def crash(path: Path, payload: dict[str, Any]) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(memory_module, "write_json_atomic", crash)
    with pytest.raises(OSError, match="disk on fire"):
        service.memory.add([new_pairs[0]], "key-a")
    monkeypatch.undo()
    name = f"{len(service.memory.store.manifest['shards']):05d}"
    assert (service.memory.store.path / "shards" / name).is_dir()  # written, never committed
    assert Datastore.open(service.memory.store.path).count == before
    assert service.memory.store.count == before and service.memory.side_entries == 0

    result = service.memory.add([new_pairs[1]], "key-a")  # the key was never used
    assert result.ids == [service.memory.store.manifest["sentences"] - 1] and not result.replayed
    assert service.memory.get(result.ids[0])["src"] == new_pairs[1][0]
    assert Datastore.open(service.memory.store.path).count == before + result.entries


# ---- bad input fails alone, with a message (issue 15) ------------------------------------------------


def _json_error(response: Any, status: int) -> str:
    """The ``detail`` of an error response, after checking its status and that it is JSON, no traceback."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


def _raw(client: TestClient, path: str, body: bytes, **headers: str) -> Any:
    return client.post(path, content=body, headers={"Content-Type": "application/json", **headers})


def test_lone_surrogate_and_nan_are_422_naming_the_field(client) -> None:
    surrogate = _raw(client, "/translate", b'{"sentences": ["open the file", "x \\udcff"]}')
    detail = _json_error(surrogate, 422)
    assert "sentences[1]" in detail and "lone surrogate" in detail and "character 2" in detail
    nan = _raw(client, "/translate", b'{"sentences": ["open the file"], "lambda": NaN}')
    assert _json_error(nan, 422) == "lambda: Input should be a finite number"
    infinite_k = _raw(client, "/translate", b'{"sentences": ["a"], "k": -Infinity}')
    assert _json_error(infinite_k, 422) == "k: Input should be a valid integer (got a number)"
    pair = _raw(client, "/memory", b'{"pairs": [{"source": "a", "target": "\\ud800b"}]}', **AUTH)
    assert "pairs[0].target" in _json_error(pair, 422)
    raw_key = '{"sentences": ["a"], "\udcff": 1}'.encode("utf-8", "surrogatepass")  # not UTF-8
    escaped_key = b'{"sentences": ["a"], "\\udcff": 1}'
    for body in (raw_key, escaped_key):
        detail = _json_error(_raw(client, "/translate", body), 422)
        assert detail == "the body holds text that is not valid Unicode (a lone surrogate such as \\udcff)"
    assert "error parsing the body" in _json_error(
        _raw(client, "/translate", b'{"sentences": ["\xff"]}'), 400
    )
    not_json = _raw(client, "/translate", b'{"sentences": ["a"')
    assert "not valid JSON" in _json_error(not_json, 422)
    assert _json_error(_raw(client, "/translate", b""), 422) == "the request needs a JSON body"


@pytest.mark.parametrize(
    ("body", "field", "got"),
    [
        ({"k": True}, "k", "a boolean"),
        ({"k": "8"}, "k", "a string"),
        ({"k": 8.0}, "k", "a number"),
        ({"beam": "2"}, "beam", "a string"),
        ({"max_new_tokens": False}, "max_new_tokens", "a boolean"),
        ({"lambda": "0.5"}, "lambda", "a string"),
        ({"temperature": True}, "temperature", "a boolean"),
        ({"knn": 0}, "knn", "an integer"),
        ({"neighbours": "yes"}, "neighbours", "a string"),
        ({"sentences": "open the file"}, "sentences", "a string"),
        ({"sentences": [1]}, "sentences[0]", "an integer"),
    ],
)
def test_types_are_strict(client, body, field, got) -> None:
    response = client.post("/translate", json={"sentences": ["open the file"], **body})
    detail = _json_error(response, 422)
    assert detail.startswith(f"{field}: Input should be a valid") and detail.endswith(f"(got {got})")


def test_numbers_may_be_integers_where_floats_are_asked(client) -> None:
    assert _translate(client, ["open the file"], **{"lambda": 1, "temperature": 10})["config"]["lambda"] == 1
    huge = _raw(client, "/translate", b'{"sentences": ["a"], "temperature": 1' + b"0" * 400 + b"}")
    assert (
        _json_error(huge, 422)
        == "temperature: Input should be a valid number (got an integer too large for a float)"
    )


def test_memory_pairs_are_strict_and_empty_idempotency_keys_refused(open_service, new_pairs) -> None:
    service = open_service()
    client = TestClient(create_app(service, close_on_shutdown=False))
    manifest = (service.memory.store.path / "manifest.json").read_bytes()
    source, target = new_pairs[0]
    for pair in ({"source": 1, "target": "x"}, {"source": source, "target": None}, {"source": [source]}):
        assert "pairs[0]" in _json_error(client.post("/memory", headers=AUTH, json={"pairs": [pair]}), 422)
    body = {"pairs": [{"source": source, "target": target}]}
    for key in ("", "   "):
        response = client.post("/memory", headers={**AUTH, "Idempotency-Key": key}, json=body)
        assert "Idempotency-Key header is empty" in _json_error(response, 422)
    assert (service.memory.store.path / "manifest.json").read_bytes() == manifest  # nothing written
    with pytest.raises(UsageError, match="idempotency key is empty"):
        service.memory.add([(source, target)], "")
    assert client.post("/memory", headers={**AUTH, "Idempotency-Key": "k"}, json=body).status_code == 201


class _FailsOn:
    """A translator whose ``translate`` raises on a poisoned sentence (as an input the checks missed
    would): everything else is the real translator's."""

    def __init__(self, translator: KNNMT, poison: str) -> None:
        self._translator = translator
        self.poison = poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self._translator, name)

    def translate(self, sources: list[str], **kwargs: Any) -> Any:
        if self.poison in sources:
            raise ValueError(f"cannot tokenize {self.poison!r}")
        return self._translator.translate(sources, **kwargs)


def test_a_request_that_breaks_its_batch_fails_alone(translator, toy_pairs) -> None:
    sources = [s for s, _ in toy_pairs[40:44]]
    config = KNNConfig(k=4, lambda_=0.5)
    expected = [t.text for t in translator.translate(sources, knn=config, max_new_tokens=20)]
    calls: list[int] = []
    worker = BatchWorker(
        _FailsOn(translator, "poison"),  # type: ignore[arg-type]
        BatchConfig(max_batch=16, max_wait_ms=300),
        lambda n, tok, sec: calls.append(n),
    )
    try:
        options = GenerationOptions(config, 1, 20)
        good = [worker.translate([s], options) for s in sources[:2]]
        bad = worker.translate(["poison", sources[2]], options)
        good += [worker.translate([s], options) for s in sources[2:]]
        with pytest.raises(ValueError, match="cannot tokenize 'poison'"):
            bad.result(timeout=60)
        assert [f.result(timeout=60)[0].text for f in good] == expected
    finally:
        worker.close()
    assert calls == [1, 1, 1, 1]  # the shared call failed; each good request then ran on its own


def test_an_internal_failure_is_a_clear_500_for_that_request_only(open_service, toy_pairs) -> None:
    service = open_service(batch=BatchConfig(max_batch=16, max_wait_ms=300))
    service.worker.translator = _FailsOn(service.translator, "poison")  # type: ignore[assignment]
    sources = [s for s, _ in toy_pairs[50:53]]
    responses: dict[str, Any] = {}
    with TestClient(create_app(service, close_on_shutdown=False)) as c:

        def send(text: str) -> None:
            body = json.dumps({"sentences": [text]}).encode()  # "\udcff" stays a JSON escape
            responses[text] = _raw(c, "/translate", body)

        threads = [threading.Thread(target=send, args=(t,)) for t in [*sources, "poison", "bad \udcff"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    detail = _json_error(responses["poison"], 500)
    assert "ValueError: cannot tokenize 'poison'" in detail and "other requests are not affected" in detail
    assert "lone surrogate" in _json_error(responses["bad \udcff"], 422)  # refused before the batch
    assert all(responses[s].status_code == 200 for s in sources)


# ---- the service's surface: private reads, Host check, no CDN, port in use --------------------------


def test_private_reads_need_the_token(open_service) -> None:
    service = open_service(private_reads=True)
    with TestClient(create_app(service, close_on_shutdown=False)) as c:
        assert "--private-reads" in _json_error(c.get("/memory/0"), 401)
        assert _json_error(c.get("/memory/0", headers={"Authorization": "Bearer wrong-token"}), 401)
        assert c.get("/memory/0", headers=AUTH).json()["id"] == 0
        explain = {"sentences": ["open the file"], "neighbours": True}
        assert "--private-reads: neighbours" in _json_error(c.post("/translate", json=explain), 401)
        assert c.post("/translate", json=explain, headers=AUTH).status_code == 200
        assert c.post("/translate", json={"sentences": ["open the file"]}).status_code == 200
        info = c.get("/info").json()
        assert info["private_reads"] is True and info["datastore"] is None
        shown = c.get("/info", headers=AUTH).json()
        assert shown["datastore"] == service.memory.store.path.name  # its name, never the server's path
        assert not any(isinstance(v, str) and v.startswith("/") for v in shown.values())
    with pytest.raises(UsageError, match="--private-reads needs a token"):
        ServeConfig(writes=False, private_reads=True)


def test_no_page_or_schema_loads_anything_from_a_cdn(client) -> None:
    info = client.get("/info").json()
    assert info["private_reads"] is False and info["datastore"]  # reads are open by default
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    for path in ("/", "/openapi.json"):
        text = client.get(path).text.lower()
        assert "cdn" not in text and "jsdelivr" not in text and "unpkg" not in text and "https://" not in text


def test_host_header_must_name_this_server(open_service) -> None:
    from knnmt.apps.service.app import allowed_host_names

    service = open_service(allowed_hosts=())  # bound to 127.0.0.1, the default
    with TestClient(create_app(service, close_on_shutdown=False), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
        for host in ("localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in (
            "evil.example",
            "evil.example:8000",
            "127.0.0.1.evil.example",
            "[::1",
            "localhost:x",
            "",
        ):
            detail = _json_error(c.get("/health", headers={"Host": host}), 400)
            assert "is not served here" in detail and "--allowed-host" in detail
        rebound = c.post("/memory", headers={**AUTH, "Host": "attacker.example"}, json={"pairs": []})
        assert rebound.status_code == 400
    assert allowed_host_names("0.0.0.0") is None  # wildcard bind: no check unless names are given
    assert allowed_host_names("0.0.0.0", ["mt.example"]) == {"mt.example", "127.0.0.1", "localhost", "::1"}
    assert allowed_host_names("10.1.2.3") == {"10.1.2.3"}
    assert allowed_host_names("::1", ["proxy.local"]) == {"proxy.local", "127.0.0.1", "localhost", "::1"}
    assert allowed_host_names("127.0.0.1", ["*"]) is None


def test_serve_on_a_port_in_use_exits_1_with_a_message(toy_dir, datastore, caplog) -> None:
    import socket

    from knnmt.apps.cli import main

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = ["serve", "--model", str(toy_dir / "model"), "--datastore", str(datastore.path), "--read-only"]
        assert main([*argv, "--port", str(port)]) == 1
    assert f"port {port} on 127.0.0.1 is already in use; choose another with --port" in caplog.text
    assert "Traceback" not in caplog.text


def test_bind_errors_say_what_to_change(toy_dir, datastore, monkeypatch, caplog) -> None:
    from knnmt.apps.cli import main
    from knnmt.apps.service import bind_socket
    from knnmt.apps.service.app import TOKEN_ENV
    from knnmt.core.errors import KnnmtError

    with pytest.raises(KnnmtError, match=r"192\.0\.2\.1: not an address of this machine"):
        bind_socket("192.0.2.1", 0)  # TEST-NET-1: never a local address
    with pytest.raises(UsageError, match=r"--port must be in 0\.\.65535"):
        bind_socket("127.0.0.1", 70000)
    bind_socket("127.0.0.1", 0).close()
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    argv = ["serve", "--model", str(toy_dir / "model"), "--datastore", str(datastore.path)]
    assert main([*argv, "--read-only", "--private-reads"]) == 2
    assert "--private-reads needs a token" in caplog.text
