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
import json
import logging
import time
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlx_intent import feedback
from mlx_intent.chain import Chain, Reason, timing_fields
from mlx_intent.context import MAX_CONTEXT_TURNS
from mlx_intent.models import registry
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
    mode_chain,
    watched,
)
from mlx_intent.serve.metrics import Prometheus
from mlx_intent.serve.middleware import LOOPBACK_HOSTS, Guard, allowed_hosts, is_loopback, json_errors, server_config
from mlx_intent.serve.schemas import (
    ERRORS,
    FEEDBACK_ERRORS,
    RETRY_AFTER_S,
    BatchRequest,
    BatchResult,
    ClassifyRequest,
    ClassifyResult,
    FeedbackRequest,
    Health,
    ModelsResult,
    StreamRequest,
    Turn,
    error,
)
from mlx_intent.serve.sessions import Sessions
from mlx_intent.settings import (
    BODY_TIMEOUT_S,
    MAX_WAIT_MS,
    MODES,
    QUEUE_SIZE,
    Settings,
)

log = logging.getLogger("mlx_intent.cli.serve")

LOADING = "loading: the server is warming up its models; answered by the tiers that are ready"
TIMEOUT_FACTOR = 4  # default request timeout: this many latency budgets (queueing and batching included)

# cli/serve.py imports the middleware's three from here until it is pointed at serve.middleware (issue 25 merge)
__all__ = ["allowed_hosts", "create_app", "is_loopback", "server_config"]

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
    served = watched(_quiet(chain), states)
    chains = {mode: served if mode == settings.mode else mode_chain(served, mode) for mode in MODES}
    batcher = Batcher(
        chains,
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
    json_errors(app)

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
            state = states.get(tier.name, TierState()).state if tier.model else READY
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


def _quiet(chain: Chain) -> Chain:
    """A copy of ``chain`` that neither logs, counts nor keeps answers: the server does all three, once per
    answered request and with the request's own latency (a request that timed out would otherwise be logged
    twice, and with the microseconds of the tiers that answered it in the end)."""
    copy = chain.derive()
    copy.recording = False
    return copy


def event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
