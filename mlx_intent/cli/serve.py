"""``mlx-intent serve``: the local HTTP service for the desktop assistant (FastAPI on uvicorn).

The web stack is imported only when the command runs, so the rest of the CLI starts fast and works
without it installed.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

import click

from mlx_intent.cli.options import chain_for, settings_options
from mlx_intent.errors import InputError, UserError
from mlx_intent.feedback.store import SERVE_BUSY_TIMEOUT_MS, open_store
from mlx_intent.settings import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, KEEP_ALIVE_S, MAX_WAIT_MS, QUEUE_SIZE, Settings
from mlx_intent.tuner.recalibrate import Recalibrator

seconds = click.FloatRange(0, min_open=True)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address (loopback: this machine only).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests whose Host header names NAME (repeatable; '*': any).  Only localhost, "
    "127.0.0.1, [::1] and the --host address are answered otherwise: a web page cannot reach the "
    "service through DNS rebinding.",
)
@click.option(
    "--token",
    envvar="MLX_INTENT_TOKEN",
    default=None,
    metavar="SECRET",
    help="Ask for 'Authorization: Bearer SECRET' on /v1/feedback, /metrics and /v1/models (classify and /healthz "
    "stay open). [MLX_INTENT_TOKEN]",
)
@click.option(
    "--request-timeout-ms",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Answer from the keyword tier after this long (default: 4 x the latency budget).",
)
@click.option(
    "--max-wait-ms", default=MAX_WAIT_MS, show_default=True, type=click.FloatRange(0), help="Batch gathering wait."
)
@click.option(
    "--queue-size", default=QUEUE_SIZE, show_default=True, type=click.IntRange(1), help="Jobs waiting; then 503."
)
@click.option(
    "--limit-concurrency",
    type=click.IntRange(1),
    default=None,
    help="Connections and requests at once; then 503 (default: the queue size + 64).",
)
@click.option(
    "--header-timeout",
    default=HEADER_TIMEOUT_S,
    show_default=True,
    type=seconds,
    help="Seconds a connection has to send a whole request head, from its opening or its last response.",
)
@click.option(
    "--body-timeout",
    default=BODY_TIMEOUT_S,
    show_default=True,
    type=seconds,
    help="Seconds a request body has to arrive whole; then 408.",
)
@click.option(
    "--keep-alive", default=KEEP_ALIVE_S, show_default=True, type=seconds, help="Seconds an idle connection is kept."
)
@click.option("--no-batching", is_flag=True, help="Run one text at a time (for comparison).")
@click.option("--no-record", is_flag=True, help="Keep no texts and answers (then POST /v1/feedback answers 404).")
@click.option(
    "--recalibrate-every",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Refit the serving tier's calibration on the feedback after every N new records, without a restart.",
)
@settings_options
def serve_command(
    host,
    port,
    allow_hosts,
    token,
    request_timeout_ms,
    max_wait_ms,
    queue_size,
    limit_concurrency,
    header_timeout,
    body_timeout,
    keep_alive,
    no_batching,
    no_record,
    recalibrate_every,
    settings: Settings,
) -> None:
    """Serve classification over HTTP: POST /v1/classify, /v1/classify/batch, /v1/classify/stream;
    POST /v1/feedback; GET /v1/models, /healthz, /metrics; the OpenAPI description at /openapi.json.  Every
    answer and its text are kept in <models folder>/feedback.db (owner-only) for /v1/feedback, unless --no-record.

    \b
    mlx-intent serve --chain smollm2-135m,keyword
    curl -s localhost:8765/v1/classify -H 'Content-Type: application/json' -d '{"text": "ferry to Kadikoy?"}'
    """
    try:
        import uvicorn

        from mlx_intent.serve.app import create_app
        from mlx_intent.serve.middleware import allowed_hosts, is_loopback, server_config
    except ImportError as e:
        raise click.ClickException(f"serve needs the web extras: pip install 'mlx-intent[serve]' ({e})") from None
    check_host(host, port)
    if token is not None and not token.strip():
        raise InputError("--token (MLX_INTENT_TOKEN) is empty")
    if not is_loopback(host):
        click.echo(
            f"warning: --host {host} is reachable from other machines: anyone who can reach it can classify"
            + (" (--token guards feedback, /metrics and /v1/models)" if token else ", give feedback and read /metrics"),
            err=True,
        )
    sock = listen_socket(host, port)  # before any model loads: a port in use fails at once, in one line
    if recalibrate_every and no_record:
        raise click.UsageError("--recalibrate-every needs the answers recorded: drop --no-record")
    store = None if no_record else open_store(settings.home, busy_timeout_ms=SERVE_BUSY_TIMEOUT_MS)
    recalibrator = Recalibrator(store, recalibrate_every) if recalibrate_every else None
    chain = chain_for(settings, store=store, wrap_load=recalibrator.loading if recalibrator else None)
    if recalibrator is not None:
        recalibrator.start()
    app = create_app(
        settings,
        chain,
        request_timeout_ms=request_timeout_ms,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        batching=not no_batching,
        hosts=allowed_hosts(host, allow_hosts),
        body_timeout_s=body_timeout,
        token=token,
    )
    config = server_config(
        app,
        host,
        port,
        limit_concurrency=limit_concurrency,
        keep_alive_s=keep_alive,
        header_timeout_s=header_timeout,
    )
    code = 1
    try:
        uvicorn.Server(config).run(sockets=[sock])
        code = 0
    except SystemExit as e:
        if e.code != 3:  # uvicorn's STARTUP_FAILURE, which would read as exit 3: an unknown model
            raise
        raise UserError(f"cannot listen on {host}:{port} (the reason is logged above)") from None
    finally:
        if recalibrator is not None:
            recalibrator.stop()
        stop_worker(app.state.batcher, app.state.request_timeout_ms / 1000, code)


def check_host(host: str, port: int) -> None:
    """A --host the resolver cannot turn into an address is bad usage (exit 2), said before any model loads;
    uvicorn would exit 3, the code of an unknown model."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise InputError(f"--host {host!r} is not an address of this machine's resolver ({e})") from None


def listen_socket(host: str, port: int) -> socket.socket:
    """The service's socket, bound as uvicorn binds it (SO_REUSEADDR; IPv6 for an address with a colon)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        taken = " (another server listens there: stop it, or choose --port)" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}{taken}") from None
    sock.set_inheritable(True)
    return sock


def stop_worker(batcher, timeout_s: float, code: int) -> None:
    """End the worker thread before the interpreter ends: one still inside MLX (loading a model) when Python tears
    down aborts the process ("terminate called without an active exception", exit 134).  After ``timeout_s`` the
    process ends at once with ``code`` (os._exit, no teardown); what it keeps is written already (the log and the
    feedback store commit each answer)."""
    batcher.stop(timeout_s)
    if batcher.thread.is_alive():
        click.echo(f"stopping: the worker is still inside a model after {timeout_s:g} s; not waiting for it", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
