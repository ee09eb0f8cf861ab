"""Property-based tests of the HTTP API (issue 15: nothing lost, no traceback): random JSON bodies
(any JSON value, fields of random types, strings with lone surrogates, NUL, huge numbers, NaN), raw
bytes and random headers sent to ``/translate``, ``/memory`` and ``GET``/``DELETE /memory/{id}`` never
give a 500 or a traceback, every error is JSON with a ``detail`` string, and a request that is refused
changes nothing on disk (manifest, shards, tombstones); one that succeeds only adds.

One service (toy Marian, tiny limits) serves every example in process; ``--private-reads`` is on so
the token checks of reads are exercised too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from knnmt.apps.service import BatchConfig, ServeConfig, Service, create_app
from knnmt.store.writelock import LOCK_FILE

TOKEN = "property-token"
HOST = "testserver"
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# ---- strategies ------------------------------------------------------------------------------------

#: Characters that break naive code: lone surrogates, NUL and other controls, non-BMP, RTL, BOM.
_NASTY = st.sampled_from(["\udcff", "\ud800", "\x00", "\n", "\t", " ", "é", "\U0001f600", "\u202e", "\ufeff"])
#: Strings: mostly plain text, sometimes the toy corpus's words, sometimes nasty characters.
STRINGS = st.one_of(
    st.text(max_size=12),
    st.text(st.one_of(_NASTY, st.characters(codec="ascii")), max_size=12),
    st.sampled_from(["open the file", "click the button", "Datei öffnen", "", "   "]),
)
NUMBERS = st.one_of(
    st.integers(-3, 20),
    st.integers(),
    st.sampled_from([10**30, -(10**30), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1.0, 1e308, -0.0, 1e-320]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(STRINGS, inner, max_size=4)),
    max_leaves=8,
)


def _mostly(
    good: st.SearchStrategy[Any], other: st.SearchStrategy[Any], tenths: int = 8
) -> st.SearchStrategy[Any]:
    """``good`` in about ``tenths`` of ten draws, else ``other``."""
    return st.integers(0, 9).flatmap(lambda i: good if i < tenths else other)


def _field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: mostly a plausible one, else any JSON value."""
    return _mostly(good, JSON, 9)


def _with_extra(shaped: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """``shaped`` with an unknown field added."""
    return st.tuples(shaped, STRINGS, JSON).map(lambda t: {**t[0], t[1]: t[2]})


#: Sentences: mostly the toy corpus's words, else any string.
SENTENCES = _mostly(
    st.lists(st.sampled_from(["open", "the", "file", "click", "Datei", "öffnen", "button"]), min_size=1).map(
        " ".join
    ),
    STRINGS,
    7,
)
TRANSLATE = st.fixed_dictionaries(
    {"sentences": _field(st.lists(SENTENCES, min_size=1, max_size=3))},
    optional={  # mostly within the limits, sometimes just outside
        "k": _field(_mostly(st.integers(1, 16), st.integers(-1, 20))),
        "lambda": _field(_mostly(st.floats(0, 1), st.floats(-0.5, 1.5))),
        "temperature": _field(_mostly(st.floats(0.1, 100), st.floats(-1, 1))),
        "beam": _field(_mostly(st.integers(1, 2), st.integers(-1, 3))),
        "max_new_tokens": _field(_mostly(st.integers(1, 6), st.integers(-1, 10))),
        "knn": _field(st.booleans()),
        "neighbours": _field(st.booleans()),
    },
)
PAIR = st.fixed_dictionaries({"source": _field(SENTENCES), "target": _field(SENTENCES)})
MEMORY = st.fixed_dictionaries({"pairs": _field(st.lists(PAIR, min_size=1, max_size=3))})


def bodies(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Request bodies: ``shaped`` or any JSON value, serialised (NaN/Infinity allowed; surrogates
    escaped, or raw as invalid UTF-8), or arbitrary bytes."""
    value = _mostly(shaped, st.one_of(_with_extra(shaped), JSON))
    escaped = value.map(lambda v: json.dumps(v, allow_nan=True).encode())
    raw = value.map(
        lambda v: json.dumps(v, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    )
    return _mostly(escaped, st.one_of(raw, st.binary(max_size=40)))


_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0, max_codepoint=255, exclude_characters="\r\n"), max_size=20
)
#: What a well-behaved client sends; HEADERS replaces or drops some of it, or adds odd ones.
GOOD_HEADERS = {"Host": HOST, "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "Authorization": st.one_of(
            st.just(f"Bearer {TOKEN}"),
            st.just(f"bearer  {TOKEN} "),
            st.just("Bearer"),
            _HEADER_TEXT.map(lambda t: "Bearer " + t),
            _HEADER_TEXT,
        ),
        "Idempotency-Key": st.one_of(_HEADER_TEXT, st.just(""), st.just("  "), st.text("k", max_size=300)),
        "Content-Type": st.one_of(
            st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
            _HEADER_TEXT,
        ),
        "Host": st.one_of(
            st.just(HOST), st.sampled_from(["127.0.0.1:8000", "evil.example", "[::1]"]), _HEADER_TEXT
        ),
        "Content-Length": st.sampled_from(["0", "99999999999999999999", "-1", "x"]),
    },
)
HEADERS = _mostly(
    st.just(GOOD_HEADERS),
    st.one_of(
        st.builds(lambda changes: {**GOOD_HEADERS, **changes}, _CHANGES),
        st.builds(
            lambda drop: {k: v for k, v in GOOD_HEADERS.items() if k != drop},
            st.sampled_from(list(GOOD_HEADERS)),
        ),
        _CHANGES,
    ),
    6,
).map(lambda h: {k: v.encode("latin-1") for k, v in h.items()})
IDS = st.one_of(
    st.integers(-3, 420).map(str),
    st.integers().map(str),
    st.sampled_from(["1e3", "0x10", "", " 1", "1.0", "٣", "99999999999999999999999999"]),
    STRINGS.map(lambda s: urllib.parse.quote(s.encode("utf-8", "surrogatepass"), safe="")),
)


# ---- the service and what is on its disk -------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    marian: tuple[Any, Any], datastore: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """``(client, service)``: the toy service with small limits over a private copy of the datastore."""
    path = tmp_path_factory.mktemp("properties") / "ds"
    shutil.copytree(datastore.path, path)
    config = ServeConfig(
        token=TOKEN,
        private_reads=True,
        allowed_hosts=(HOST,),
        max_sentences=3,
        max_chars=60,
        max_body_bytes=4000,
        max_new_tokens=6,
        max_beam=2,
        max_k=16,
        compact_every=0,
        merge_fanout=0,  # the stored bytes must only ever grow here; merges have their own tests
        batch=BatchConfig(max_batch=8, max_wait_ms=1),
    )
    service = Service.open(marian, path, config, index=None)
    with TestClient(create_app(service, close_on_shutdown=False), raise_server_exceptions=False) as client:
        yield client, service
    service.close(compact=False)


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file of the datastore (the lock file aside)."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != LOCK_FILE
    }


def check_response(response: Any) -> None:
    """Never a 5xx or a traceback; an error is JSON with a ``detail`` string."""
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    if response.status_code >= 400:
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail, response.text


def check_disk(before: dict[str, str], after: dict[str, str], ok: bool) -> None:
    """A refused request changed nothing; an accepted one changed only the manifest and tombstones and
    added files (existing shards are never rewritten)."""
    if not ok:
        assert after == before
        return
    for name, digest in before.items():
        if name not in ("manifest.json", "memory/tombstones.json"):
            assert after.get(name) == digest, name


def send(served: Any, method: str, url: str, body: bytes | None, headers: dict[str, bytes]) -> None:
    client, service = served
    path = service.memory.store.path
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    before = snapshot(path)
    response = client.request(method, url, content=body, headers=headers)
    event(f"{method} {response.status_code}")
    check_response(response)
    check_disk(before, snapshot(path), 200 <= response.status_code < 300)
    now = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    assert now["shards"][: len(manifest["shards"])] == manifest["shards"]  # only ever appended to


# ---- the properties ---------------------------------------------------------------------------------


@SETTINGS
@given(body=bodies(TRANSLATE), headers=HEADERS)
def test_translate_never_fails_with_500(served, body: bytes, headers: dict[str, bytes]) -> None:
    send(served, "POST", "/translate", body, headers)


@SETTINGS
@given(body=bodies(MEMORY), headers=HEADERS)
def test_memory_writes_never_fail_with_500_nor_change_what_is_stored(
    served, body: bytes, headers: dict[str, bytes]
) -> None:
    send(served, "POST", "/memory", body, headers)


@SETTINGS
@given(method=st.sampled_from(["GET", "DELETE"]), sentence_id=IDS, headers=HEADERS)
def test_memory_reads_and_deletes_never_fail_with_500(
    served, method: str, sentence_id: str, headers: dict[str, bytes]
) -> None:
    send(served, method, f"/memory/{sentence_id}", None, headers)


def test_stored_pairs_read_back_unchanged(served, datastore) -> None:
    """After all the random traffic, every pair of the original datastore reads back as it was built."""
    client, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for sentence_id in range(0, int(datastore.manifest["sentences"]), 37):
        record = client.get(f"/memory/{sentence_id}", headers=auth).json()
        built = datastore.sentence(sentence_id)
        assert (record["src"], record["tgt"]) == (built["src"], built["tgt"])
