"""The HTTP service against the real bundled model: endpoints, dynamic batching, load behaviour, bad input,
an OpenAPI fuzz, restarts, and the client.

Servers run in-process (uvicorn on a loopback socket, in a thread) or as ``mlx-intent serve`` subprocesses.
Timing never decides a result: a gate on the LLM tier holds the worker while the queue fills, a request
times out, or the server shuts down; waits only poll for a state, with a generous cap.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from mlx_intent import schema
from mlx_intent.chain import Chain, Kind, Tier, build_chain, keyword_tier
from mlx_intent.normalize import MAX_TEXT_CHARS
from mlx_intent.results import PassOver, Reason
from mlx_intent.serve.app import create_app
from mlx_intent.serve.batcher import ABSENT_STATE, STREAM, Batcher, Job, TierState, health, warm, watched
from mlx_intent.serve.client import ClientError, IntentClient
from mlx_intent.serve.client import events as sse_events
from mlx_intent.serve.middleware import server_config
from mlx_intent.serve.schemas import MAX_BATCH_TEXTS, MAX_BODY_BYTES
from mlx_intent.settings import Settings, settings_home

MODEL = "smollm2-135m"
# A budget no run reaches, so answers never depend on the machine's speed; no cache, so every answer is computed.
SETTINGS = Settings(chain=(MODEL, "keyword"), latency_budget_ms=600_000.0, cache_size=0, batch_size=8)
TEXTS = [
    "hey there 👋",
    "whats around ortakoy mosque",
    "bu hafta sonu konser var mı",
    "كيف أروح من تقسيم إلى السلطان أحمد بالمترو",
    "café sympa pour bruncher à Moda",
    "ist kadiköy gut zum übernachten?",
    "How do I get from Sabiha Gökçen to Taksim at night?",
    "plan a day of museums for me",
]
# Social words with a request: the keyword tier's second opinion vetoes the model's greeting (rule 1).
SECOND_OPINION = ["Bonjour ! Un bon restaurant près de Galata ?", "merhaba, kadıköy'de iyi bir balıkçı var mı?"]
GENERATED = TEXTS[:4]  # generation writes other all_intents than scoring for some, so the mode shows
ANSWER = ("primary_intent", "confidence", "all_intents", "tier", "model", "fallbacks")
WAIT_S = 180  # a cap on polling for a state, never an assertion about speed


def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.01)


def answer(result: dict) -> tuple:
    return tuple(json.dumps(result[k], sort_keys=True) for k in ANSWER)


@contextmanager
def running(app, **limits):
    """``app`` served by uvicorn with the service's settings (``server_config``, ``limits`` passed on) on a
    free loopback port in a thread; yields (base URL, uvicorn server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, log_level="warning", **limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: server.started or not thread.is_alive(), "uvicorn start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


def wait_ready(url: str) -> None:
    until(lambda: httpx.get(f"{url}/healthz").status_code == 200, "/healthz ready")


def post(url: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=WAIT_S, **kw)


def warmed_then_held(app, url: str, gate: threading.Event) -> None:
    """Let the warm-up through (requests during it are answered without the worker), then hold the worker
    with a stream of its own (counted in no metric), so that the requests of the test queue up."""
    gate.set()
    wait_ready(url)
    gate.clear()
    holder = app.state.batcher.submit(Job([TEXTS[0]], STREAM, emit=lambda kind, data: None))
    until(holder.future.running, "the worker held")


def gated(chain: Chain, gate: threading.Event) -> Chain:
    """``chain`` with its LLM tiers waiting for ``gate`` before each use: holds the worker on demand."""

    def held(tier):
        def load():
            gate.wait()
            return tier.load()

        return replace(tier, load=load)

    tiers = [held(t) if t.model else t for t in chain.tiers]
    return chain.derive(tiers=tiers, cache_size=0)


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(models_home) -> Chain:
    return build_chain(SETTINGS)


@pytest.fixture(scope="module")
def expected(chain) -> dict:
    """Answers of one request at a time, straight from the chain, before any server uses it."""
    return {
        "score": {t: chain.classify(t) for t in TEXTS},
        "generate": {t: chain.classify(t, mode="generate") for t in GENERATED},
    }


@pytest.fixture(scope="module")
def cli_answers(models_home) -> dict:
    """What ``mlx-intent classify`` answers in each mode: a chain of its own per mode, from build_chain
    (never through the server's copies of a chain)."""
    texts = [*SECOND_OPINION, *GENERATED]
    chains = {mode: build_chain(replace(SETTINGS, mode=mode)) for mode in ("score", "generate")}
    return {mode: {t: chain.classify(t) for t in texts} for mode, chain in chains.items()}


@pytest.fixture(scope="module")
def url(chain, expected) -> str:
    with running(create_app(SETTINGS, chain, request_timeout_ms=600_000)) as (base, _):
        wait_ready(base)
        yield base


@pytest.fixture(scope="module")
def other_chain(models_home) -> Chain:
    """A second copy of the model for the servers whose worker a test holds (never two workers on one model)."""
    return build_chain(SETTINGS)


@pytest.fixture
def gate():
    gate = threading.Event()
    yield gate
    gate.set()  # never leave a worker waiting


@pytest.fixture(scope="module")
def keyword_url(models_home) -> str:
    """A server without a model (keyword tier, with the cache): fast enough to fuzz."""
    settings = Settings(chain=("keyword",))
    with running(create_app(settings, build_chain(settings))) as (base, _):
        wait_ready(base)
        yield base


# ---- endpoints ----------------------------------------------------------------------------------


def test_classify_answers_as_the_chain_does(url, expected):
    for text in TEXTS[:3]:
        r = post(url, "/v1/classify", {"text": text})
        assert r.status_code == 200, r.text
        body = r.json()
        assert answer(body) == answer(expected["score"][text])
        assert body["cached"] is False and body["latency_ms"] > 0 and body["lang"]


def test_generate_mode_is_honoured(url, expected):
    for text, want in expected["generate"].items():
        body = post(url, "/v1/classify", {"text": text, "mode": "generate"}).json()
        assert answer(body) == answer(want)
    assert any(answer(expected["generate"][t]) != answer(expected["score"][t]) for t in GENERATED)


def test_batch_endpoint_keeps_order(url, expected):
    r = post(url, "/v1/classify/batch", {"texts": TEXTS})
    assert r.status_code == 200, r.text
    assert [answer(x) for x in r.json()["results"]] == [answer(expected["score"][t]) for t in TEXTS]


def test_concurrent_requests_get_the_single_request_answers(url, expected):
    texts = TEXTS
    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(lambda t: post(url, "/v1/classify", {"text": t}), texts))
    assert [r.status_code for r in responses] == [200] * len(texts)
    assert [answer(r.json()) for r in responses] == [answer(expected["score"][t]) for t in texts]


def test_stream_writes_the_json_then_the_result(url, expected):
    with httpx.stream("POST", f"{url}/v1/classify/stream", json={"text": TEXTS[1]}, timeout=WAIT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    names = [e.name for e in events]
    assert names[-1] == "result" and names[:-1] and set(names[:-1]) == {"token"}
    written = json.loads("".join(e.data["text"] for e in events[:-1]))
    result = events[-1].data
    assert answer(result) == answer(expected["generate"][TEXTS[1]])  # what /v1/classify in generate mode says
    assert result["tier"] == MODEL and result["fallbacks"] == []  # the model's own answer, as it wrote it
    assert written["primary_intent"] == result["primary_intent"] == result["all_intents"][0]


def test_every_mode_and_the_stream_answer_as_the_cli_does(url, cli_answers):
    """The server's default mode, its other mode and the stream give the CLI's answers, rule-1 veto and
    multi-intent merge included."""
    vetoed = [t for t in SECOND_OPINION if cli_answers["generate"][t]["fallbacks"]]
    assert vetoed and all(cli_answers["generate"][t]["fallbacks"][0]["reason"].startswith("rule 1") for t in vetoed)
    for mode, answers in cli_answers.items():
        for text, want in answers.items():
            body = post(url, "/v1/classify", {"text": text, "mode": mode}).json()
            assert answer(body) == answer(want), (mode, text)
    for text in SECOND_OPINION:
        result = list(IntentClient(url).stream(text))[-1].data
        assert answer(result) == answer(cli_answers["generate"][text]), text


def test_stream_without_a_model_is_one_result_event(keyword_url):
    client = IntentClient(keyword_url)
    events = list(client.stream("nearest pharmacy please"))
    assert [e.name for e in events] == ["result"]
    assert events[0].data["tier"] == "keyword" and events[0].data["primary_intent"] == "nearby_locations"


def test_models_lists_the_registry(url):
    models = {m["name"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
    assert models[MODEL] == {"name": MODEL, "state": "ready", "loaded": True, "tier": 0}
    assert models["llama-3.2-3b"]["loaded"] is False and models["llama-3.2-3b"]["tier"] is None


def test_health_is_503_until_the_primary_tier_is_loaded(other_chain, gate):
    with running(create_app(SETTINGS, gated(other_chain, gate))) as (base, _):
        r = httpx.get(f"{base}/healthz")
        assert r.status_code == 503 and r.json()["status"] == "warming" and r.json()["ready"] is False
        gate.set()
        wait_ready(base)
        assert httpx.get(f"{base}/healthz").json() == {
            "ready": True,
            "status": "ready",
            "primary": MODEL,
            "detail": None,
        }


def test_health_skips_a_tier_that_is_not_downloaded(models_home):
    # Llama 3.1 8B: no test pulls it into the session's Hub cache (the stand-ins are the 3B and TinyLlama)
    settings = Settings(chain=("llama-3.1-8b", "keyword"))
    with running(create_app(settings, build_chain(settings))) as (base, _):
        wait_ready(base)
        assert httpx.get(f"{base}/healthz").json()["primary"] == "keyword"


def test_readiness_decides_on_the_reason_kind():
    def declines(kind: Reason, words: str) -> Tier:
        return Tier(MODEL, lambda texts: [], lambda: raise_(PassOver(kind, words)), model=MODEL, kind=Kind.LLM)

    def after_warm_up(tier: Tier) -> dict:
        states = {}
        chain = watched(Chain([tier, Tier("keyword", lambda texts: [])]), states)
        warm(chain, states)
        return health(chain, states)

    assert after_warm_up(declines(Reason.NOT_INSTALLED, "gone"))["primary"] == "keyword"
    assert after_warm_up(declines(Reason.TOO_LARGE, "big"))["primary"] == "keyword"
    assert after_warm_up(declines(Reason.LOAD_FAILED, "not downloaded (words)")) == {
        "ready": False,
        "status": "degraded",
        "primary": None,
        "detail": f"{MODEL}: not downloaded (words)",
    }


def raise_(e: Exception):
    raise e


def test_health_stays_503_when_the_primary_tier_fails_to_load(models_home):
    def broken():
        raise PassOver(Reason.LOAD_FAILED, "load failed: OSError: damaged weights")

    tier = Tier(MODEL, lambda texts: [], broken, model=MODEL, kind=Kind.LLM)
    chain = Chain([tier, keyword_tier(home=settings_home())])
    with running(create_app(SETTINGS, chain)) as (base, _):
        until(lambda: httpx.get(f"{base}/healthz").json()["status"] != "warming", "warm-up done")
        r = httpx.get(f"{base}/healthz")
        assert r.status_code == 503 and r.json()["status"] == "degraded"
        assert r.json()["detail"] == f"{MODEL}: load failed: OSError: damaged weights"
        assert post(base, "/v1/classify", {"text": "hello"}).json()["tier"] == "keyword"  # it still answers


def test_metrics_count_requests_answers_and_memory(url, expected):
    text = next(t for t in TEXTS if expected["score"][t]["fallbacks"])
    post(url, "/v1/classify", {"text": text})
    post(url, "/v1/classify", {"text": ""})
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    assert samples['mlx_intent_http_requests_total{endpoint="/v1/classify",status="200"}'] >= 1
    assert samples['mlx_intent_http_requests_total{endpoint="/v1/classify",status="422"}'] >= 1
    assert samples['mlx_intent_http_request_seconds_count{endpoint="/v1/classify"}'] >= 2
    result = expected["score"][text]
    assert samples[f'mlx_intent_intents_total{{intent="{result["primary_intent"]}"}}'] >= 1
    assert samples[f'mlx_intent_tiers_total{{tier="{result["tier"]}"}}'] >= 1
    for f in result["fallbacks"]:
        assert samples[f'mlx_intent_fallbacks_total{{reason="{f["kind"]}",tier="{f["tier"]}"}}'] >= 1
    assert samples["mlx_intent_peak_memory_bytes"] > 0
    assert samples["mlx_intent_batch_texts_count"] >= 1
    assert samples["mlx_intent_cache_hits_total"] == 0  # the cache is off here
    assert samples["mlx_intent_queue_jobs"] == 0


def test_metrics_count_cache_hits(keyword_url):
    first = post(keyword_url, "/v1/classify", {"text": "ok"}).json()
    second = post(keyword_url, "/v1/classify", {"text": "ok"}).json()
    assert first["cached"] is False and second["cached"] is True
    assert metric_samples(httpx.get(f"{keyword_url}/metrics").text)["mlx_intent_cache_hits_total"] >= 1


def test_each_answer_is_checked_once(models_home):
    """The answer's model checks each answer once: by the route's response model, or the stream's own check
    (it was checked twice: model_validate, then FastAPI again).  Counted by its confidence validator."""
    from fastapi.testclient import TestClient

    from mlx_intent.serve import schemas

    settings = Settings(chain=("keyword",), cache_size=0)
    calls = []

    def count(frame, event, arg):
        if event == "call" and frame.f_code is schemas._number.__code__:
            calls.append(1)

    threading.setprofile(count)  # the threads started from here: the client's event loop runs the app
    try:
        with TestClient(create_app(settings, build_chain(settings)), base_url="http://127.0.0.1") as client:
            assert client.get("/healthz").status_code == 200
            for path, body, answers in [
                ("/v1/classify", {"text": TEXTS[0]}, 1),
                ("/v1/classify/batch", {"texts": TEXTS[:3]}, 3),
                ("/v1/classify/stream", {"text": TEXTS[1]}, 1),
            ]:
                calls.clear()
                assert client.post(path, json=body).status_code == 200
                assert len(calls) == answers, path
    finally:
        threading.setprofile(None)


def test_metrics_and_results_tell_absent_tiers_from_runtime_fallbacks():
    """A tier not installed here is a gauge (a configuration fact), never a fallback; a tier passed over at
    run time (unsure) is counted by kind and in the answers that fell back.  Latency per query is the
    request's time over its texts."""

    def absent():
        raise PassOver(Reason.NOT_INSTALLED, "not downloaded (get it with: mlx-intent models pull big)")

    def picky(texts):
        return [
            {"primary_intent": "weather", "confidence": 0.9 if "rain" in t else 0.2, "all_intents": ["weather"]}
            for t in texts
        ]

    chain = Chain(
        [
            Tier("big", lambda texts: [], absent, model="big", kind=Kind.LLM),
            Tier("picky", picky, threshold=0.5),
            keyword_tier(home=settings_home()),
        ],
        cache_size=0,
    )
    with running(create_app(SETTINGS, chain)) as (base, _):
        until(lambda: httpx.get(f"{base}/healthz").json()["status"] != "warming", "warm-up done")
        rain = post(base, "/v1/classify", {"text": "rain tomorrow?"}).json()
        assert rain["tier"] == "picky" and rain["runtime_fallback"] is False
        assert [f["kind"] for f in rain["fallbacks"]] == ["not_installed"]
        assert rain["latency_per_query_ms"] == pytest.approx(rain["latency_ms"], abs=0.01)
        both = post(base, "/v1/classify/batch", {"texts": ["where can I eat fish?", "hello!"]}).json()["results"]
        for r in both:
            assert r["tier"] == "keyword" and r["runtime_fallback"] is True
            assert [f["kind"] for f in r["fallbacks"]] == ["not_installed", "low_confidence"]
            assert r["latency_per_query_ms"] == pytest.approx(r["latency_ms"] / 2, abs=0.01)
        samples = metric_samples(httpx.get(f"{base}/metrics").text)
    assert samples['mlx_intent_tier_absent{reason="not_installed",tier="big"}'] == 1
    assert samples['mlx_intent_fallbacks_total{reason="low_confidence",tier="picky"}'] == 2
    assert not any(k.startswith("mlx_intent_fallbacks_total") and 'tier="big"' in k for k in samples)
    assert samples["mlx_intent_fallback_answers_total"] == 2
    assert samples['mlx_intent_tiers_total{tier="picky"}'] + samples['mlx_intent_tiers_total{tier="keyword"}'] == 3


def metric_samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


# ---- batching and load --------------------------------------------------------------------------


def test_queued_requests_run_as_one_batch_with_the_single_answers(other_chain, gate, expected):
    app = create_app(SETTINGS, gated(other_chain, gate), request_timeout_ms=600_000)
    with running(app) as (base, _):
        warmed_then_held(app, base, gate)
        with ThreadPoolExecutor(len(TEXTS)) as pool:
            futures = [pool.submit(post, base, "/v1/classify", {"text": t}) for t in TEXTS]
            until(lambda: app.state.batcher.jobs.qsize() == len(TEXTS), "all requests queued")
            gate.set()
            responses = [f.result() for f in futures]
        assert [answer(r.json()) for r in responses] == [answer(expected["score"][t]) for t in TEXTS]
        samples = metric_samples(httpx.get(f"{base}/metrics").text)
        assert (samples["mlx_intent_batch_texts_count"], samples["mlx_intent_batch_texts_sum"]) == (1, len(TEXTS))


def fake_chain(gate: threading.Event, busy: threading.Event, runs: list) -> Chain:
    """A chain whose LLM tier answers restaurant in score mode (its own) and weather in generate mode; each run
    waits for ``gate`` (``busy`` tells it has begun) and is recorded in ``runs`` as (intent, texts)."""

    def run(texts: list[str], mode: str | None = None) -> list[dict]:
        intent = "weather" if mode == "generate" else "restaurant"
        busy.set()
        gate.wait()
        runs.append((intent, list(texts)))
        return [{"primary_intent": intent, "confidence": 0.9, "all_intents": [intent]} for _ in texts]

    return Chain([Tier("llm", run, model="llm", kind=Kind.LLM)], cache_size=0)


def test_the_worker_batches_by_mode_and_skips_cancelled_jobs():
    """Held back by a gate, queued jobs of two modes come out as one batch per mode, in order (generate mode
    runs it text by text, as generation goes anyway); a job cancelled before its turn (its request timed
    out) is never run."""
    gate, busy, runs = threading.Event(), threading.Event(), []
    batcher = Batcher(fake_chain(gate, busy, runs), "score", max_batch=8, max_wait_s=0.0)
    first = batcher.submit(Job(["a"], "score"))
    batcher.start()
    until(busy.is_set, "first job running")
    jobs = [batcher.submit(Job([t], m)) for t, m in [("b", "score"), ("c", "score"), ("d", "generate")]]
    dropped = batcher.submit(Job(["e"], "generate"))
    assert dropped.future.cancel()
    last = batcher.submit(Job(["f"], "generate"))
    gate.set()
    batcher.stop(WAIT_S)  # queued behind them: they all run first
    assert not batcher.thread.is_alive()
    assert runs == [("restaurant", ["a"]), ("restaurant", ["b", "c"]), ("weather", ["d"]), ("weather", ["f"])]
    intents = [j.future.result()[0]["primary_intent"] for j in [first, *jobs, last]]
    assert intents == ["restaurant"] * 3 + ["weather"] * 2


def test_the_worker_keeps_batches_within_their_deadlines():
    """At 100 s a text (as if measured), a job due in 10 s runs alone: at the head of a batch a job always
    runs, so the estimate keeps learning (70 s after that quick run); then jobs due in 180 s batch two by two."""
    gate, busy, runs = threading.Event(), threading.Event(), []
    batcher = Batcher(fake_chain(gate, busy, runs), "score", max_batch=8, max_wait_s=0.0)
    batcher.per_text["score"] = 100.0
    first = batcher.submit(Job(["a"], "generate"))  # holds the worker; its time is learnt for generate only
    batcher.start()
    until(busy.is_set, "first job running")
    now = time.monotonic()
    jobs = [batcher.submit(Job([t], "score", deadline=now + due)) for t, due in [("soon", 10), *zip("bcd", [180] * 3)]]
    gate.set()
    batcher.stop(WAIT_S)
    assert not batcher.thread.is_alive()
    assert runs == [("weather", ["a"]), ("restaurant", ["soon"]), ("restaurant", ["b", "c"]), ("restaurant", ["d"])]
    assert first.future.done() and all(j.future.done() for j in jobs)


def test_full_queue_answers_503_with_retry_after(other_chain, gate):
    app = create_app(SETTINGS, gated(other_chain, gate), queue_size=2, request_timeout_ms=600_000)
    with running(app) as (base, _):
        warmed_then_held(app, base, gate)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post, base, "/v1/classify", {"text": t}) for t in TEXTS[:2]]
            until(lambda: app.state.batcher.jobs.qsize() == 2, "queue full")
            refused = post(base, "/v1/classify", {"text": TEXTS[2]})
            gate.set()
            assert [f.result().status_code for f in waiting] == [200, 200]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "server busy"


def test_request_timeout_answers_from_the_keyword_tier(other_chain, gate):
    app = create_app(SETTINGS, gated(other_chain, gate), request_timeout_ms=50)
    with running(app) as (base, _):
        warmed_then_held(app, base, gate)
        body = post(base, "/v1/classify", {"text": "how do I get to the airport from Taksim"}).json()
        events = list(IntentClient(base).stream("how do I get to the airport from Taksim"))
        gate.set()
    timeout = {"tier": MODEL, "reason": "timeout: no answer within 50 ms", "kind": "timeout"}
    assert body["tier"] == "keyword" and body["primary_intent"] == "airport_transport"
    assert body["fallbacks"] == [timeout]
    assert [e.name for e in events] == ["result"] and events[0].data["fallbacks"] == [timeout]


def test_shutdown_finishes_requests_in_flight(other_chain, gate):
    app = create_app(SETTINGS, gated(other_chain, gate), request_timeout_ms=600_000)
    with running(app) as (base, server):
        port = int(base.rsplit(":", 1)[1])
        warmed_then_held(app, base, gate)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, base, "/v1/classify", {"text": TEXTS[0]})
            until(lambda: app.state.batcher.jobs.qsize() == 1, "request queued")
            server.should_exit = True
            until(lambda: not accepts(port), "listener closed")
            gate.set()
            r = in_flight.result()
        assert r.status_code == 200 and r.json()["tier"] in (MODEL, "keyword")
    assert not app.state.batcher.thread.is_alive()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ---- bad input ----------------------------------------------------------------------------------

LONG = "a" * (MAX_TEXT_CHARS + 1)


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/v1/classify", {}, 422, "body.text: Field required"),
        ("/v1/classify", {"txt": "hello"}, 422, "body.text: Field required"),
        ("/v1/classify", {"text": 42}, 422, "body.text: Input should be a valid string"),
        ("/v1/classify", {"text": None}, 422, "body.text: Input should be a valid string"),
        ("/v1/classify", {"text": ["a"]}, 422, "body.text: Input should be a valid string"),
        ("/v1/classify", {"text": ""}, 422, "body.text: String should have at least 1 character"),
        ("/v1/classify", {"text": " \n\t "}, 422, "text is empty"),
        ("/v1/classify", {"text": "\x00\x1b\u200b"}, 422, "text is empty"),
        ("/v1/classify", {"text": LONG}, 422, f"at most {MAX_TEXT_CHARS} characters"),
        ("/v1/classify", {"text": "hi", "mode": "fast"}, 422, "body.mode: Input should be 'score' or 'generate'"),
        ("/v1/classify", ["hello"], 422, "body: Input should be a valid dictionary"),
        ("/v1/classify/batch", {"texts": []}, 422, "body.texts: List should have at least 1 item"),
        ("/v1/classify/batch", {"texts": ["a"] * (MAX_BATCH_TEXTS + 1)}, 422, f"at most {MAX_BATCH_TEXTS} items"),
        ("/v1/classify/batch", {"texts": "hello"}, 422, "body.texts: Input should be a valid list"),
        ("/v1/classify/batch", {"texts": ["ok", 3]}, 422, "body.texts.1: Input should be a valid string"),
        ("/v1/classify/batch", {"texts": ["ok", " "]}, 422, "body.texts.1: Value error, text is empty"),
        ("/v1/classify/stream", {"text": ""}, 422, "body.text"),
    ],
)
def test_bad_bodies_name_the_problem(url, path, body, status, words):
    r = post(url, path, body)
    assert r.status_code == status
    assert set(r.json()) == {"error", "detail"} and words in r.json()["error"]


def raw_request(s: socket.socket, rest: bytes) -> tuple[int, dict]:
    """Send a POST /v1/classify head (ending with ``rest``: more headers, the blank line, part of a body) on
    socket ``s``; the status and JSON body of the answer."""
    s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + rest)
    response = http.client.HTTPResponse(s)
    response.begin()
    return response.status, json.loads(response.read())


def raw_post(url: str, body: bytes, content_type: str | None = "application/json", **kw) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.post(f"{url}/v1/classify", content=body, headers=headers, timeout=WAIT_S, **kw)


@pytest.mark.parametrize(
    "body, content_type, status, words",
    [
        (b'{"text": ', "application/json", 400, "invalid JSON"),
        (b"text=hello", "application/json", 400, "invalid JSON"),
        (b'{"text": "\xff\xfe"}', "application/json", 400, "error parsing the body"),
        (b'{"text": "\\ud800"}', "application/json", 422, "body.text: Input should be a valid string"),
        (b'{"text": "hello"}', "text/plain", 415, "Content-Type: application/json"),
        (b'{"text": "hello"}', None, 415, "Content-Type: application/json"),
        (b'{"text": "' + b"a" * MAX_BODY_BYTES + b'"}', "application/json", 413, "body too large"),
    ],
)
def test_bad_bytes_name_the_problem(url, body, content_type, status, words):
    r = raw_post(url, body, content_type)
    assert r.status_code == status
    assert set(r.json()) == {"error", "detail"} and words in r.json()["error"]


def test_a_chunked_body_is_cut_off_at_the_limit(url):
    chunks = iter([b'{"text": "'] + [b"a" * 4096] * 32 + [b'"}'])  # no Content-Length: counted as it arrives
    r = raw_post(url, chunks)
    assert r.status_code == 413 and "body too large" in r.json()["error"]


def test_a_huge_content_length_is_refused_before_the_body(url):
    """The server answers from the headers alone: no body is ever sent (the read would wait forever)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        status, body = raw_request(s, b"Content-Length: 1000000000\r\n\r\n")
    assert status == 413 and "body too large" in body["error"]


def test_unknown_paths_and_methods_answer_json(url):
    for r, status in ((httpx.get(f"{url}/nope"), 404), (httpx.get(f"{url}/v1/classify"), 405)):
        assert r.status_code == status and set(r.json()) == {"error", "detail"}


@settings(max_examples=10, deadline=None)
@given(text=st.text(min_size=1, max_size=300))
def test_any_text_gets_an_answer_or_a_422(url, text):
    r = post(url, "/v1/classify", {"text": text})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:  # an answer by the schema, from a tier of the chain, every tier above it passed over
        body = r.json()
        schema.validate(schema.answer_of(body))
        names = [*SETTINGS.chain, "general"]
        assert [f["tier"] for f in body["fallbacks"]] == names[: names.index(body["tier"])], body
    else:
        assert all(c.isspace() or unicodedata.category(c).startswith("C") for c in text), text  # nothing to read


# ---- fuzz ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_fuzz_never_gets_a_server_error(keyword_url, mode):
    """Every operation of the OpenAPI description with what fits it, and every body with what breaks it."""
    schema = schemathesis.openapi.from_url(f"{keyword_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/classify", "/v1/classify/batch", "/v1/classify/stream"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case):
            case.call_and_validate(checks=[not_a_server_error])

        call()


# ---- processes and the client -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(port: int, models_home: str, log):
    """``mlx-intent serve`` as a subprocess, its output to ``log`` (a pipe nobody reads would stall it)."""
    cmd = [sys.executable, "-m", "mlx_intent", "serve", "--port", str(port), "--chain", f"{MODEL},keyword"]
    env = {**os.environ, "MLX_INTENT_HOME": models_home}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def serving(proc: subprocess.Popen, log_path, client: IntentClient) -> bool:
    assert proc.poll() is None, log_path.read_text()
    try:
        return client.health()["ready"]
    except ClientError:
        return False


def test_restart_serves_again(models_home, tmp_path):
    port = free_port()
    client = IntentClient(f"http://127.0.0.1:{port}", timeout=WAIT_S)
    for run in range(2):
        path = tmp_path / f"serve{run}.log"
        with path.open("w") as log, serve_process(port, models_home, log) as proc:
            until(partial(serving, proc, path, client), "server ready")
            assert client.classify("ferry to Kadıköy")["tier"] in (MODEL, "keyword")
            proc.send_signal(signal.SIGTERM)
            proc.wait(WAIT_S)
        output = path.read_text()
        assert proc.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal once drained
        assert "Application shutdown complete" in output


def test_client_against_the_server(url, expected):
    client = IntentClient(url, timeout=WAIT_S)
    assert answer(client.classify(TEXTS[0])) == answer(expected["score"][TEXTS[0]])
    assert answer(client.classify(TEXTS[1], mode="generate")) == answer(expected["generate"][TEXTS[1]])
    assert [answer(r) for r in client.classify_batch(TEXTS[:3])] == [answer(expected["score"][t]) for t in TEXTS[:3]]
    events = list(client.stream(TEXTS[1]))
    assert events[-1].name == "result" and {e.name for e in events[:-1]} == {"token"}
    assert client.health()["ready"] is True
    assert {m["name"]: m["loaded"] for m in client.models()}[MODEL] is True


def test_client_raises_the_server_error(url):
    with pytest.raises(ClientError, match="422 body.text: Value error, text is empty") as e:
        IntentClient(url).classify("   ")
    assert e.value.status == 422 and e.value.detail[0]["loc"] == "body.text"
    with pytest.raises(ClientError) as e:
        IntentClient(url).classify_batch(["ok"] * (MAX_BATCH_TEXTS + 1))
    assert e.value.status == 422


def test_client_says_when_nothing_listens():
    with pytest.raises(ClientError, match="cannot reach") as e:
        IntentClient(f"http://127.0.0.1:{free_port()}", timeout=5).health()
    assert e.value.status is None


def test_the_server_holds_one_chain_and_names_the_mode_per_call():
    """The worker asks its one chain for a job's mode (the LLM tier's own run, so nothing is re-implemented and
    its memory stamp kept); the chain below the model tiers, for a request that timed out, is made once."""
    from mlx_intent.serve.batcher import fallback_chain
    from mlx_intent.serve.service import WARMING_UP, Service

    modes = []

    def run(texts: list[str], mode: str | None = None) -> list[dict]:
        modes.append(mode)
        return [{"primary_intent": "weather", "confidence": 0.9, "all_intents": ["weather"]} for _ in texts]

    chain = Chain([Tier("llm", run, model="llm", kind=Kind.LLM), keyword_tier(home=settings_home())], cache_size=8)
    states: dict = {}
    served = watched(chain, states)
    batcher = Batcher(served, "score", max_wait_s=0.0)
    batcher.start()
    try:
        for mode in ("score", "generate", "generate"):
            assert batcher.submit(Job(["rain?"], mode)).future.result(WAIT_S)[0]["primary_intent"] == "weather"
    finally:
        batcher.stop(WAIT_S)
    assert modes == [None, "generate"]  # the second generate answer came from the cache, kept apart per mode
    assert not served.recording  # the server keeps each request's answers itself
    service = Service(Settings(), chain, timeout_ms=1000, max_wait_ms=0, queue_size=4, batching=False, sessions=None)
    assert set(service.chains_below) == {WARMING_UP, service.timed_out}  # made once, at start-up
    made = dict(service.chains_below)
    assert service.below(["rain?"], service.timed_out)[0]["fallbacks"][0]["kind"] == "timeout"
    assert service.chains_below == made and service.chains_below[service.timed_out] is made[service.timed_out]
    below = fallback_chain(served, Reason.TIMEOUT, "timeout", states)
    assert below.classify("rain?")["fallbacks"][0]["kind"] == "timeout"
    states["llm"] = TierState(ABSENT_STATE, Reason.NOT_INSTALLED, "gone")  # decided at each call, from the states
    assert below.classify("rain?")["fallbacks"][0]["kind"] == "not_installed"
