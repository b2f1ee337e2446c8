"""What stands between a connection and the routes: the Host check (only loopback names unless told otherwise,
or a web page could read /metrics through DNS rebinding), the token of the GUARDED endpoints, body size and
time limits, request counting (``Guard``); a first-byte and a header timeout on each connection
(``HeadTimeoutH11``); uvicorn's settings for the app (``server_config``); every error as JSON (``json_errors``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Collection, Iterable
from functools import partial

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlx_intent.serve.metrics import Prometheus
from mlx_intent.serve.schemas import MAX_BODY_BYTES, MAX_HEAD_BYTES, RETRY_AFTER_S, error
from mlx_intent.settings import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, KEEP_ALIVE_S

log = logging.getLogger("mlx_intent.cli.serve")

DRAIN_BYTES = 16 * 1024 * 1024  # a refused body up to this size is read to its end, so the client hears the 413
CONNECTIONS_OVER_QUEUE = 64  # default concurrency limit: the queue size plus this many (health, metrics...)
SHUTDOWN_GRACE_S = 1.0  # on shutdown, an idle keep-alive connection stays this long for a request already sent
FIRST_BYTE_TIMEOUT_S = 2.0  # a connection that sends nothing is closed after this; from its first byte, a head has
# the header timeout (idle connections had denied service: 330 of them, or 8 with --limit-concurrency 4)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
JSON_POSTS = ("/v1/classify", "/v1/classify/batch", "/v1/classify/stream", "/v1/feedback")
ENDPOINTS = (*JSON_POSTS, "/v1/models", "/healthz", "/metrics", "/openapi.json")
GUARDED = ("/v1/feedback", "/metrics", "/v1/models")  # what --token guards: the store and the read-outs


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


def json_errors(app: FastAPI) -> None:
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
