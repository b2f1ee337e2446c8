"""Faults of the HTTP service (issue 17, items 9-14; issue 13's warm-up), each against stand-in tiers so no
model is loaded: abandoned work, health, monitoring, the event loop, connection limits, hardening.

Stand-ins hold the worker on an event, never for a time; waits poll for a state with a cap, and a
timeout on a client call only bounds how long a broken server can keep a test waiting.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from test_server import WAIT_S, metric_samples, post, raise_, raw_request, running, until

from mlx_intent.chain import Chain, Kind, ModelPool, Tier, build_chain, keyword_tier
from mlx_intent.cli.main import main
from mlx_intent.metrics import ClassificationLog, read_log
from mlx_intent.results import PassOver, Reason
from mlx_intent.serve.app import create_app
from mlx_intent.serve.batcher import Batcher, Expired, Job, QueueFull
from mlx_intent.serve.client import ClientError, IntentClient
from mlx_intent.serve.middleware import FIRST_BYTE_TIMEOUT_S, SHUTDOWN_GRACE_S, allowed_hosts, server_config
from mlx_intent.settings import QUEUE_SIZE, Settings, settings_home
from mlx_intent.stats import check, summarize

SETTINGS = Settings(latency_budget_ms=600_000.0, cache_size=0, batch_size=8)
ABSENT = "not downloaded (get it with: mlx-intent models pull big)"
CAP_S = 20  # how long a client waits on a server that should have answered at once


def reply(intent: str = "weather") -> dict:
    return {"primary_intent": intent, "confidence": 0.9, "all_intents": [intent]}


def absent_tier() -> Tier:
    return Tier(
        "big", lambda texts: [], lambda: raise_(PassOver(Reason.NOT_INSTALLED, ABSENT)), model="big", kind=Kind.LLM
    )


class Hold:
    """A model tier stand-in ("held") that answers at once until ``hold`` is set; then each run says it has
    begun (``entered``) and waits for ``release``.  The warm-up runs it before any test sets ``hold``."""

    def __init__(self) -> None:
        self.hold, self.entered, self.release = threading.Event(), threading.Event(), threading.Event()
        self.runs: list[list[str]] = []

    def tier(self, name: str = "held") -> Tier:
        def run(texts: list[str]) -> list[dict]:
            if self.hold.is_set():
                self.entered.set()
                self.release.wait(WAIT_S)
            self.runs.append(list(texts))
            return [reply() for _ in texts]

        return Tier(name, run, model=name, kind=Kind.LLM)


@pytest.fixture
def hold():
    hold = Hold()
    yield hold
    hold.release.set()  # never leave a worker waiting


def ready(base: str) -> None:
    until(lambda: httpx.get(f"{base}/healthz").status_code == 200, "/healthz ready")


# ---- 9: abandoned work does not hold the worker -----------------------------------------------------


@pytest.mark.parametrize("mode, max_batch, first", [("generate", 8, 1), ("score", 2, 2)])
def test_work_past_its_deadline_is_dropped_between_chunks(mode, max_batch, first):
    """A job whose deadline passes during its first chunk (a text in generate mode, max_batch texts in score
    mode) runs no further chunk: its request has been answered without it; the worker goes on at once."""
    runs, deadline = [], [0.0]

    def run(texts: list[str], mode: str | None = None) -> list[dict]:
        runs.append(list(texts))
        until(lambda: time.monotonic() > deadline[0], "deadline passed")  # the chunk outlasts the deadline
        return [reply() for _ in texts]

    chain = Chain([Tier("slow", run, model="slow", kind=Kind.LLM)], cache_size=0)
    batcher = Batcher(chain, "score", max_batch=max_batch, max_wait_s=0.0)
    deadline[0] = time.monotonic() + 0.2
    late = batcher.submit(Job([f"t{i}" for i in range(6)], mode, deadline=deadline[0]))
    batcher.start()
    with pytest.raises(Expired):
        late.future.result(WAIT_S)
    assert runs == [[f"t{i}" for i in range(first)]]
    after = batcher.submit(Job(["next"], mode))
    assert after.future.result(WAIT_S)[0]["primary_intent"] == "weather"
    batcher.stop(WAIT_S)


def test_cancelled_jobs_leave_the_queue_count_at_once():
    """The queue bound counts jobs still wanted: cancelled ones (requests that timed out) free their slot
    before the worker reaches them."""
    batcher = Batcher(Chain([keyword_tier(home=settings_home())]), "score", queue_size=2)  # not started: nothing taken
    for job in [batcher.submit(Job([t], "score")) for t in "ab"]:
        assert job.future.cancel()
    assert batcher.waiting() == 0
    kept = [batcher.submit(Job([t], "score")) for t in "cd"]
    with pytest.raises(QueueFull):
        batcher.submit(Job(["e"], "score"))
    batcher.start()
    assert [job.future.result(WAIT_S)[0]["tier"] for job in kept] == ["keyword"] * 2
    batcher.stop(WAIT_S)


def test_shutdown_does_not_wait_for_a_worker_held_by_abandoned_work(hold):
    app = create_app(
        SETTINGS, Chain([hold.tier(), keyword_tier(home=settings_home())], cache_size=0), request_timeout_ms=50
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        until(lambda: server.started, "uvicorn start")
        ready(base)
        hold.hold.set()
        body = post(base, "/v1/classify", {"text": "where is the ferry to Kadikoy"}).json()
        assert body["tier"] == "keyword" and hold.entered.is_set()
        server.should_exit = True
        thread.join(CAP_S)
        assert not thread.is_alive()  # the server ended while the worker is still held
        assert app.state.batcher.thread.is_alive()
    finally:
        hold.release.set()
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


# ---- 10 and issue 13: health from the tiers' states; answers during the warm-up -----------------------


def test_health_follows_the_primary_tier_after_the_warm_up():
    """Ready after the warm-up; degraded once a later load fails (the request is still answered); ready
    again once it loads, with no request needed (/healthz has the worker try again)."""
    broken = threading.Event()

    def load():
        if broken.is_set():
            raise PassOver(Reason.LOAD_FAILED, "load failed: OSError: damaged weights")

    tier = Tier("flaky", lambda texts: [reply() for _ in texts], load, model="flaky", kind=Kind.LLM)
    with running(create_app(SETTINGS, Chain([tier, keyword_tier(home=settings_home())], cache_size=0))) as (base, _):
        ready(base)
        assert httpx.get(f"{base}/healthz").json()["primary"] == "flaky"
        broken.set()
        assert post(base, "/v1/classify", {"text": "rain tomorrow?"}).json()["tier"] == "keyword"
        r = httpx.get(f"{base}/healthz")
        assert r.status_code == 503 and r.json()["status"] == "degraded"
        assert r.json()["detail"] == "flaky: load failed: OSError: damaged weights"
        broken.clear()
        ready(base)
        assert httpx.get(f"{base}/healthz").json() == {
            "ready": True,
            "status": "ready",
            "primary": "flaky",
            "detail": None,
        }


def test_a_request_during_the_warm_up_is_answered_at_once_by_the_tiers_that_are_ready():
    gate = threading.Event()
    loading = Tier(
        "loading", lambda texts: [reply() for _ in texts], lambda: gate.wait(WAIT_S), model="loading", kind=Kind.LLM
    )
    chain = Chain([absent_tier(), loading, keyword_tier(home=settings_home())], cache_size=0)
    try:
        with running(create_app(SETTINGS, chain, request_timeout_ms=600_000)) as (base, _):
            r = httpx.get(f"{base}/healthz")
            assert r.status_code == 503 and r.json()["status"] == "warming"
            body = httpx.post(f"{base}/v1/classify", json={"text": "nearest pharmacy please"}, timeout=CAP_S).json()
            events = list(IntentClient(base, timeout=CAP_S).stream("nearest pharmacy please"))
            assert httpx.get(f"{base}/healthz").json()["status"] == "warming"  # still loading meanwhile
            gate.set()
            ready(base)
    finally:
        gate.set()
    assert body["tier"] == "keyword" and body["primary_intent"] == "nearby_locations"
    assert [(f["tier"], f["kind"]) for f in body["fallbacks"]] == [("big", "not_installed"), ("loading", "loading")]
    assert body["fallbacks"][0]["reason"] == ABSENT and body["fallbacks"][1]["reason"].startswith("loading")
    assert body["runtime_fallback"] is False
    assert [e.name for e in events] == ["result"] and events[0].data["fallbacks"] == body["fallbacks"]


def test_the_warm_up_is_honest(tmp_path):
    """Issue 24, part 3: while an LLM loads, a tier not installed (not yet reached by the warm-up) says so, not
    "loading"; the encoder (an early tier, loaded first) answers; waiting for the LLM is kind ``loading``, which
    is no run-time fallback: not in the fallback rate, /metrics' fallback answers, nor ``stats --check``."""
    gate = threading.Event()
    llm = Tier("llm", lambda texts: [reply() for _ in texts], lambda: gate.wait(WAIT_S), model="llm", kind=Kind.LLM)
    gone = PassOver(Reason.NOT_INSTALLED, ABSENT)
    cold = Tier("cold", lambda texts: [], lambda: raise_(gone), model="cold", kind=Kind.LLM, absent=lambda: gone)
    # Its runs wait on each other beside the load: no latency budget passes it over meanwhile.
    encoder = Tier(
        "enc",
        lambda texts: [reply("restaurant") for _ in texts],
        model="enc",
        kind=Kind.ENCODER,
        early=True,
        budget_ms=1e-9,
    )
    log = tmp_path / "log.jsonl"
    chain = Chain([llm, cold, encoder, keyword_tier(home=settings_home())], cache_size=0, log=ClassificationLog(log))
    app = create_app(SETTINGS, chain, request_timeout_ms=600_000)
    states = app.state.batcher.states
    try:
        with running(app) as (base, _):
            until(lambda: getattr(states.get("llm"), "state", None) == "loading", "the encoder warmed up first")
            assert states["enc"].state == "ready"
            bodies = [post(base, "/v1/classify", {"text": f"fish near Galata, {i}?"}).json() for i in range(3)]
            samples = metric_samples(httpx.get(f"{base}/metrics").text)
            gate.set()
            ready(base)
    finally:
        gate.set()
    for body in bodies:
        assert body["tier"] == "enc" and body["runtime_fallback"] is False
        assert [(f["tier"], f["kind"]) for f in body["fallbacks"]] == [("llm", "loading"), ("cold", "not_installed")]
    assert samples.get("mlx_intent_fallback_answers_total", 0) == 0
    summary = summarize(read_log(log))
    assert summary["fallback"]["rate"] == 0 and summary["fallback"]["warming"]["count"] == 3
    assert not [a for a in check(summary) if a.metric == "fallback_rate"]


# ---- 11: monitoring agrees with what clients got --------------------------------------------------


def test_a_timed_out_request_is_logged_once_with_its_own_latency_and_absent_tiers_as_absent(hold, tmp_path):
    log = tmp_path / "log.jsonl"
    chain = Chain(
        [absent_tier(), hold.tier(), keyword_tier(home=settings_home())], cache_size=0, log=ClassificationLog(log)
    )
    app = create_app(SETTINGS, chain, request_timeout_ms=100)
    text = "how do I get to the airport from Taksim"
    with running(app) as (base, _):
        ready(base)
        hold.hold.set()
        late = post(base, "/v1/classify", {"text": text}).json()
        hold.hold.clear()
        hold.release.set()
        after = post(base, "/v1/classify", {"text": "rain tomorrow?"}).json()  # behind the held job: it is done
        samples = metric_samples(httpx.get(f"{base}/metrics").text)
    assert late["tier"] == "keyword"
    assert [(f["tier"], f["kind"]) for f in late["fallbacks"]] == [("big", "not_installed"), ("held", "timeout")]
    assert after["tier"] == "held"
    records = read_log(log)
    assert [r["text"] for r in records] == [text, "rain tomorrow?"]  # once each; the warm-up query is not logged
    assert records[0]["latency_ms"] == late["latency_ms"] and records[0]["tier"] == "keyword"
    assert records[1]["latency_ms"] == after["latency_ms"]
    assert chain.metrics.snapshot()["count"] == 2
    assert samples['mlx_intent_tier_absent{reason="not_installed",tier="big"}'] == 1
    assert samples['mlx_intent_fallbacks_total{reason="timeout",tier="held"}'] == 1
    assert not any(k.startswith("mlx_intent_fallbacks_total") and 'tier="big"' in k for k in samples)


def test_backing_off_words_and_metric_labels_do_not_grow_with_the_seconds(monkeypatch):
    """The pool's back-off words are the same at any second of it (stats counts reasons by their words);
    the Prometheus labels are reason kinds whatever the words."""
    pool = ModelPool(retry_after_s=60, home=settings_home())
    words = []
    for ago in (5, 17):
        pool.failed["tinyllama"] = (time.monotonic() - ago, "OSError: damaged")
        with pytest.raises(PassOver) as e:
            pool.get("tinyllama")
        words.append(str(e.value))
    assert words[0] == words[1] and "backing off" in words[0]

    seconds = iter(range(1000))

    def load():
        raise PassOver(Reason.LOAD_FAILED, f"load failed {next(seconds)}s ago, backing off")

    chain = Chain(
        [Tier("flaky", lambda texts: [], load, model="flaky", kind=Kind.LLM), keyword_tier(home=settings_home())],
        cache_size=0,
    )
    with running(create_app(SETTINGS, chain)) as (base, _):
        until(lambda: httpx.get(f"{base}/healthz").json()["status"] != "warming", "warm-up done")
        for text in ("hello", "rain?", "fish?"):
            post(base, "/v1/classify", {"text": text})
        samples = metric_samples(httpx.get(f"{base}/metrics").text)
    labels = [k for k in samples if k.startswith("mlx_intent_fallbacks_total{")]
    assert labels == ['mlx_intent_fallbacks_total{reason="load_failed",tier="flaky"}']


# ---- 12: the timeout fallback runs off the event loop ----------------------------------------------


def test_the_timeout_fallback_does_not_stall_the_event_loop(hold):
    """While the tiers below answer a timed-out request (held here), /healthz still answers."""
    below_entered, below_release = threading.Event(), threading.Event()

    def slow_below(texts: list[str]) -> list[dict]:
        below_entered.set()
        below_release.wait(CAP_S * 2)
        return [reply("restaurant") for _ in texts]

    chain = Chain([hold.tier(), Tier("below", slow_below), keyword_tier(home=settings_home())], cache_size=0)
    app = create_app(SETTINGS, chain, request_timeout_ms=50)
    with running(app) as (base, _):
        ready(base)
        hold.hold.set()
        try:
            with httpx.Client(timeout=CAP_S * 3) as client:
                answer = threading.Thread(target=lambda: client.post(f"{base}/v1/classify", json={"text": "hi"}))
                answer.start()
                until(below_entered.is_set, "the fallback is running")
                health = httpx.get(f"{base}/healthz", timeout=CAP_S)
                below_release.set()
                answer.join(WAIT_S)
        finally:
            below_release.set()
    assert health.status_code == 200


# ---- 13: connection limits; a refused body gets its 413 ---------------------------------------------


KEYWORD = Settings(chain=("keyword",))


@pytest.fixture(scope="module")
def keyword_chain(models_home) -> Chain:
    return build_chain(KEYWORD)


@pytest.fixture(scope="module")
def keyword_url(keyword_chain) -> str:
    with running(create_app(KEYWORD, keyword_chain)) as (base, _):
        yield base


@contextmanager
def raw(base: str):
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=CAP_S) as s:
        yield s


def test_a_body_over_the_limit_gets_its_413_on_a_busy_server(keyword_url):
    """Read to its end, a refused body reaches every client as a 413, after other requests and on a
    connection the client still sends on (urllib sends Connection: close; a reset would be "Broken pipe")."""
    base = keyword_url
    client = IntentClient(base, timeout=CAP_S)
    for size in (2_000_000, 8_000_000, 8_000_000):
        assert client.classify("ferry to Kadikoy")["tier"] == "keyword"
        with pytest.raises(ClientError) as e:
            client.classify("a" * size)
        assert e.value.status == 413, e.value
        body = json.dumps({"text": "a" * size}).encode()
        request = urllib.request.Request(
            f"{base}/v1/classify", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=CAP_S)
        assert e.value.code == 413 and "body too large" in json.loads(e.value.read())["error"]


@pytest.mark.parametrize("sent", [b"", b"POST /v1/classify HTTP/1.1\r\nHo"])
def test_a_connection_without_a_whole_request_head_is_closed(keyword_chain, sent):
    with running(create_app(KEYWORD, keyword_chain), header_timeout_s=0.2) as (base, _), raw(base) as s:
        s.sendall(sent)
        assert s.recv(1024) == b""  # closed by the server (a socket timeout here would fail the test)


def test_a_body_that_does_not_arrive_gets_a_408(keyword_chain):
    with running(create_app(KEYWORD, keyword_chain, body_timeout_s=0.2)) as (base, _), raw(base) as s:
        status, body = raw_request(s, b'Content-Length: 100\r\n\r\n{"text": ')
    assert status == 408 and body["error"] == "body not received within 0.2 s"


def test_idle_connections_over_half_the_limit_are_shed_not_the_request(keyword_chain):
    """Idle connections used to count against the limit (two of three made every request a plain 503); now at
    most half the limit may sit idle, the longest idle closed first (issue 26: 13)."""
    with running(create_app(KEYWORD, keyword_chain), limit_concurrency=3) as (base, server):
        with raw(base) as first, raw(base):
            until(lambda: len(server.server_state.connections) == 1, "one idle connection kept")
            assert first.recv(1) == b""  # the longest idle was closed
            assert httpx.get(f"{base}/healthz").status_code == 200


def test_serve_options_reach_uvicorn_and_a_public_bind_warns(models_home, monkeypatch):
    configs = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: configs.append(self.config))
    args = ["serve", "--port", "0", "--chain", "keyword", "--host", "0.0.0.0", "--allow-host", "assistant.local"]
    result = CliRunner().invoke(main, [*args, "--header-timeout", "3", "--body-timeout", "4", "--keep-alive", "2"])
    assert result.exit_code == 0, result.output
    assert "warning: --host 0.0.0.0 is reachable from other machines" in result.stderr
    (config,) = configs
    assert (config.timeout_keep_alive, config.app.state.limits["requests"]) == (2, QUEUE_SIZE + 64)
    assert config.http.keywords == {
        "head_timeout_s": 3,
        "first_byte_timeout_s": FIRST_BYTE_TIMEOUT_S,
        "max_idle": (QUEUE_SIZE + 64) // 2,
        "shutdown_grace_s": SHUTDOWN_GRACE_S,
    }
    guard = next(m for m in config.app.user_middleware if "hosts" in m.kwargs)
    assert guard.kwargs["hosts"] == {"localhost", "127.0.0.1", "[::1]", "assistant.local"}
    assert guard.kwargs["body_timeout_s"] == 4

    quiet = CliRunner().invoke(main, ["serve", "--port", "0", "--chain", "keyword"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr
    assert configs[1].app.state.limits["requests"] == QUEUE_SIZE + 64
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    for option in ("--allow-host", "--limit-concurrency", "--header-timeout", "--body-timeout", "--keep-alive"):
        assert option in help_text


def test_serve_on_a_port_in_use_exits_1_in_one_line_before_loading_anything(monkeypatch):
    """Issue 24, part 6: it loaded every model, then exited 3 (the code for an unknown model)."""
    from mlx_intent.cli import serve

    monkeypatch.setattr(serve, "chain_for", lambda settings: pytest.fail("a model tier was built"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--chain", "keyword", "--port", str(port)])
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "choose --port" in line


def test_serve_ends_the_process_rather_than_tear_down_under_a_worker_inside_mlx(monkeypatch):
    """A worker still busy after the stop's wait (a model load) would abort Python's teardown (exit 134, "terminate
    called without an active exception"): the process ends at once instead, with the run's code."""
    from mlx_intent.cli import serve

    release, ended = threading.Event(), []
    batcher = Batcher(Chain([keyword_tier(home=settings_home())]), "score")
    batcher.thread = threading.Thread(target=release.wait, daemon=True)
    batcher.thread.start()
    monkeypatch.setattr(os, "_exit", ended.append)
    try:
        serve.stop_worker(batcher, 0.05, 0)
    finally:
        release.set()
    assert ended == [0]
    batcher.thread.join(WAIT_S)
    serve.stop_worker(batcher, 0.05, 1)  # a worker that has ended: nothing to do
    assert ended == [0]


# ---- 14: hardening ---------------------------------------------------------------------------------


def test_only_this_servers_host_names_are_answered(keyword_url):
    base = keyword_url
    port = base.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{base}/metrics", headers={"Host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example:80"):
        r = httpx.get(f"{base}/v1/models", headers={"Host": host})
        assert r.status_code == 400 and "--allow-host" in r.json()["error"], host


def test_allowed_hosts_follow_the_bound_address():
    loopback = {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_hosts("127.0.0.1") == loopback
    assert allowed_hosts("0.0.0.0", ["Assistant.Local:8765"]) == loopback | {"assistant.local"}
    assert allowed_hosts("192.168.1.20") == loopback | {"192.168.1.20"}
    assert allowed_hosts("fe80::1") == loopback | {"[fe80::1]"}


def test_the_log_of_travellers_texts_is_created_owner_only(tmp_path):
    with ClassificationLog(tmp_path / "log.jsonl"):
        pass
    assert os.stat(tmp_path / "log.jsonl").st_mode & 0o777 == 0o600


def test_no_docs_page_from_a_cdn_but_the_openapi_description(keyword_url):
    assert httpx.get(f"{keyword_url}/docs").status_code == 404
    assert httpx.get(f"{keyword_url}/redoc").status_code == 404
    assert "/v1/classify" in httpx.get(f"{keyword_url}/openapi.json").json()["paths"]


def test_models_lists_every_tier_that_answers():
    """Issue 24, part 6: /v1/models listed the registry only, not the e5-small tier that answers."""
    gone = PassOver(Reason.NOT_INSTALLED, ABSENT)
    cold = Tier("cold", lambda texts: [], lambda: raise_(gone), model="cold", kind=Kind.LLM, absent=lambda: gone)
    encoder = Tier("enc", lambda texts: [reply() for _ in texts], model="enc", kind=Kind.ENCODER, early=True)
    with running(create_app(SETTINGS, Chain([cold, encoder, keyword_tier(home=settings_home())], cache_size=0))) as (
        base,
        _,
    ):
        ready(base)
        models = {m["name"]: m for m in httpx.get(f"{base}/v1/models").json()["models"]}
    assert models["llama-3.2-3b"]["tier"] is None  # the registry, as before
    assert models["cold"] == {"name": "cold", "state": "missing", "loaded": False, "tier": 0}
    assert models["enc"] == {"name": "enc", "state": "ready", "loaded": True, "tier": 1}
    assert models["keyword"] == {"name": "keyword", "state": "ready", "loaded": True, "tier": 2}
    assert models["general"]["tier"] == 3
