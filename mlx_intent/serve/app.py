"""The HTTP API of ``mlx-intent serve``: FastAPI routes, request limits, errors as JSON, Prometheus metrics.

Every request is answered with JSON (or server-sent events for the stream); bad input gets a 4xx whose
body is ``{"error": ..., "detail": ...}``.  Classification goes through the batcher's single worker
thread; a request that waits longer than the request timeout is answered by the tiers below the LLMs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_intent import feedback
from mlx_intent.chain import Chain, Reason
from mlx_intent.metrics import MB, is_absent
from mlx_intent.models import registry
from mlx_intent.normalize import MAX_TEXT_CHARS, text_problem
from mlx_intent.schema import MAX_INTENTS, Intent
from mlx_intent.serve.batcher import (
    STREAM,
    WARM,
    WARM_TEXT,
    Batcher,
    Closed,
    Job,
    QueueFull,
    fallback_chain,
    mode_chain,
)
from mlx_intent.settings import MAX_WAIT_MS, MODES, QUEUE_SIZE, Settings

log = logging.getLogger("mlx_intent.cli.serve")

MAX_BATCH_TEXTS = 64
MAX_BODY_BYTES = 64 * 1024
TIMEOUT_FACTOR = 4  # default request timeout: this many latency budgets (queueing and batching included)
RETRY_AFTER_S = 1
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
JSON_POSTS = ("/v1/classify", "/v1/classify/batch", "/v1/classify/stream", "/v1/feedback")
ENDPOINTS = (*JSON_POSTS, "/v1/models", "/healthz", "/metrics", "/openapi.json", "/docs")


# ---- bodies -------------------------------------------------------------------------------------


def _readable(text: str) -> str:
    """Reject what no tier can read, by the rule the CLI applies too (normalize.text_problem)."""
    if (problem := text_problem(text)) is not None:
        raise ValueError(problem)
    return text


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_readable)]
Mode = Literal[MODES]  # type: ignore[valid-type]
User = Annotated[str, AfterValidator(feedback.check_user)]
USER_HELP = "Whose thresholds apply (mlx-intent users set); an unknown user gets the defaults."


class ClassifyRequest(BaseModel):
    text: Text = Field(description=f"The traveller's query, 1 to {MAX_TEXT_CHARS} characters.")
    mode: Mode | None = Field(None, description="LLM decoding; default: the server's mode setting.")
    user: User | None = Field(None, description=USER_HELP)


class BatchRequest(BaseModel):
    texts: list[Text] = Field(min_length=1, max_length=MAX_BATCH_TEXTS, description="Queries, answered in order.")
    mode: Mode | None = None
    user: User | None = Field(None, description=USER_HELP + " For every text of the batch.")


class StreamRequest(BaseModel):
    text: Text


class Fallback(BaseModel):
    tier: str
    reason: str = Field(description="Why, in words.")
    kind: Reason = Field(description="Why, as one of a few values (the label of mlx_intent_fallbacks).")


def _number(value: Any) -> Any:
    """A JSON number: not a bool, not a string of digits (pydantic's float would take both)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("confidence must be a number")
    return value


Confidence = Annotated[float, BeforeValidator(_number), Field(ge=0, le=1, allow_inf_nan=False)]


class Answer(BaseModel):
    """The answer, by the rules of ``schema`` (``validate`` and ``JSON_SCHEMA``): the intents are the 15
    names, all_intents lists 1 to 3 distinct ones, the primary first."""

    model_config = ConfigDict(extra="forbid")

    primary_intent: Intent
    confidence: Confidence = Field(description="Calibrated probability that the primary intent is right.")
    all_intents: list[Intent] = Field(min_length=1, max_length=MAX_INTENTS, description="The primary first.")

    @model_validator(mode="after")
    def _primary_first(self) -> Answer:
        if len(set(self.all_intents)) != len(self.all_intents):
            raise ValueError("duplicate intents in all_intents")
        if self.all_intents[0] != self.primary_intent:
            raise ValueError("all_intents must start with primary_intent")
        return self


class ClassifyResult(Answer):
    model_config = ConfigDict(extra="ignore")  # a tier's other fields (top, truncated) are not shown

    id: str = Field(description="This answer's id, for POST /v1/feedback.")
    tier: str = Field(description="The tier that answered.")
    model: str | None = Field(description="Its model; null for the keyword and general tiers.")
    fallbacks: list[Fallback] = Field(
        description="Tiers above it and why they did not answer; kinds not_installed and too_large mean the tier "
        "is absent here (a configuration fact), the others that it was passed over at run time."
    )
    runtime_fallback: bool = Field(
        False, description="A tier was passed over at run time (not merely absent here): what the fallback rate counts."
    )
    latency_ms: float = Field(description="Time in the server for this request, queueing included.")
    latency_per_query_ms: float | None = Field(
        None, description="latency_ms over the request's texts: each text's share (equal for /v1/classify)."
    )
    cached: bool
    ambiguous: bool = Field(False, description="The answering tier's top two intents were within the margin.")
    lang: str | None = None


class FeedbackRequest(BaseModel):
    """A correction (the right primary_intent, optionally all_intents) or, with correct, a confirmation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="The id of the answer judged.")
    primary_intent: Intent | None = None
    all_intents: list[Intent] | None = Field(None, min_length=1, max_length=MAX_INTENTS)
    correct: bool = Field(False, description="The answer was right.")
    replace: bool = Field(False, description="Replace feedback already given for this id (else 409).")


class BatchResult(BaseModel):
    results: list[ClassifyResult]


class ModelInfo(BaseModel):
    name: str
    state: str = Field(description="missing, downloaded, converted or ready (loaded once at least).")
    loaded: bool = Field(description="In memory in this server now.")
    tier: int | None = Field(description="Its place in the chain, from 0; null when not in it.")


class ModelsResult(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    ready: bool
    status: str = Field(description="warming, ready, degraded or stopping.")
    primary: str | None = Field(description="The tier the server waited for (first LLM tier it could load).")
    detail: str | None = None


class ErrorBody(BaseModel):
    error: str
    detail: Any = None


ERRORS = {
    code: {"model": ErrorBody, "description": why}
    for code, why in {
        400: "Invalid JSON.",
        413: f"Body over {MAX_BODY_BYTES} bytes.",
        415: "Content type is not application/json.",
        422: "A field is missing or invalid.",
        503: "Queue full or shutting down; see Retry-After.",
    }.items()
}


FEEDBACK_ERRORS = {
    **ERRORS,
    404: {"model": ErrorBody, "description": "No such answer recorded here."},
    409: {"model": ErrorBody, "description": "Feedback given already for this id; send replace."},
}


def error(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


# ---- metrics ------------------------------------------------------------------------------------


class Prometheus:
    """The service's metrics in their own registry (several apps may live in one process)."""

    def __init__(self, batcher: Batcher, chain: Chain):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mlx_intent_http_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "mlx_intent_http_request_seconds", "HTTP request time", ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.intents = Counter("mlx_intent_intents", "Answers by primary intent", ["intent"], registry=r)
        self.tiers = Counter("mlx_intent_tiers", "Answers by the tier that gave them", ["tier"], registry=r)
        self.fallbacks = Counter(
            "mlx_intent_fallbacks",
            "Tiers passed over at run time, by reason kind (tiers absent here: mlx_intent_tier_absent)",
            ["tier", "reason"],
            registry=r,
        )
        self.fallback_answers = Counter(
            "mlx_intent_fallback_answers",
            "Answers a tier passed over at run time: the fallback rate is this over mlx_intent_tiers",
            registry=r,
        )
        self.absent = Gauge(
            "mlx_intent_tier_absent",
            "1 for a tier absent here (reason not_installed or too_large): a configuration fact, not a fallback",
            ["tier", "reason"],
            registry=r,
        )
        self.absent_seen: set[tuple[str, str]] = set()
        self.cache_hits = Counter("mlx_intent_cache_hits", "Answers from the result cache", registry=r)
        self.batches = Histogram(
            "mlx_intent_batch_texts", "Texts per batch run by the worker", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        Gauge("mlx_intent_queue_jobs", "Jobs waiting for the worker", registry=r).set_function(batcher.jobs.qsize)
        peak = Gauge("mlx_intent_peak_memory_bytes", "Peak MLX memory of this process", registry=r)
        peak.set_function(lambda: (chain.metrics.snapshot()["peak_memory_mb"] or 0) * MB)
        lost = Gauge(
            "mlx_intent_log_write_failures",
            "Answers given whose classification log record could not be written (full disk...); only grows",
            registry=r,
        )
        lost.set_function(lambda: chain.metrics.log_write_failures)

    def answered(self, result: dict) -> None:
        self.intents.labels(result["primary_intent"]).inc()
        self.tiers.labels(result["tier"]).inc()
        present = {result["tier"]}
        for f in result.get("fallbacks") or ():
            if is_absent(f):
                self.absent.labels(f["tier"], f["kind"]).set(1)
                self.absent_seen.add((f["tier"], f["kind"]))
            else:
                self.fallbacks.labels(f["tier"], f["kind"]).inc()
                present.add(f["tier"])
        self.fallback_answers.inc(len(present) > 1)
        for tier, kind in self.absent_seen:
            if tier in present:  # pulled since, and loaded: no longer absent
                self.absent.labels(tier, kind).set(0)
        if result.get("cached"):
            self.cache_hits.inc()


class Guard:
    """ASGI middleware: refuses oversized bodies (by Content-Length, or counted as they arrive, before the
    body is read whole) and non-JSON posts, and counts every request by endpoint and status."""

    def __init__(self, app, prometheus: Prometheus, max_body: int = MAX_BODY_BYTES):
        self.app, self.prometheus, self.max_body = app, prometheus, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, sending)
            await self.app(scope, self._counted(receive), sending)
        finally:
            self.prometheus.requests.labels(endpoint, str(status[0])).inc()
            self.prometheus.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _refusal(self, scope) -> JSONResponse | None:
        if scope["method"] != "POST" or scope["path"] not in JSON_POSTS:
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return error(413, f"body too large: {length} bytes > {self.max_body}", {"limit": self.max_body})
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            return error(415, "send the body as JSON with Content-Type: application/json", {"got": kind or None})
        return None

    def _counted(self, receive):
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, f"body too large: over {self.max_body} bytes")  # FastAPI re-raises this kind
            return message

        return counted


# ---- the app ------------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    chain: Chain,
    *,
    request_timeout_ms: float | None = None,
    max_wait_ms: float = MAX_WAIT_MS,
    queue_size: int = QUEUE_SIZE,
    batching: bool = True,
) -> FastAPI:
    """The service around ``chain`` (built from ``settings``; its LLM tiers decode in settings.mode).

    ``request_timeout_ms`` defaults to TIMEOUT_FACTOR latency budgets; ``batching=False`` runs one text
    at a time (for comparison)."""
    timeout_ms = request_timeout_ms or settings.latency_budget_ms * TIMEOUT_FACTOR
    chains = {mode: chain if mode == settings.mode else mode_chain(chain, mode) for mode in MODES}
    batcher = Batcher(
        chains,
        settings.mode,
        max_batch=settings.batch_size if batching else 1,
        max_wait_s=max_wait_ms / 1000 if batching else 0.0,
        queue_size=queue_size,
    )
    prometheus = Prometheus(batcher, chain)
    if chain.store is not None:
        feedback.register_metrics(prometheus.registry, chain.store)
    batcher.on_batch = prometheus.batches.observe
    health = {"ready": False, "status": "warming", "primary": None, "detail": None}

    def warmed(future) -> None:
        if future.exception() is not None:
            health.update(status="degraded", detail=f"warm-up failed: {future.exception()!r}")
            return
        ready, name_or_reason = future.result()
        ok = {"ready": True, "status": "ready", "primary": name_or_reason, "detail": None}
        health.update(ok if ready else {"status": "degraded", "detail": name_or_reason})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        batcher.submit(Job([WARM_TEXT], WARM)).future.add_done_callback(warmed)
        yield
        health.update(ready=False, status="stopping")
        await asyncio.to_thread(batcher.stop)  # uvicorn has let requests in flight finish; drain the queue

    app = FastAPI(
        title="mlx-intent",
        version="1",
        summary="Travel intent classification with small local LLMs, for a desktop assistant.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.health, app.state.request_timeout_ms = batcher, health, timeout_ms
    app.add_middleware(Guard, prometheus=prometheus)
    _handlers(app)

    def submit(texts: list[str], mode: str, emit=None, user: str | None = None) -> Job | JSONResponse:
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            return batcher.submit(Job(texts, mode, emit=emit, deadline=deadline, users=[user] * len(texts)))
        except QueueFull as e:
            return error(503, "server busy", str(e), {"Retry-After": str(RETRY_AFTER_S)})
        except Closed as e:
            return error(503, "shutting down", str(e), {"Retry-After": str(RETRY_AFTER_S)})

    def timed_out(texts: list[str], user: str | None = None) -> list[dict]:
        return fallback_chain(chain, Reason.TIMEOUT, f"timeout: no answer within {timeout_ms:g} ms").classify_batch(
            texts, users=[user] * len(texts)
        )

    def shown(result: dict, start: float, texts: int = 1) -> dict:
        latency = (time.perf_counter() - start) * 1000
        out = {**result, "latency_ms": round(latency, 2), "latency_per_query_ms": round(latency / texts, 3)}
        prometheus.answered(out)
        return ClassifyResult.model_validate(out).model_dump()

    async def classify_texts(texts: list[str], mode: str | None, user: str | None = None) -> list[dict] | JSONResponse:
        start = time.perf_counter()
        job = submit(texts, mode or settings.mode, user=user)
        if isinstance(job, JSONResponse):
            return job
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout_ms / 1000)
        except asyncio.TimeoutError:  # the job is cancelled if not begun; if begun, its answer is dropped
            results = timed_out(texts, user)
        return [shown(r, start, len(texts)) for r in results]

    @app.post("/v1/classify", response_model=ClassifyResult, responses=ERRORS)
    async def classify(body: ClassifyRequest):
        """Classify one text through the fallback chain (batched with concurrent requests)."""
        results = await classify_texts([body.text], body.mode, body.user)
        return results if isinstance(results, JSONResponse) else results[0]

    @app.post("/v1/classify/batch", response_model=BatchResult, responses=ERRORS)
    async def classify_batch(body: BatchRequest):
        """Classify up to 64 texts; results in the same order."""
        results = await classify_texts(body.texts, body.mode, body.user)
        return results if isinstance(results, JSONResponse) else {"results": results}

    @app.post(
        "/v1/classify/stream",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}, **ERRORS},
    )
    async def classify_stream(body: StreamRequest):
        """Constrained generation as server-sent events: `token` events carry pieces of the JSON as the
        model writes it, then one `result` event holds the final answer (an `error` event if it failed)."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job = submit([body.text], STREAM, lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data)))
        if isinstance(job, JSONResponse):
            return job
        return StreamingResponse(sse(job, events, body.text, start), media_type="text/event-stream")

    async def sse(job: Job, events: asyncio.Queue, text: str, start: float) -> AsyncIterator[str]:
        first = True
        while True:
            try:
                kind, data = await asyncio.wait_for(events.get(), timeout_ms / 1000 if first else None)
            except asyncio.TimeoutError:
                if job.future.cancel():  # never begun: the tiers below the LLMs answer at once
                    yield event("result", shown(timed_out([text])[0], start))
                    return
                first = False  # begun: its tokens are coming
                continue
            first = False
            if kind == "token":
                yield event("token", {"text": data})
            elif kind == "result":
                yield event("result", shown(data, start))
                return
            else:
                yield event("error", {"error": "stream failed", "detail": data})
                return

    @app.post("/v1/feedback", status_code=201, responses=FEEDBACK_ERRORS)
    def feedback_route(body: FeedbackRequest):
        """Correct an answer by its id (404: not recorded here; 409: judged already, unless replace)."""
        if chain.store is None:
            return error(404, "this server does not record answers (started with --no-record)")
        try:
            fields = {"correct": body.correct, "replace": body.replace, "source": "api"}
            return feedback.add_feedback(chain.store, body.id, body.primary_intent, body.all_intents, **fields)
        except feedback.FeedbackError as e:
            return error(e.status, str(e))

    @app.get("/v1/models", response_model=ModelsResult)
    def models():
        """Every registry model: its state on disk, whether this server has it loaded, its place in the chain."""
        loaded = chain.pool.loaded if chain.pool is not None else {}
        home = chain.pool.home if chain.pool is not None else None
        return {
            "models": [
                {
                    "name": name,
                    "state": registry.state(name, home),
                    "loaded": name in loaded,
                    "tier": chain.names.index(name) if name in chain.names else None,
                }
                for name in registry.REGISTRY
            ]
        }

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "Not ready."}})
    def healthz():
        """200 once the warm-up has loaded the first LLM tier that can be had; 503 before (and after a failure)."""
        return JSONResponse(dict(health), status_code=200 if health["ready"] else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(prometheus.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _handlers(app: FastAPI) -> None:
    """Every error as {"error", "detail"}; the input is never echoed (it may not even encode)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            why = next(p for p in problems if p.get("type") == "json_invalid").get("ctx", {}).get("error")
            return error(400, "invalid JSON", str(why) if why else None)
        detail = [{"loc": ".".join(map(str, p.get("loc", ()))), "msg": p["msg"], "type": p["type"]} for p in problems]
        first = detail[0] if detail else {"loc": "body", "msg": "invalid"}
        return error(422, f"{first['loc']}: {first['msg']}", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal error", f"{type(exc).__name__}: {exc}")
