"""Durability of ``POST /memory``: ``knnmt serve`` runs as a subprocess, a client streams appends, the
server is killed with SIGKILL mid-stream; every acknowledged pair must be in the datastore, the
datastore must open, and after a restart retried requests (same Idempotency-Key) add nothing twice."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from knnmt.apps.cli import main  # noqa: E402
from knnmt.apps.service.process import spawn_server  # noqa: E402
from knnmt.hf.toy import toy_corpus  # noqa: E402
from knnmt.store.datastore import Datastore, logical_shards  # noqa: E402

TOKEN = "crash-test-token"


def start_server(model: Path, datastore: Path, token_file: Path, log: Path) -> tuple[Any, str]:
    return spawn_server(model, datastore, ["--token-file", str(token_file)], log)


def test_sigkill_during_appends_loses_nothing_acknowledged(
    toy_dir, datastore, toy_pairs, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    known = {s for s, _ in toy_pairs}
    pairs = list({s: (s, t) for s, t in toy_corpus(400, seed=11) if s not in known}.values())[:60]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    log = tmp_path / "server.log"

    process, url = start_server(toy_dir / "model", path, token_file, log)
    acked: dict[str, list[int]] = {}
    sent: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for i, (source, target) in enumerate(pairs):
                if stop.is_set():
                    return
                key = f"pair-{i}"
                sent.append(key)
                try:
                    r = client.post(
                        "/memory",
                        headers={**headers, "Idempotency-Key": key},
                        json={"pairs": [{"source": source, "target": target}]},
                    )
                except httpx.TransportError:
                    return  # the server is gone
                assert r.status_code == 201, r.text
                acked[key] = r.json()["ids"]

    writer = threading.Thread(target=stream)
    writer.start()
    deadline = time.monotonic() + 60
    while len(acked) < 8 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)  # mid-stream: usually while an append is being written
    process.wait(10)
    stop.set()
    writer.join(30)
    assert len(acked) >= 8, log.read_text()[-3000:]
    assert len(sent) < len(pairs), "the stream finished before the kill"

    # the datastore opens (an unfinished shard, if any, is ignored) and holds every acknowledged pair
    store = Datastore.open(path)
    base = datastore.manifest["sentences"]
    for key, ids in acked.items():
        i = int(key.split("-")[1])
        assert ids == [ids[0]] and ids[0] >= base
        record = store.sentence(ids[0])
        assert (record["src"], record["tgt"]) == pairs[i], key
    # as written: a background merge keeps each append's record in the merged shard's parts
    keys = [s["memory"]["idempotency_key"] for s in logical_shards(store.manifest) if "memory" in s]
    assert len(keys) == len(set(keys)) and set(acked) <= set(keys)

    # restart and retry everything sent: acknowledged keys replay, nothing is added twice
    process, url = start_server(toy_dir / "model", path, token_file, log)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for key in sent:
                i = int(key.split("-")[1])
                r = client.post(
                    "/memory",
                    headers={**headers, "Idempotency-Key": key},
                    json={"pairs": [{"source": pairs[i][0], "target": pairs[i][1]}]},
                )
                assert r.status_code == 201, r.text
                if key in acked:
                    assert r.json() == {"ids": acked[key], "entries": 0, "replayed": True}
            # the restarted server took over the write lock the killed one left; a CLI writer is refused
            corpus = tmp_path / "more.tsv"
            corpus.write_text("".join(f"{s}\t{t}\n" for s, t in toy_pairs[:5]), encoding="utf-8")
            argv = ["build", "--model", str(toy_dir / "model"), "--corpus", str(corpus), "--out", str(path)]
            with caplog.at_level(logging.ERROR):
                assert main([*argv, "--append"]) == 1
            assert f"is being written by pid {process.pid} (serve: " in caplog.text
            sentences = client.get("/info").json()["sentences"]
            assert sentences == base + len(sent)  # each pair exactly once
            first = min(acked, key=lambda k: acked[k][0])
            source, target = pairs[int(first.split("-")[1])]
            body: dict[str, Any] = {"sentences": [source], "k": 1, "lambda": 1.0}
            assert client.post("/translate", json=body).json()["translations"][0]["text"] == target
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    Datastore.open(path)
