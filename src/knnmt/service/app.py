"""The HTTP service: :class:`Service` (translator + live memory + batching + metrics) and the FastAPI
app over it (:func:`create_app`).

Endpoints: ``POST /translate``, ``POST /memory``, ``GET``/``DELETE /memory/{id}``, ``GET /health``,
``GET /info``, ``GET /metrics`` (Prometheus), ``GET /`` (the web page), ``/docs`` and
``/openapi.json``. Writes need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..config import KNNConfig, _check
from ..datastore import Datastore
from ..errors import UsageError
from ..translator import KNN_CONFIG_FILE, KNNMT, Translation, load_model
from .batching import BatchConfig, BatchWorker, GenerationOptions, Overloaded
from .memory import AddResult, ConflictError, LiveMemory, load_main_index
from .metrics import Metrics

logger = logging.getLogger(__name__)

TOKEN_ENV = "KNNMT_SERVE_TOKEN"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of a served translator: safety limits, batching and memory.

    ``token`` guards the writes (``POST``/``DELETE /memory``); with ``writes`` on it is required.
    """

    token: str | None = dataclasses.field(default=None, repr=False)
    writes: bool = True
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
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        _check(
            not self.writes or bool(self.token),
            f"writes to the memory are enabled but no token is set: set {TOKEN_ENV} or pass --token-file "
            "(clients then send 'Authorization: Bearer <token>'), or serve with --read-only",
        )
        _check(self.token is None or len(self.token) >= 8, "the token must have at least 8 characters")
        for name in ("max_body_bytes", "max_sentences", "max_chars", "max_new_tokens", "max_beam", "max_k"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _check(self.compact_every >= 0, f"compact_every must be >= 0, got {self.compact_every}")


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
            writable=config.writes,
        )
        if knn_config is None:
            saved = store.path / KNN_CONFIG_FILE
            knn_config = KNNConfig.load(saved) if saved.is_file() else KNNConfig()
        try:
            translator = KNNMT(
                model_obj, tokenizer, store, index=main, config=knn_config, retriever=memory.retriever
            )
            if knn_config.domain_gate is not None:
                # loaded now, so that a missing index fails at start; it gates on the memory as indexed
                # (pairs added while serving are searched, but do not count as similar sources)
                translator.domain_gate  # noqa: B018
        except BaseException:
            memory.close()
            raise
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
        """Runs on the model thread: add to the memory, then point the translator at the new datastore."""
        result = self.memory.add(pairs, key)
        self.translator.datastore = self.memory.store
        return result


# ---- request/response models ----------------------------------------------------------------


class TranslateRequest(BaseModel):
    """A batch of sentences and optional kNN-MT settings (defaults: the datastore's)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    sentences: list[str] = Field(description="source sentences")
    k: int | None = Field(None, ge=1, description="neighbours per step")
    lambda_: float | None = Field(None, alias="lambda", ge=0.0, le=1.0, description="weight of p_kNN")
    temperature: float | None = Field(None, gt=0.0, description="softmax temperature of p_kNN")
    beam: int = Field(1, ge=1, description="beam size (1 = greedy)")
    max_new_tokens: int | None = Field(None, ge=1, description="longest translation in tokens")
    knn: bool = Field(True, description="false: the plain model without retrieval")
    neighbours: bool = Field(False, description="explain every target token: p_MT, p_kNN, neighbours")


class MemoryPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    target: str


class MemoryRequest(BaseModel):
    """Parallel pairs to add to the translation memory."""

    model_config = ConfigDict(extra="forbid")
    pairs: list[MemoryPair]


# ---- the app ---------------------------------------------------------------------------------


def _route(path: str) -> str:
    """The route template of a path, for metrics labels (bounded cardinality)."""
    if path.startswith("/memory/"):
        return "/memory/{id}"
    known = {"/", "/translate", "/memory", "/health", "/info", "/metrics", "/docs", "/openapi.json"}
    return path if path in known else "other"


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
    return resources.files("knnmt.service").joinpath("static/index.html").read_text(encoding="utf-8")


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
    )
    app.add_middleware(_Guard, service=service)

    def require_writer(authorization: str | None = Header(None)) -> None:
        if not config.writes:
            raise HTTPException(403, "this server is read-only (started with --read-only)")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(
                401, "writes need 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
            )
        assert config.token is not None
        if not hmac.compare_digest(given.strip().encode(), config.token.encode()):
            raise HTTPException(401, "wrong token", headers={"WWW-Authenticate": "Bearer"})

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
    def info() -> dict[str, Any]:
        """Model, datastore, default kNN settings and the limits a client must respect."""
        store = service.memory.store
        knn = service.translator.config
        return {
            "version": __version__,
            "model": store.manifest["model"]["name"],
            "datastore": str(store.path),
            "entries": store.count,
            "sentences": int(store.manifest["sentences"]),
            "index": service.memory.retriever.state.main.factory,
            "knn": _knn_settings(knn),
            "writes": config.writes,
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
    async def translate(request: TranslateRequest) -> dict[str, Any]:
        """Translate a batch; with ``neighbours`` each token carries p_MT, p_kNN and its neighbours."""
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
        results = await wait(future)
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
        return {"ids": result.ids, "entries": result.entries, "replayed": result.replayed}

    @app.get("/memory/{sentence_id}")
    def get_memory(sentence_id: int) -> dict[str, Any]:
        """A stored pair (any sentence of the datastore) and whether it is removed from retrieval."""
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


def run_server(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``service`` with uvicorn until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the service is reachable from other machines", host)
    app = create_app(service)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
