"""The HTTP API of ``mlx-intent serve``: FastAPI routes, request limits, errors as JSON, Prometheus metrics.

Every request is answered with JSON (or server-sent events for the stream); bad input gets a 4xx whose
body is ``{"error": ..., "detail": ...}``.  Classification goes through the batcher's single worker
thread; a request that waits longer than the request timeout, or comes while the warm-up loads the
models, is answered at once by the tiers below them (on a thread: never on the event loop, which must
keep answering /healthz).  Each answered request is counted and logged once, with its own latency.

Only loopback Host names are answered unless told otherwise (a web page could otherwise read /metrics
through DNS rebinding); bodies and request heads have time limits (``server_config``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlx_intent import feedback
from mlx_intent.chain import Chain, Reason, timing_fields
from mlx_intent.context import MAX_CONTEXT_TURNS
from mlx_intent.metrics import MB, is_absent, is_warming
from mlx_intent.models import registry
from mlx_intent.normalize import MAX_TEXT_CHARS, text_problem
from mlx_intent.schema import MAX_INTENTS, Intent
from mlx_intent.serve.batcher import (
    ABSENT_STATE,
    READY,
    STREAM,
    WARM,
    Batcher,
    Closed,
    Expired,
    Job,
    QueueFull,
    TierState,
    fallback_chain,
    health,
    watched,
)
from mlx_intent.serve.sessions import MAX_SESSION_ID, Sessions
from mlx_intent.settings import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_S,
    MAX_WAIT_MS,
    MODES,
    QUEUE_SIZE,
    Settings,
)

log = logging.getLogger("mlx_intent.cli.serve")

MAX_BATCH_TEXTS = 64
MAX_BODY_BYTES = 64 * 1024
DRAIN_BYTES = 16 * 1024 * 1024  # a refused body up to this size is read to its end, so the client hears the 413
MAX_HEAD_BYTES = 16 * 1024  # request line and headers
CONNECTIONS_OVER_QUEUE = 64  # default concurrency limit: the queue size plus this many (health, metrics...)
SHUTDOWN_GRACE_S = 1.0  # on shutdown, an idle keep-alive connection stays this long for a request already sent
FIRST_BYTE_TIMEOUT_S = 2.0  # a connection that sends nothing is closed after this; from its first byte, a head has
# the header timeout (idle connections had denied service: 330 of them, or 8 with --limit-concurrency 4)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
LOADING = "loading: the server is warming up its models; answered by the tiers that are ready"
TIMEOUT_FACTOR = 4  # default request timeout: this many latency budgets (queueing and batching included)
RETRY_AFTER_S = 1
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
JSON_POSTS = ("/v1/classify", "/v1/classify/batch", "/v1/classify/stream", "/v1/feedback")
ENDPOINTS = (*JSON_POSTS, "/v1/models", "/healthz", "/metrics", "/openapi.json")
GUARDED = ("/v1/feedback", "/metrics", "/v1/models")  # what --token guards: the store and the read-outs


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


class Turn(BaseModel):
    """A text and where it stands in a conversation: its earlier turns, or the session that keeps them."""

    text: Text = Field(description=f"The traveller's query, 1 to {MAX_TEXT_CHARS} characters.")
    context: list[Text] | None = Field(
        None,
        max_length=MAX_CONTEXT_TURNS,
        description=f"Earlier user turns, oldest first (at most {MAX_CONTEXT_TURNS}).",
    )
    session: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SESSION_ID,
        description=f"A conversation id: the server keeps its last {MAX_CONTEXT_TURNS} turns for 20 minutes "
        "as the context of the next.",
    )

    @model_validator(mode="after")
    def _one_memory(self) -> Turn:
        if self.context is not None and self.session is not None:
            raise ValueError("give context or session, not both")
        return self


class ClassifyRequest(Turn):
    mode: Mode | None = Field(None, description="LLM decoding; default: the server's mode setting.")
    user: User | None = Field(None, description=USER_HELP)


class BatchRequest(BaseModel):
    texts: list[Text] | None = Field(
        None, min_length=1, max_length=MAX_BATCH_TEXTS, description="Queries, answered in order."
    )
    items: list[Turn] | None = Field(
        None, min_length=1, max_length=MAX_BATCH_TEXTS, description="Or queries with their context or session."
    )
    mode: Mode | None = None
    user: User | None = Field(None, description=USER_HELP + " For every text of the batch.")

    @model_validator(mode="after")
    def _texts_or_items(self) -> BatchRequest:
        if (self.texts is None) == (self.items is None):
            raise ValueError("give texts or items")
        return self

    def turns(self) -> list[Turn]:
        return self.items if self.items is not None else [Turn(text=t) for t in self.texts]


class StreamRequest(BaseModel):
    """A text alone: the stream honours no user, session or context, so it refuses them (422) rather than
    answering as if they had not been sent."""

    model_config = ConfigDict(extra="forbid")

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
    context_used: bool = Field(False, description="The earlier turns decided the answer (a follow-up).")
    ambiguous: bool = Field(False, description="The answering tier's top two intents were within the margin.")
    lang: str | None = None


class FeedbackRequest(BaseModel):
    """A correction (the right primary_intent, optionally all_intents) or, with correct, a confirmation."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="The id of the answer judged.")
    primary_intent: Intent | None = None
    all_intents: list[Intent] | None = Field(None, min_length=1, max_length=MAX_INTENTS)
    # strict: "yes", "on" or 1 must not pass for true (pydantic's lax mode takes them)
    correct: StrictBool = Field(False, description="The answer was right (true or false, nothing else).")
    replace: StrictBool = Field(False, description="Replace feedback already given for this id (else 409).")


class BatchResult(BaseModel):
    results: list[ClassifyResult]


class ModelInfo(BaseModel):
    name: str
    state: str = Field(description="missing, downloaded, converted or ready (loaded once at least; the keyword and "
                       "general tiers always).")
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
        400: "Invalid JSON, or a Host header this server does not answer.",
        401: "No or a wrong bearer token, where the server was started with --token (feedback, metrics, models).",
        408: f"The body did not arrive within the body timeout ({BODY_TIMEOUT_S:g} s by default).",
        413: f"Body over {MAX_BODY_BYTES} bytes.",
        415: "Content type is not application/json.",
        431: f"Request line and headers over {MAX_HEAD_BYTES} bytes.",
        422: "A field is missing or invalid.",
        503: "Queue full or shutting down; see Retry-After.",
    }.items()
}


FEEDBACK_ERRORS = {
    **ERRORS,
    404: {"model": ErrorBody, "description": "No such answer recorded here."},
    409: {"model": ErrorBody, "description": "Feedback given already for this id; send replace."},
    503: {
        "model": ErrorBody,
        "description": "The feedback store is busy (locked by another process); see Retry-After.",
    },
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
        self.abandoned = Counter(
            "mlx_intent_abandoned_requests",
            "Requests whose client left before the answer (status 499): neither counted as answered, logged nor kept",
            registry=r,
        )
        self.batches = Histogram(
            "mlx_intent_batch_texts", "Texts per batch run by the worker", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        Gauge("mlx_intent_queue_jobs", "Jobs waiting for the worker", registry=r).set_function(batcher.waiting)
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
            else:  # a tier still loading is counted by its kind, "loading", but the answer is no fallback
                self.fallbacks.labels(f["tier"], f["kind"]).inc()
                present.update([] if is_warming(f) else [f["tier"]])
        self.fallback_answers.inc(len(present) > 1)
        for tier, kind in self.absent_seen:
            if tier in present:  # pulled since, and loaded: no longer absent
                self.absent.labels(tier, kind).set(0)
        if result.get("cached"):
            self.cache_hits.inc()


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without its port (an IPv6 address keeps its brackets)."""
    header = header.strip().lower()
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() and not name.endswith(":") else header


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names to answer: the loopback ones, the bound address (not a wildcard: no client names it)
    and ``extra`` (--allow-host; "*" answers any)."""
    names = set(LOOPBACK_HOSTS) | {host_name(h) for h in extra}
    try:
        wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        names.add(host_name(f"[{host}]" if ":" in host and not host.startswith("[") else host))
    return frozenset(names)


def head_bytes(scope) -> int:
    """The size of a request's head as sent, near enough: its target and its header lines."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
    return target + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


class Guard:
    """ASGI middleware: answers only allowed Host names, and the GUARDED endpoints only with ``token`` (if set);
    refuses oversized bodies (by Content-Length, or
    counted as they arrive, before the body is read whole) and non-JSON posts; gives a body
    ``body_timeout_s`` to arrive; and counts every request by endpoint and status.

    A refused body up to DRAIN_BYTES is read to its end before the 413 goes out: a client still sending
    when the server closes would get a reset (urllib: "Broken pipe") instead of the answer."""

    def __init__(
        self,
        app,
        prometheus: Prometheus,
        hosts: Collection[str] = LOOPBACK_HOSTS,
        max_body: int = MAX_BODY_BYTES,
        body_timeout_s: float = BODY_TIMEOUT_S,
        token: str | None = None,
        limits: dict | None = None,
    ):
        self.app, self.prometheus, self.hosts = app, prometheus, frozenset(hosts)
        self.max_body, self.body_timeout_s = max_body, body_timeout_s
        self.token = f"Bearer {token}".encode() if token else None
        self.limits = limits if limits is not None else {}  # "requests": at most this many at once (server_config)
        self.active = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.active += 1
        try:
            refusal = await self._refusal(scope, receive, deadline)
            if refusal is not None:
                return await refusal(scope, receive, sending)
            await self.app(scope, self._counted(receive, deadline), sending)
        finally:
            self.active -= 1
            self.prometheus.requests.labels(endpoint, str(status[0])).inc()
            self.prometheus.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _refusal(self, scope, receive, deadline: float) -> JSONResponse | None:
        if (limit := self.limits.get("requests")) is not None and self.active > limit:
            return error(503, "server busy: too many requests at once", None, {"Retry-After": str(RETRY_AFTER_S)})
        if head_bytes(scope) > MAX_HEAD_BYTES:  # h11 bounds only a head that arrives in pieces
            return error(431, f"request head over {MAX_HEAD_BYTES} bytes", None, {"Connection": "close"})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if "*" not in self.hosts and host_name(headers.get("host", "")) not in self.hosts:
            # the names it answers are not listed: a page probing for them learns nothing
            return error(400, "this server does not answer that Host name (mlx-intent serve --allow-host)")
        if self.token is not None and scope["path"] in GUARDED:
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, self.token):
                return error(401, "this endpoint needs the server's token", None, {"WWW-Authenticate": "Bearer"})
        if scope["method"] != "POST" or scope["path"] not in JSON_POSTS:
            return None
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            close = int(length) > DRAIN_BYTES or not await self._drain(receive, 0, deadline)
            message = f"body too large: {length} bytes > {self.max_body}"
            return error(413, message, {"limit": self.max_body}, {"Connection": "close"} if close else None)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            return error(415, "send the body as JSON with Content-Type: application/json", {"got": kind or None})
        return None

    async def _next(self, receive, deadline: float) -> dict:
        try:
            return await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            why = f"body not received within {self.body_timeout_s:g} s"
            raise HTTPException(408, why, {"Connection": "close"}) from None

    async def _drain(self, receive, seen: int, deadline: float) -> bool:
        """Read and drop the rest of a refused body while it stays within DRAIN_BYTES and the body timeout;
        whether it was read to its end (then the connection may serve the next request)."""
        while seen <= DRAIN_BYTES:
            try:
                message = await self._next(receive, deadline)
            except HTTPException:
                return False
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return seen <= DRAIN_BYTES
        return False

    def _counted(self, receive, deadline: float):
        seen, done = 0, False

        async def counted():
            nonlocal seen, done
            if done:  # the body is in: what follows is a wait for the client to go, however long the answer takes
                return await receive()
            message = await self._next(receive, deadline)
            done = message["type"] != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                ended = done or await self._drain(receive, seen, deadline)
                why = f"body too large: over {self.max_body} bytes"
                raise HTTPException(413, why, None if ended else {"Connection": "close"})  # FastAPI re-raises this kind
            return message

        return counted


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a header timeout: from its opening, and from each response, a connection
    has ``head_timeout_s`` to send a whole request head, else it is closed.  uvicorn has none: a client
    that connects and sends nothing, or a byte now and then, would hold a connection for ever."""

    def __init__(
        self,
        *args,
        head_timeout_s: float = HEADER_TIMEOUT_S,
        first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S,
        max_idle: int | None = None,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.head_timeout_s, self.first_byte_timeout_s, self.max_idle = head_timeout_s, first_byte_timeout_s, max_idle
        self.shutdown_grace_s = shutdown_grace_s
        self.stopping = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.sending = False  # bytes came since the last response: a request is on its way
        self.idle_since = 0.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.idle_since = self.loop.time()
        self._await_head(min(self.first_byte_timeout_s, self.head_timeout_s))
        self._shed_idle()

    def data_received(self, data: bytes) -> None:
        if not self.sending and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # its first byte: the head has the whole header timeout from here
        self.sending = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        self.sending, self.idle_since = False, self.loop.time()
        self._await_head()  # first: a pipelined request handled below cancels it
        super().on_response_complete()

    def idle(self) -> bool:
        """Open with no request on its way: nothing sent since it opened or since its last response."""
        done = self.cycle is None or self.cycle.response_complete
        return done and not self.sending and not self.transport.is_closing()

    def _shed_idle(self) -> None:
        """Keep at most ``max_idle`` idle connections, closing the longest idle: the rest of the concurrency
        limit stays for clients that send a request."""
        if self.max_idle is None:
            return
        idle = sorted((c for c in self.connections if isinstance(c, HeadTimeoutH11) and c.idle()), key=_since)
        for connection in idle[: max(0, len(idle) - self.max_idle)]:
            connection.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head came in
            self._cancel_head_timer()
            if self.stopping and self.cycle is not None:
                self.cycle.keep_alive = False  # answered, then closed

    def shutdown(self) -> None:
        """uvicorn closes an idle keep-alive connection the moment it stops, so a request a client sends on it
        then meets a closed socket.  Instead a request already on its way (or sent within ``shutdown_grace_s``)
        is answered, and the connection closed after it; one still idle after that is closed."""
        if self.cycle is not None and not self.cycle.response_complete:
            return super().shutdown()  # a request in hand: uvicorn answers it and closes
        self.stopping = True
        if not self.sending:  # a head on its way keeps its own timer
            self._await_head(self.shutdown_grace_s)

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _await_head(self, timeout_s: float | None = None) -> None:
        self._cancel_head_timer()
        self.head_timer = self.loop.call_later(timeout_s or self.head_timeout_s, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def _since(connection: HeadTimeoutH11) -> float:
    return connection.idle_since


def server_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    limit_concurrency: int | None = None,
    keep_alive_s: float = KEEP_ALIVE_S,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S,
    shutdown_grace_s: float = SHUTDOWN_GRACE_S,
    log_level: str = "info",
) -> uvicorn.Config:
    """uvicorn's settings for ``app``: a first-byte, a header and an idle (keep-alive) timeout, a bound on the
    request head, and at most ``limit_concurrency`` requests at once (default: the queue size plus
    CONNECTIONS_OVER_QUEUE; more get a JSON 503 with Retry-After), of whose connections at most half may sit
    idle (the longest idle are closed first).  Every request is answered within its timeout (by the tiers
    below the LLMs if need be), so a shutdown that waits a little longer than that finishes all of them, and
    one sent on an idle connection within ``shutdown_grace_s`` of the shutdown too."""
    if limit_concurrency is None:
        limit_concurrency = app.state.batcher.queue_size + CONNECTIONS_OVER_QUEUE
    app.state.limits["requests"] = limit_concurrency  # Guard's: uvicorn's own limit counts idle connections too
    protocol = partial(
        HeadTimeoutH11,
        head_timeout_s=header_timeout_s,
        first_byte_timeout_s=first_byte_timeout_s,
        max_idle=max(1, limit_concurrency // 2),
        shutdown_grace_s=shutdown_grace_s,
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=int(app.state.request_timeout_ms / 1000) + 10,
        log_level=log_level,
    )


# ---- the app ------------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    chain: Chain,
    *,
    request_timeout_ms: float | None = None,
    max_wait_ms: float = MAX_WAIT_MS,
    queue_size: int = QUEUE_SIZE,
    batching: bool = True,
    hosts: Collection[str] = LOOPBACK_HOSTS,
    body_timeout_s: float = BODY_TIMEOUT_S,
    sessions: Sessions | None = None,
    token: str | None = None,
) -> FastAPI:
    """The service around ``chain`` (built from ``settings``; its LLM tiers decode in settings.mode).

    ``request_timeout_ms`` defaults to TIMEOUT_FACTOR latency budgets; ``batching=False`` runs one text
    at a time (for comparison); ``hosts``: the Host names answered (see ``allowed_hosts``); ``sessions`` keeps
    the conversations of requests that name one; ``token``, if given, is asked of the GUARDED endpoints."""
    timeout_ms = request_timeout_ms or settings.latency_budget_ms * TIMEOUT_FACTOR
    states: dict[str, TierState] = {}
    served = watched(chain, states)  # loads recorded; answers not: the server keeps each request's once
    batcher = Batcher(
        served,
        settings.mode,
        max_batch=settings.batch_size if batching else 1,
        max_wait_s=max_wait_ms / 1000 if batching else 0.0,
        queue_size=queue_size,
        states=states,
    )
    prometheus = Prometheus(batcher, chain)
    if chain.store is not None:
        feedback.register_metrics(prometheus.registry, chain.store)
    batcher.on_batch = prometheus.batches.observe
    warming = {"up": Job([], WARM), "probe": None, "stopping": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        batcher.submit(warming["up"])
        yield
        warming["stopping"] = True
        # uvicorn has let requests in flight finish, each within its timeout; the worker checks deadlines
        # between chunks, so one timeout more is all it can need (it is a daemon thread after that)
        await asyncio.to_thread(batcher.stop, timeout_ms / 1000)

    app = FastAPI(
        title="mlx-intent",
        version="1",
        summary="Travel intent classification with small local LLMs, for a desktop assistant.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN, which a machine offline cannot reach;
        redoc_url=None,  # the description stays at /openapi.json
    )
    app.state.batcher, app.state.request_timeout_ms = batcher, timeout_ms
    sessions = app.state.sessions = sessions if sessions is not None else Sessions()
    app.state.limits = {}  # server_config sets "requests"
    app.add_middleware(
        Guard, prometheus=prometheus, hosts=hosts, body_timeout_s=body_timeout_s, token=token, limits=app.state.limits
    )
    _handlers(app)

    def submit(texts: list[str], mode: str, emit=None, user: str | None = None, contexts=None) -> Job | JSONResponse:
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            return batcher.submit(Job(texts, mode, emit=emit, deadline=deadline, user=user, contexts=contexts))
        except QueueFull as e:
            return error(503, "server busy", str(e), {"Retry-After": str(RETRY_AFTER_S)})
        except Closed as e:
            return error(503, "shutting down", str(e), {"Retry-After": str(RETRY_AFTER_S)})

    def below(texts: list[str], why: tuple[Reason, str], user: str | None = None, contexts=None) -> list[dict]:
        """The answers of the tiers below the model tiers (those absent here said so; during the warm-up the
        encoder too, once loaded): for a request that timed out or came during the warm-up, ``why`` (kind,
        words).  Called on a thread: its log and fsync stay off the loop."""
        chain_below = fallback_chain(served, *why, states)
        return chain_below.classify_batch(texts, users=[user] * len(texts), contexts=contexts)

    timed_out = (Reason.TIMEOUT, f"timeout: no answer within {timeout_ms:g} ms")
    warming_up = (Reason.LOADING, LOADING)

    def shown(result: dict, start: float, texts: int = 1) -> dict:
        """The result as answered: the request's own latency, counted in /metrics."""
        latency = (time.perf_counter() - start) * 1000
        out = {**result, **timing_fields(latency, texts)}
        prometheus.answered(out)
        return out

    def record(texts: list[str], outs: list[dict], user: str | None = None, contexts=None) -> None:
        """Count, log and keep what was answered, once per text (on a thread: the log fsyncs)."""
        chain.keep(texts, outs, users=[user] * len(texts), contexts=contexts)

    async def answered(
        texts: list[str], results: list[dict], start: float, user: str | None = None, contexts=None
    ) -> list[dict]:
        outs = [shown(r, start, len(texts)) for r in results]
        await asyncio.to_thread(record, texts, outs, user, contexts)
        return [ClassifyResult.model_validate(out).model_dump() for out in outs]

    def contexts_of(turns: list[Turn]) -> list[tuple[str, ...]]:
        """Each turn's earlier turns: its own context, or its session's (with the batch's earlier turns of the
        same session after them), the newest MAX_CONTEXT_TURNS."""
        said: dict[str, list[str]] = {}
        out = []
        for turn in turns:
            if turn.session is None:
                out.append(tuple(turn.context or ()))
                continue
            kept = said.setdefault(turn.session, list(sessions.context(turn.session)))
            out.append(tuple(kept[-MAX_CONTEXT_TURNS:]))
            kept.append(turn.text)
        return out

    async def classify_texts(
        turns: list[Turn], mode: str | None, user: str | None = None, request: Request | None = None
    ) -> list[dict] | JSONResponse:
        start = time.perf_counter()
        texts, contexts = [t.text for t in turns], contexts_of(turns)
        if not warming["up"].future.done():
            results = await asyncio.to_thread(below, texts, warming_up, user, contexts)
        else:
            job = submit(texts, mode or settings.mode, user=user, contexts=contexts)
            if isinstance(job, JSONResponse):
                return job
            try:
                results = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout_ms / 1000)
            except (asyncio.TimeoutError, Expired):  # the job is cancelled if not begun, dropped if begun
                results = await asyncio.to_thread(below, texts, timed_out, user, contexts)
        if request is not None and await request.is_disconnected():  # nobody to deliver to: count it apart
            prometheus.abandoned.inc()
            return error(499, "the client closed the request before its answer")
        for turn in turns:  # answered: the turns join their sessions
            if turn.session is not None:
                sessions.add(turn.session, turn.text)
        return await answered(texts, results, start, user, contexts)

    @app.post("/v1/classify", response_model=ClassifyResult, responses=ERRORS)
    async def classify(body: ClassifyRequest, request: Request):
        """Classify one text through the fallback chain (batched with concurrent requests); with ``context``
        or ``session``, as a turn of a conversation (``context_used`` says when the earlier turns decided)."""
        results = await classify_texts([body], body.mode, body.user, request)
        return results if isinstance(results, JSONResponse) else results[0]

    @app.post("/v1/classify/batch", response_model=BatchResult, responses=ERRORS)
    async def classify_batch(body: BatchRequest, request: Request):
        """Classify up to 64 texts (``texts``, or ``items`` with their context or session); results in order."""
        results = await classify_texts(body.turns(), body.mode, body.user, request)
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
        if not warming["up"].future.done():
            return StreamingResponse(at_once(body.text, warming_up, start), media_type="text/event-stream")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job = submit([body.text], STREAM, lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data)))
        if isinstance(job, JSONResponse):
            return job
        return StreamingResponse(sse(job, events, body.text, start), media_type="text/event-stream")

    async def at_once(text: str, why: tuple[Reason, str], start: float) -> AsyncIterator[str]:
        results = await asyncio.to_thread(below, [text], why)
        yield event("result", (await answered([text], results, start))[0])

    async def sse(job: Job, events: asyncio.Queue, text: str, start: float) -> AsyncIterator[str]:
        ended = False
        try:
            async for e in stream_events(job, events, text, start):
                yield e
            ended = True
        finally:  # ended, or cancelled because the client left: a queued job never runs, a begun one stops
            if not ended:
                prometheus.abandoned.inc()  # its 200 went out with the first byte: counted apart here
            job.future.cancel()
            job.dropped.set()

    async def stream_events(job: Job, events: asyncio.Queue, text: str, start: float) -> AsyncIterator[str]:
        first = True
        while True:
            try:
                kind, data = await asyncio.wait_for(events.get(), timeout_ms / 1000 if first else None)
            except asyncio.TimeoutError:
                if job.future.cancel():  # never begun: the tiers below the LLMs answer at once
                    async for e in at_once(text, timed_out, start):
                        yield e
                    return
                first = False  # begun: its tokens are coming
                continue
            first = False
            if kind == "token":
                yield event("token", {"text": data})
            elif kind == "result":
                yield event("result", (await answered([text], [data], start))[0])
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
        except feedback.FeedbackError as e:  # its words name the store's file: not the client's to know
            return error(e.status, str(e).replace(str(chain.store.path), "this server's feedback store"))
        except feedback.StoreError:  # locked by another process past the busy timeout, a full disk
            log.warning("feedback not stored: the store is unavailable", exc_info=True)
            return error(503, "the feedback store is busy or unavailable; try again", None, {"Retry-After": "5"})

    @app.get("/v1/models", response_model=ModelsResult)
    def models():
        """Every registry model: its state on disk, whether this server has it loaded, its place in the chain;
        then the chain's other tiers (the e5-small encoder, keyword, general), which answer too."""
        loaded = chain.pool.loaded if chain.pool is not None else {}
        home = chain.pool.home if chain.pool is not None else None
        listed = [
            {
                "name": name,
                "state": registry.state(name, home),
                "loaded": name in loaded,
                "tier": chain.names.index(name) if name in chain.names else None,
            }
            for name in registry.REGISTRY
        ]
        for index, tier in enumerate(served.tiers):
            if tier.name in registry.REGISTRY:
                continue
            state = states.get(tier.name, TierState()).state if tier.loads_model else READY
            on_disk = "missing" if state == ABSENT_STATE or tier.absent() is not None else "downloaded"
            shown = "ready" if state == READY else on_disk
            listed.append({"name": tier.name, "state": shown, "loaded": state == READY, "tier": index})
        return {"models": listed}

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "Not ready."}})
    async def healthz():
        """200 once the warm-up is done and the first model tier that can be had is loaded; 503 before, while
        that tier fails (a load is retried then, after the pool's back-off) and while shutting down.
        Decided from the tiers' states at each call."""
        if warming["stopping"]:
            body = {"ready": False, "status": "stopping", "primary": None, "detail": None}
        elif not warming["up"].future.done():
            body = {"ready": False, "status": "warming", "primary": None, "detail": "warm-up: loading the models"}
        else:
            body = health(served, states)
        probe = warming["probe"]
        if body["status"] == "degraded" and (probe is None or probe.future.done()):
            try:
                warming["probe"] = batcher.submit(Job([], WARM))
            except (QueueFull, Closed):
                pass
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

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
        return error(500, "internal error (the server's log says more)")  # no type, message or path to a client
