"""The HTTP API of ``mlx-intent serve``: the routes, and ``create_app`` which puts them, the service and the
middleware together.

Every request is answered with JSON (or server-sent events for the stream); bad input gets a 4xx whose body
is ``{"error": ..., "detail": ...}``.  The work is the service's (``service.Service``: the batcher's single
worker thread, the tiers below it when a request times out or comes during the warm-up); the request and
answer bodies are ``schemas``; the Host check, the token, the body and head limits are ``middleware``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Collection
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlx_intent.chain import Chain
from mlx_intent.feedback.store import StoreError
from mlx_intent.results import FeedbackError, Reason
from mlx_intent.serve.batcher import STREAM, Job
from mlx_intent.serve.middleware import LOOPBACK_HOSTS, Guard, json_errors
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
    error,
)
from mlx_intent.serve.service import WARMING_UP, Abandoned, Refused, Service
from mlx_intent.serve.sessions import Sessions
from mlx_intent.settings import BODY_TIMEOUT_S, MAX_WAIT_MS, QUEUE_SIZE, Settings

log = logging.getLogger("mlx_intent.cli.serve")

TIMEOUT_FACTOR = 4  # default request timeout: this many latency budgets (queueing and batching included)

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
    service = Service(
        settings,
        chain,
        timeout_ms=timeout_ms,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        batching=batching,
        sessions=sessions,
    )
    app = FastAPI(
        title="mlx-intent",
        version="1",
        summary="Travel intent classification with small local LLMs, for a desktop assistant.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN, which a machine offline cannot reach;
        redoc_url=None,  # the description stays at /openapi.json
    )
    app.state.service, app.state.sessions = service, service.sessions
    app.state.batcher, app.state.request_timeout_ms = service.batcher, timeout_ms
    app.state.limits = {}  # server_config sets "requests"
    app.add_middleware(
        Guard,
        prometheus=service.prometheus,
        hosts=hosts,
        body_timeout_s=body_timeout_s,
        token=token,
        limits=app.state.limits,
    )
    json_errors(app)
    app.include_router(router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The worker starts with the server and warms the models up; it stops after the requests in flight."""
    service: Service = app.state.service
    service.start()
    yield
    await service.stop()


async def _service(request: Request) -> Service:  # async: a plain function would run on a thread
    return request.app.state.service


Served = Annotated[Service, Depends(_service)]
router = APIRouter()


async def answer(work: Awaitable[list[dict]]) -> list[dict] | JSONResponse:
    """The answers, or the refusal as JSON: 503 with Retry-After, or 499 when the client has gone."""
    try:
        return await work
    except Refused as e:
        return error(503, e.words, e.detail, {"Retry-After": str(RETRY_AFTER_S)})
    except Abandoned as e:
        return error(499, str(e))


@router.post("/v1/classify", response_model=ClassifyResult, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request, service: Served):
    """Classify one text through the fallback chain (batched with concurrent requests); with ``context``
    or ``session``, as a turn of a conversation (``context_used`` says when the earlier turns decided)."""
    results = await answer(service.classify([body], body.mode, body.user, request.is_disconnected))
    return results if isinstance(results, JSONResponse) else results[0]


@router.post("/v1/classify/batch", response_model=BatchResult, responses=ERRORS)
async def classify_batch(body: BatchRequest, request: Request, service: Served):
    """Classify up to 64 texts (``texts``, or ``items`` with their context or session); results in order."""
    results = await answer(service.classify(body.turns(), body.mode, body.user, request.is_disconnected))
    return results if isinstance(results, JSONResponse) else {"results": results}


@router.post(
    "/v1/classify/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}, **ERRORS},
)
async def classify_stream(body: StreamRequest, service: Served):
    """Constrained generation as server-sent events: `token` events carry pieces of the JSON as the
    model writes it, then one `result` event holds the final answer (an `error` event if it failed)."""
    start = time.perf_counter()
    if service.warming():
        return StreamingResponse(at_once(service, body.text, WARMING_UP, start), media_type="text/event-stream")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    try:
        job = service.submit(
            [body.text], STREAM, lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data))
        )
    except Refused as e:
        return error(503, e.words, e.detail, {"Retry-After": str(RETRY_AFTER_S)})
    return StreamingResponse(sse(service, job, events, body.text, start), media_type="text/event-stream")


async def at_once(service: Service, text: str, why: tuple[Reason, str], start: float) -> AsyncIterator[str]:
    results = await asyncio.to_thread(service.below, [text], why)
    yield event("result", checked((await service.answered([text], results, start))[0]))


async def sse(service: Service, job: Job, events: asyncio.Queue, text: str, start: float) -> AsyncIterator[str]:
    ended = False
    try:
        async for e in stream_events(service, job, events, text, start):
            yield e
        ended = True
    finally:  # ended, or cancelled because the client left: a queued job never runs, a begun one stops
        if not ended:
            service.prometheus.abandoned.inc()  # its 200 went out with the first byte: counted apart here
        job.future.cancel()
        job.dropped.set()


async def stream_events(
    service: Service, job: Job, events: asyncio.Queue, text: str, start: float
) -> AsyncIterator[str]:
    first = True
    while True:
        try:
            kind, data = await asyncio.wait_for(events.get(), service.timeout_ms / 1000 if first else None)
        except asyncio.TimeoutError:
            if job.future.cancel():  # never begun: the tiers below the LLMs answer at once
                async for e in at_once(service, text, service.timed_out, start):
                    yield e
                return
            first = False  # begun: its tokens are coming
            continue
        first = False
        if kind == "token":
            yield event("token", {"text": data})
        elif kind == "result":
            yield event("result", checked((await service.answered([text], [data], start))[0]))
            return
        else:
            yield event("error", {"error": "stream failed", "detail": data})
            return


def checked(out: dict) -> dict:
    """An answer as ClassifyResult shows it: what FastAPI does for the other routes, by their response model
    (the one check of an answer in the server; the stream has no response model)."""
    return ClassifyResult.model_validate(out).model_dump()


def event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post("/v1/feedback", status_code=201, responses=FEEDBACK_ERRORS)
def feedback_route(body: FeedbackRequest, service: Served):
    """Correct an answer by its id (404: not recorded here; 409: judged already, unless replace)."""
    store = service.chain.store
    if store is None:
        return error(404, "this server does not record answers (started with --no-record)")
    try:
        return service.feedback(body)
    except FeedbackError as e:  # its words name the store's file: not the client's to know
        return error(e.status, str(e).replace(str(store.path), "this server's feedback store"))
    except StoreError:  # locked by another process past the busy timeout, a full disk
        log.warning("feedback not stored: the store is unavailable", exc_info=True)
        return error(503, "the feedback store is busy or unavailable; try again", None, {"Retry-After": "5"})


@router.get("/v1/models", response_model=ModelsResult)
def models(service: Served):
    """Every registry model: its state on disk, whether this server has it loaded, its place in the chain;
    then the chain's other tiers (the e5-small encoder, keyword, general), which answer too."""
    return {"models": service.models()}


@router.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "Not ready."}})
async def healthz(service: Served):
    """200 once the warm-up is done and the first model tier that can be had is loaded; 503 before, while
    that tier fails (a load is retried then, after the pool's back-off) and while shutting down.
    Decided from the tiers' states at each call."""
    body = service.readiness()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(service: Served):
    """Prometheus text format."""
    return PlainTextResponse(generate_latest(service.prometheus.registry), media_type=CONTENT_TYPE_LATEST)
