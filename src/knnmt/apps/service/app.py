"""The HTTP service: :class:`Service` (translator + live memory + batching + metrics) and the FastAPI
app over it (:func:`create_app`).

Endpoints: ``POST /translate``, ``POST /memory``, ``GET``/``DELETE /memory/{id}``, ``GET /health``,
``GET /info``, ``GET /metrics`` (Prometheus), ``GET /`` (the web page) and ``/openapi.json`` (no
``/docs``: Swagger UI would load its scripts from a CDN). Writes need ``Authorization: Bearer <token>``;
with :attr:`ServeConfig.private_reads` so do reads of stored text.

Bad input never reaches the model: every field is checked strictly (types, finite numbers, text that
is valid Unicode) and refused with a 4xx whose JSON ``detail`` names the field; requests whose ``Host``
is not a name the server is bound to are refused (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...core.config import KNNConfig, require
from ...core.errors import KnnmtError, UsageError
from ...core.version import __version__
from ...pipeline.memory import AddResult, ConflictError, LiveMemory, load_main_index
from ...pipeline.translator import KNNMT, Translation, load_model, saved_knn_config
from ...store.datastore import Datastore
from .batching import BatchConfig, BatchWorker, GenerationOptions, Overloaded
from .metrics import Metrics

logger = logging.getLogger(__name__)

TOKEN_ENV = "KNNMT_SERVE_TOKEN"
#: Names that reach a loopback-bound server (the Host check accepts them all for a loopback bind).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: Bind addresses that listen on every interface: the Host check is off unless names are given.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of a served translator: safety limits, batching and memory.

    ``token`` guards the writes (``POST``/``DELETE /memory``); with ``writes`` on it is required.
    ``private_reads`` makes it guard the reads of stored text too: ``GET /memory/{id}``, the neighbour
    explanations of ``/translate`` (``"neighbours": true``) and the datastore path in ``/info``.

    ``host`` is the address the server is bound to; requests must name it (or, for a loopback bind,
    any of :data:`LOOPBACK_NAMES`) or one of ``allowed_hosts`` in their ``Host`` header, else 400: a
    web page on another site cannot reach a loopback server through a DNS name it controls. For a
    wildcard bind (``0.0.0.0``, ``::``) the check is off unless ``allowed_hosts`` is given;
    ``allowed_hosts=("*",)`` turns it off.
    """

    token: str | None = dataclasses.field(default=None, repr=False)
    writes: bool = True
    private_reads: bool = False
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    #: Largest request body accepted (413 beyond).
    max_body_bytes: int = 1_000_000
    #: Sentences per ``/translate`` request and pairs per ``/memory`` request (413 beyond).
    max_sentences: int = 64
    #: Characters per sentence (422 beyond).
    max_chars: int = 1000
    max_new_tokens: int = 256
    max_beam: int = 8
    max_k: int = 256
    #: Side-index entries that start a background compaction into the main index (0 = never).
    compact_every: int = 4096
    #: Appended shards merged at once in the background (``knnmt.store.merge``; 0 = never).
    merge_fanout: int = 8
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        require(
            not self.writes or bool(self.token),
            f"writes to the memory are enabled but no token is set: set {TOKEN_ENV} or pass --token-file "
            "(clients then send 'Authorization: Bearer <token>'), or serve with --read-only",
        )
        require(
            not self.private_reads or bool(self.token),
            f"--private-reads needs a token: set {TOKEN_ENV} or pass --token-file",
        )
        require(
            all(isinstance(h, str) and h.strip() for h in self.allowed_hosts),
            f"allowed host names must be non-empty, got {list(self.allowed_hosts)}",
        )
        require(self.token is None or len(self.token) >= 8, "the token must have at least 8 characters")
        for name in ("max_body_bytes", "max_sentences", "max_chars", "max_new_tokens", "max_beam", "max_k"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        require(self.compact_every >= 0, f"compact_every must be >= 0, got {self.compact_every}")
        require(
            self.merge_fanout == 0 or self.merge_fanout >= 2,
            f"merge_fanout must be 0 (never) or >= 2, got {self.merge_fanout}",
        )


def read_token(token_file: str | Path | None, environ: MutableMapping[str, str]) -> str | None:
    """The bearer token from ``token_file`` (first line) or the environment variable ``KNNMT_SERVE_TOKEN``."""
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise UsageError(f"token file {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise UsageError(f"token file {path} is empty")
        return token
    return environ.get(TOKEN_ENV) or None


class Service:
    """Translator, live memory, batching worker and metrics of one served datastore."""

    def __init__(self, translator: KNNMT, memory: LiveMemory, config: ServeConfig) -> None:
        self.translator = translator
        self.memory = memory
        self.config = config
        self.metrics = Metrics(
            {
                "knnmt_datastore_entries": ("Entries in the datastore.", lambda: self.memory.store.count),
                "knnmt_datastore_sentences": (
                    "Sentence pairs in the datastore.",
                    lambda: int(self.memory.store.manifest["sentences"]),
                ),
                "knnmt_memory_side_entries": (
                    "Entries in the side index, not yet compacted.",
                    lambda: self.memory.side_entries,
                ),
                "knnmt_memory_removed_sentences": (
                    "Sentences removed from retrieval.",
                    lambda: self.memory.removed_sentences,
                ),
                "knnmt_memory_compactions": ("Compactions done.", lambda: self.memory.compactions),
                "knnmt_queue_jobs": ("Jobs waiting for the model thread.", lambda: self.worker.queued),
            }
        )
        self.worker = BatchWorker(translator, config.batch, self.metrics.observe_batch)

    @classmethod
    def open(
        cls,
        model: str | tuple[Any, Any],
        datastore: str | Path,
        config: ServeConfig,
        *,
        index: str | Path | None = "auto",
        knn_config: KNNConfig | None = None,
        device: str | None = None,
    ) -> Service:
        """Load the model, open the datastore, its (possibly prefix) index and live memory."""
        model_obj, tokenizer = load_model(model, device) if isinstance(model, str) else model
        store = Datastore.open(datastore)
        main, covered, index_dir = load_main_index(store, index)
        memory = LiveMemory(
            store,
            main,
            covered,
            index_dir,
            model_obj,
            tokenizer,
            compact_every=config.compact_every,
            merge_fanout=config.merge_fanout,
            writable=config.writes,
        )
        if knn_config is None:
            knn_config = saved_knn_config(store)
        try:
            translator = KNNMT(
                model_obj, tokenizer, store, index=main, config=knn_config, retriever=memory.retriever
            )
            if knn_config.domain_gate is not None:
                # loaded now, so that a missing index fails at start; pairs added while serving join it
                # (add_pairs), on datastores that keep sentence vectors
                translator.domain_gate  # noqa: B018
        except BaseException:
            memory.close()
            raise
        memory.on_publish.append(lambda store: setattr(translator, "datastore", store))  # appends, merges
        return cls(translator, memory, config)

    def close(self, compact: bool = True) -> None:
        """Finish queued work, fold the side index into the saved index (``compact``), release the lock.

        After a clean close the datastore's saved index covers every entry again, so ``knnmt translate``
        loads it; after a crash the next server start (or ``knnmt index --force``) takes care of that.
        """
        self.worker.close()
        if compact and self.config.writes and self.memory.index_dir is not None:
            self.memory.compact(wait=True)
        self.memory.close()

    def add_pairs(self, pairs: list[tuple[str, str]], key: str | None) -> AddResult:
        """Runs on the model thread: add to the memory, then point the translator at the new datastore and
        let the domain gate (when loaded) count the new sources as memory at once."""
        result = self.memory.add(pairs, key)  # the translator follows the memory (on_publish)
        gate = self.translator.loaded_domain_gate
        if gate is not None and result.vectors is not None:
            gate.add(result.vectors)
        return result


# ---- request/response models ----------------------------------------------------------------


def _unicode_text(value: str) -> str:
    """``value`` if it can be encoded as UTF-8: JSON's ``"\\udcff"`` escapes give lone surrogates, which
    the tokenizer and the datastore's files cannot take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unicode",
            "text must be valid Unicode: a lone surrogate (an unpaired \\ud800-\\udfff escape) is at "
            "character {position}",
            {"position": exc.start},
        ) from None
    return value


#: A JSON string that is valid Unicode (strict: no numbers or booleans taken as text).
Text = Annotated[str, AfterValidator(_unicode_text)]

#: Every request model: unknown fields refused, no type coercion (``true`` is not 1, ``"8"`` is not 8;
#: an integer is a valid float), no NaN or infinity.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TranslateRequest(BaseModel):
    """A batch of sentences and optional kNN-MT settings (defaults: the datastore's)."""

    model_config = ConfigDict(**_STRICT, populate_by_name=True)

    sentences: list[Text] = Field(description="source sentences")
    k: int | None = Field(None, ge=1, description="neighbours per step")
    lambda_: float | None = Field(None, alias="lambda", ge=0.0, le=1.0, description="weight of p_kNN")
    temperature: float | None = Field(None, gt=0.0, description="softmax temperature of p_kNN")
    beam: int = Field(1, ge=1, description="beam size (1 = greedy)")
    max_new_tokens: int | None = Field(None, ge=1, description="longest translation in tokens")
    knn: bool = Field(True, description="false: the plain model without retrieval")
    neighbours: bool = Field(False, description="explain every target token: p_MT, p_kNN, neighbours")


class MemoryPair(BaseModel):
    """One parallel pair."""

    model_config = _STRICT
    source: Text
    target: Text


class MemoryRequest(BaseModel):
    """Parallel pairs to add to the translation memory."""

    model_config = _STRICT
    pairs: list[MemoryPair]


# ---- the app ---------------------------------------------------------------------------------


def _route(path: str) -> str:
    """The route template of a path, for metrics labels (bounded cardinality)."""
    if path.startswith("/memory/"):
        return "/memory/{id}"
    known = {"/", "/translate", "/memory", "/health", "/info", "/metrics", "/openapi.json"}
    return path if path in known else "other"


def _public_name(name: str) -> str:
    """What ``/info`` shows of a model or datastore: a Hub id as it is, a local path by its last part
    only (the server's directory layout is not the clients' business)."""
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


class _Guard:
    """ASGI middleware: refuse bodies over the limit (413) and record every request in the metrics."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def record_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            limit = self.service.config.max_body_bytes
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length")
            too_big = declared is not None and declared.isdigit() and int(declared) > limit
            replay = receive
            if not too_big and declared is None and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                chunks: list[bytes] = []  # no Content-Length (chunked): read up to the limit first
                size = 0
                more = True
                while more and size <= limit:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    more = message.get("more_body", False)
                too_big = size > limit
                body = b"".join(chunks)
                sent = [False]

                async def replay_body() -> dict[str, Any]:
                    if not sent[0]:
                        sent[0] = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                replay = replay_body
            if too_big:
                detail = json.dumps(
                    {"detail": f"request body is larger than the limit of {limit} bytes"}
                ).encode()
                await record_status(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": detail})
                return
            await self.app(scope, replay, record_status)
        finally:
            self.service.metrics.observe_request(
                scope["method"], _route(scope["path"]), status[0], time.perf_counter() - start
            )


def _host_name(value: str) -> str | None:
    """The host name of a ``Host`` header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``), lower-case;
    ``None`` if it is not of that form."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    return name.lower() if name else None


def allowed_host_names(host: str, extra: Sequence[str] = ()) -> frozenset[str] | None:
    """The ``Host`` names a server bound to ``host`` answers (``None``: any); see :class:`ServeConfig`."""
    names = {h.strip().strip("[]").lower() for h in extra}
    if "*" in names:
        return None
    bound = host.strip("[]").lower()
    if bound in WILDCARD_HOSTS:
        return frozenset(names | set(LOOPBACK_NAMES)) if names else None
    names.add(bound)
    if bound in LOOPBACK_NAMES or bound.startswith("127."):
        names.update(LOOPBACK_NAMES)
    return frozenset(names)


class _HostCheck:
    """ASGI middleware: refuse (400) requests whose ``Host`` header names another host than ours."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"host", b"")
        name = _host_name(raw.decode("latin-1").strip())
        if name in self.allowed:
            await self.app(scope, receive, send)
            return
        shown = _safe(raw.decode("latin-1"), 100)
        detail = (
            f"Host {shown!r} is not served here (allowed: {', '.join(sorted(self.allowed))}); "
            "behind a proxy or under another name, start the server with --allowed-host NAME"
        )
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)


def _safe(text: str, limit: int = 300) -> str:
    """``text`` made encodable (lone surrogates as ``\\udcff``) and cut to ``limit`` characters, for
    error messages that quote what a client sent."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


def _sanitize(value: Any) -> Any:
    """A JSON-able copy of an error ``detail`` with every string made encodable."""
    if isinstance(value, str):
        return _safe(value, 2000)
    if isinstance(value, dict):
        return {_safe(str(k), 200): _sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v) for v in value]
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return _safe(str(value), 200)


_JSON_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}


def _kind(value: Any) -> str:
    """The JSON type of a request value, for messages ("got a boolean")."""
    if value is None:
        return "null"
    return next((name for t, name in _JSON_KINDS.items() if type(value) is t), "an object")


def _where(loc: Sequence[Any]) -> str:
    """Where a validation error is: ``pairs[0].source``, ``header idempotency-key``, ``path sentence_id``."""
    kind, *rest = [*loc] or ["body"]
    path = ""
    for part in rest:
        part = part if part != "" else '""'  # an empty field name
        path += (
            f"[{part}]"
            if isinstance(part, int)
            else (f".{_safe(str(part), 60)}" if path else _safe(str(part), 60))
        )
    if kind == "body":
        return path or "body"
    return f"{kind} {path}".strip()


def _validation_detail(errors: Sequence[Any]) -> str:
    """One message for a request's validation errors: each names its field (first 5)."""
    parts = []
    for error in errors[:5]:
        kind, msg, loc = error.get("type", ""), str(error.get("msg", "invalid")), error.get("loc", ())
        if kind == "json_invalid":
            at = loc[1] if len(loc) > 1 else "?"
            reason = (error.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON (at character {at}: {_safe(str(reason), 100)})")
            continue
        if kind == "missing" and [*loc] == ["body"]:
            parts.append("the request needs a JSON body")
            continue
        if kind == "string_unicode":  # a lone surrogate where pydantic needs a str (e.g. a field name)
            where = "the body" if [*loc] == ["body"] else _where(loc)
            parts.append(f"{where} holds text that is not valid Unicode (a lone surrogate such as \\udcff)")
            continue
        if kind == "float_type" and type(error.get("input")) is int:
            msg += " (got an integer too large for a float)"
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            msg += f" (got {_kind(error.get('input'))})"
        parts.append(f"{_where(loc)}: {_safe(msg, 300)}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts)


def _knn_settings(knn: KNNConfig) -> dict[str, Any]:
    """The kNN settings a response reports (``/info`` and ``/translate``), in the API's field names."""
    return {
        "k": knn.k,
        "lambda": knn.lambda_,
        "temperature": knn.temperature,
        "half_distance": knn.half_distance,
        "confidence_gate": knn.confidence_gate,
        "domain_gate": knn.domain_gate,
    }


def _explanation(service: Service, translation: Translation) -> list[dict[str, Any]] | None:
    if translation.explanation is None:
        return None
    out = []
    for token in translation.explanation:
        item = dataclasses.asdict(token)
        for n in item["neighbours"]:
            n["memory"] = service.memory.is_memory(n["sentence_id"])
        out.append(item)
    return out


def _static_page() -> str:
    return resources.files("knnmt.apps.service").joinpath("static/index.html").read_text(encoding="utf-8")


#: How a client recovers from a failed ``POST /memory``.
RETRY = "; retrying with the same Idempotency-Key adds the pairs at most once"


def create_app(service: Service, close_on_shutdown: bool = True) -> FastAPI:
    """The FastAPI application over ``service`` (its OpenAPI schema is at ``/openapi.json``)."""
    config = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_on_shutdown:
            service.close()

    app = FastAPI(
        title="knnmt",
        version=__version__,
        description="kNN-MT translation with a live translation memory.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN: broken offline, so none
        redoc_url=None,
    )
    allowed = allowed_host_names(config.host, config.allowed_hosts)
    if allowed is not None:
        app.add_middleware(_HostCheck, allowed=allowed)
    app.add_middleware(_Guard, service=service)  # outermost: it also counts the refused requests

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": _sanitize(list(e.get("loc", ()))),
                "msg": _safe(str(e.get("msg", "")), 300),
                "type": e.get("type"),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": _validation_detail(exc.errors()), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": _sanitize(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # uvicorn logs the traceback; the client gets a message, never the traceback
        detail = f"internal error ({type(exc).__name__}) while serving {request.url.path}; see the server log"
        return JSONResponse({"detail": _safe(detail)}, status_code=500)

    def bearer_ok(authorization: str | None) -> bool:
        """Whether ``authorization`` is ``Bearer <the token>``."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip() or config.token is None:
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "backslashreplace"), config.token.encode())

    def check_token(authorization: str | None, what: str) -> None:
        """401 unless ``authorization`` carries the token; ``what`` needs it (for the message)."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401, f"{what} 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
            )
        if not bearer_ok(authorization):
            raise HTTPException(401, "wrong token", headers={"WWW-Authenticate": "Bearer"})

    def require_writer(authorization: str | None = Header(None)) -> None:
        if not config.writes:
            raise HTTPException(403, "this server is read-only (started with --read-only)")
        check_token(authorization, "writes need")

    def require_reader(authorization: str | None = Header(None)) -> None:
        if config.private_reads:
            check_token(authorization, "this server has --private-reads: reading the memory needs")

    def check_sentences(texts: list[str], what: str) -> None:
        if not texts:
            raise HTTPException(422, f"no {what} given")
        if len(texts) > config.max_sentences:
            raise HTTPException(
                413, f"{len(texts)} {what} in one request; the limit is {config.max_sentences}"
            )
        for i, text in enumerate(texts):
            if len(text) > config.max_chars:
                raise HTTPException(
                    422, f"{what} {i} has {len(text)} characters; the limit is {config.max_chars}"
                )
            if not text.strip():
                raise HTTPException(422, f"{what} {i} is empty")

    async def wait(future: Any) -> Any:
        return await asyncio.wrap_future(future)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_static_page())

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and the datastore's size."""
        return {"status": "ok", "entries": service.memory.store.count, "queued": service.worker.queued}

    @app.get("/info")
    def info(authorization: str | None = Header(None)) -> dict[str, Any]:
        """Model, datastore, default kNN settings and the limits a client must respect (with
        ``--private-reads``, ``datastore`` is the path only for clients that send the token)."""
        store = service.memory.store
        knn = service.translator.config
        private = config.private_reads and not bearer_ok(authorization)
        return {
            "version": __version__,
            "model": _public_name(store.manifest["model"]["name"]),
            "datastore": None if private else _public_name(str(store.path)),
            "entries": store.count,
            "sentences": int(store.manifest["sentences"]),
            "index": service.memory.retriever.state.main.factory,
            "knn": _knn_settings(knn),
            "writes": config.writes,
            "private_reads": config.private_reads,
            "limits": {
                "max_sentences": config.max_sentences,
                "max_chars": config.max_chars,
                "max_body_bytes": config.max_body_bytes,
                "max_new_tokens": config.max_new_tokens,
                "max_beam": config.max_beam,
                "max_k": config.max_k,
            },
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/translate")
    async def translate(
        request: TranslateRequest, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        """Translate a batch; with ``neighbours`` each token carries p_MT, p_kNN and its neighbours
        (their stored pairs: with ``--private-reads`` that needs the token)."""
        if request.neighbours and config.private_reads:
            check_token(
                authorization, "this server has --private-reads: neighbours (they quote stored pairs) need"
            )
        check_sentences(request.sentences, "sentences")
        if request.beam > config.max_beam:
            raise HTTPException(422, f"beam {request.beam} is above the limit {config.max_beam}")
        if request.k is not None and request.k > config.max_k:
            raise HTTPException(422, f"k {request.k} is above the limit {config.max_k}")
        max_new = request.max_new_tokens or config.max_new_tokens
        if max_new > config.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens {max_new} is above the limit {config.max_new_tokens}")
        base = service.translator.config
        try:
            knn = dataclasses.replace(  # other settings of the datastore's config are kept
                base,
                k=request.k if request.k is not None else base.k,
                lambda_=request.lambda_ if request.lambda_ is not None else base.lambda_,
                temperature=request.temperature if request.temperature is not None else base.temperature,
            )
        except UsageError as exc:
            raise HTTPException(422, str(exc)) from None
        options = GenerationOptions(knn if request.knn else None, request.beam, max_new)
        start = time.perf_counter()
        try:
            future = service.worker.translate(request.sentences, options, explain=request.neighbours)
        except Overloaded as exc:
            raise HTTPException(503, str(exc)) from None
        try:
            results = await wait(future)
        except KnnmtError as exc:
            raise HTTPException(422, f"cannot translate this request: {exc}") from None
        except Exception as exc:  # logged with its traceback by the worker; this request fails alone
            raise HTTPException(
                500,
                f"translating this request failed ({type(exc).__name__}: {exc}); other requests are "
                "not affected, the server log has the details",
            ) from None
        return {
            "translations": [
                {
                    "source": r.source,
                    "text": r.text,
                    "token_ids": r.token_ids,
                    "explanation": _explanation(service, r),
                }
                for r in results
            ],
            "config": {
                "knn": request.knn,
                **_knn_settings(knn),
                "beam": request.beam,
                "max_new_tokens": max_new,
            },
            "seconds": round(time.perf_counter() - start, 4),
        }

    @app.post("/memory", status_code=201, dependencies=[Depends(require_writer)])
    async def add_memory(
        request: MemoryRequest,
        idempotency_key: str | None = Header(None, max_length=200),
    ) -> dict[str, Any]:
        """Add parallel pairs; durable and searchable when this returns. ``Idempotency-Key`` makes a
        retried request add nothing twice."""
        if idempotency_key is not None and not idempotency_key.strip():
            raise HTTPException(
                422,
                "the Idempotency-Key header is empty: send a non-empty key (up to 200 characters) or none",
            )
        check_sentences([p.source for p in request.pairs], "pair sources")
        check_sentences([p.target for p in request.pairs], "pair targets")
        pairs = [(p.source, p.target) for p in request.pairs]
        try:
            result: AddResult = await wait(
                service.worker.call(lambda: service.add_pairs(pairs, idempotency_key))
            )
        except Overloaded as exc:
            raise HTTPException(503, str(exc)) from None
        except ConflictError as exc:
            raise HTTPException(409, str(exc)) from None
        except UsageError as exc:
            raise HTTPException(422, str(exc)) from None
        except KnnmtError as exc:
            raise HTTPException(500, f"adding the pairs failed: {exc}{RETRY}") from None
        except Exception as exc:
            logger.error("adding %d pair(s) failed", len(pairs), exc_info=exc)
            raise HTTPException(
                500, f"adding the pairs failed ({type(exc).__name__}: {exc}){RETRY}"
            ) from None
        return {"ids": result.ids, "entries": result.entries, "replayed": result.replayed}

    @app.get("/memory/{sentence_id}", dependencies=[Depends(require_reader)])
    def get_memory(sentence_id: int) -> dict[str, Any]:
        """A stored pair (any sentence of the datastore) and whether it is removed from retrieval (with
        ``--private-reads`` only for clients that send the token)."""
        try:
            return service.memory.get(sentence_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None

    @app.delete("/memory/{sentence_id}", dependencies=[Depends(require_writer)])
    def delete_memory(sentence_id: int) -> dict[str, Any]:
        """Remove a pair's entries from retrieval (durably; the shard data stays on disk)."""
        try:
            entries = service.memory.delete(sentence_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return {"id": sentence_id, "removed": True, "entries": entries}

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening), or a :class:`KnnmtError` saying why not:
    the port is in use, needs privileges, or the address is not this machine's."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise KnnmtError(f"port {port} on {host} is already in use; choose another with --port") from None
        if exc.errno == errno.EACCES:
            raise KnnmtError(
                f"no permission to listen on port {port} on {host} (ports below 1024 need privileges); "
                "choose another with --port"
            ) from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise KnnmtError(
                f"cannot listen on {host}: not an address of this machine ({exc.strerror}); check --host"
            ) from None
        raise KnnmtError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port"
        ) from None
    return sock


def run_server(
    service: Service,
    host: str | None = None,
    port: int = 8000,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Serve ``service`` with uvicorn until interrupted.

    Args:
        host: the address to bind (default: ``service.config.host``; the ``Host`` check follows it).
        sock: a socket from :func:`bind_socket` (then ``host`` and ``port`` only label the log); without
            one, ``host:port`` is bound here, and a port in use raises :class:`KnnmtError`.
    """
    import uvicorn

    if host is not None and host != service.config.host:
        service.config = dataclasses.replace(service.config, host=host)
    host = service.config.host
    if host not in LOOPBACK_NAMES:
        logger.warning("listening on %s: the service is reachable from other machines", host)
    if allowed_host_names(host, service.config.allowed_hosts) is None:
        logger.warning("requests for any Host name are answered (no --allowed-host given)")
    if sock is None:
        sock = bind_socket(host, port)
    app = create_app(service)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
