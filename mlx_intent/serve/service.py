"""The server's state and work, without HTTP: what the routes share (mlx-lm's model provider and response
generator in one).

One ``Service`` holds the chain as served (its tier loads watched; the mode named per call), the batcher whose
single worker thread owns MLX, the metrics, the conversations and the warm-up.  A request goes to the
worker; one that waits longer than the request timeout, or comes while the warm-up loads the models, is
answered at once by the tiers below them, on a thread (never on the event loop, which must keep answering
/healthz).  Each answered request is counted, logged and kept once, with its own latency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from mlx_intent.chain import Chain, timing_fields
from mlx_intent.context import MAX_CONTEXT_TURNS
from mlx_intent.feedback import store as feedback_store
from mlx_intent.models import registry
from mlx_intent.results import Reason
from mlx_intent.serve.batcher import (
    ABSENT_STATE,
    READY,
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
from mlx_intent.serve.metrics import Prometheus, register_metrics
from mlx_intent.serve.schemas import FeedbackRequest, Turn
from mlx_intent.serve.sessions import Sessions
from mlx_intent.settings import Settings

LOADING = "loading: the server is warming up its models; answered by the tiers that are ready"
WARMING_UP = (Reason.LOADING, LOADING)


class Refused(Exception):
    """The batcher took no job: its queue is full, or the server is shutting down (503, with Retry-After)."""

    def __init__(self, words: str, detail: str):
        super().__init__(words)
        self.words, self.detail = words, detail


class Abandoned(Exception):
    """The client closed the request before its answer: counted apart, neither logged nor kept (499)."""


class Service:
    """The chain as served, its batcher, metrics and conversations, and the warm-up; ``classify`` answers
    turns, ``submit`` queues a job for the worker, ``answered`` times, counts and keeps what is answered."""

    def __init__(
        self,
        settings: Settings,
        chain: Chain,
        *,
        timeout_ms: float,
        max_wait_ms: float,
        queue_size: int,
        batching: bool,
        sessions: Sessions | None,
    ):
        self.settings, self.chain, self.timeout_ms = settings, chain, timeout_ms
        self.states: dict[str, TierState] = {}
        self.served = watched(chain, self.states)  # loads recorded; answers not: the server keeps each request's once
        self.batcher = Batcher(
            self.served,
            settings.mode,
            max_batch=settings.batch_size if batching else 1,
            max_wait_s=max_wait_ms / 1000 if batching else 0.0,
            queue_size=queue_size,
            states=self.states,
        )
        self.prometheus = Prometheus(self.batcher, chain)
        if chain.store is not None:
            register_metrics(self.prometheus.registry, chain.store)
        self.batcher.on_batch = self.prometheus.batches.observe
        self.sessions = sessions if sessions is not None else Sessions()
        self.up, self.probe, self.stopping = Job([], WARM), None, False  # the warm-up; a degraded tier's retry
        self.timed_out = (Reason.TIMEOUT, f"timeout: no answer within {timeout_ms:g} ms")
        # The chain below the model tiers for each reason a request is answered without the worker, made once.
        whys = (WARMING_UP, self.timed_out)
        self.chains_below = {why: fallback_chain(self.served, *why, self.states) for why in whys}

    def start(self) -> None:
        self.batcher.start()
        self.batcher.submit(self.up)

    async def stop(self) -> None:
        self.stopping = True
        # uvicorn has let requests in flight finish, each within its timeout; the worker checks deadlines
        # between chunks, so one timeout more is all it can need (it is a daemon thread after that)
        await asyncio.to_thread(self.batcher.stop, self.timeout_ms / 1000)

    def warming(self) -> bool:
        return not self.up.future.done()

    def submit(self, texts: list[str], mode: str, emit=None, user: str | None = None, contexts=None) -> Job:
        deadline = time.monotonic() + self.timeout_ms / 1000
        try:
            return self.batcher.submit(Job(texts, mode, emit=emit, deadline=deadline, user=user, contexts=contexts))
        except QueueFull as e:
            raise Refused("server busy", str(e)) from None
        except Closed as e:
            raise Refused("shutting down", str(e)) from None

    def below(self, texts: list[str], why: tuple[Reason, str], user: str | None = None, contexts=None) -> list[dict]:
        """The answers of the tiers below the model tiers (those absent here said so; during the warm-up the
        encoder too, once loaded): for a request that timed out or came during the warm-up, ``why`` (kind,
        words).  Called on a thread: its log and fsync stay off the loop."""
        return self.chains_below[why].classify_batch(texts, users=[user] * len(texts), contexts=contexts)

    def shown(self, result: dict, start: float, texts: int = 1) -> dict:
        """The result as answered: the request's own latency, counted in /metrics."""
        latency = (time.perf_counter() - start) * 1000
        out = {**result, **timing_fields(latency, texts)}
        self.prometheus.answered(out)
        return out

    def record(self, texts: list[str], outs: list[dict], user: str | None = None, contexts=None) -> None:
        """Count, log and keep what was answered, once per text (on a thread: the log fsyncs)."""
        self.chain.keep(texts, outs, users=[user] * len(texts), contexts=contexts)

    async def answered(
        self, texts: list[str], results: list[dict], start: float, user: str | None = None, contexts=None
    ) -> list[dict]:
        """The results as shown, recorded (checked against ClassifyResult once, by whoever sends them)."""
        outs = [self.shown(r, start, len(texts)) for r in results]
        await asyncio.to_thread(self.record, texts, outs, user, contexts)
        return outs

    def contexts_of(self, turns: list[Turn]) -> list[tuple[str, ...]]:
        """Each turn's earlier turns: its own context, or its session's (with the batch's earlier turns of the
        same session after them), the newest MAX_CONTEXT_TURNS."""
        said: dict[str, list[str]] = {}
        out = []
        for turn in turns:
            if turn.session is None:
                out.append(tuple(turn.context or ()))
                continue
            kept = said.setdefault(turn.session, list(self.sessions.context(turn.session)))
            out.append(tuple(kept[-MAX_CONTEXT_TURNS:]))
            kept.append(turn.text)
        return out

    async def classify(
        self,
        turns: list[Turn],
        mode: str | None,
        user: str | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> list[dict]:
        """The answers to ``turns``, in order (raises Refused, or Abandoned if ``disconnected`` says so)."""
        start = time.perf_counter()
        texts, contexts = [t.text for t in turns], self.contexts_of(turns)
        if self.warming():
            results = await asyncio.to_thread(self.below, texts, WARMING_UP, user, contexts)
        else:
            job = self.submit(texts, mode or self.settings.mode, user=user, contexts=contexts)
            try:
                results = await asyncio.wait_for(asyncio.wrap_future(job.future), self.timeout_ms / 1000)
            except (asyncio.TimeoutError, Expired):  # the job is cancelled if not begun, dropped if begun
                results = await asyncio.to_thread(self.below, texts, self.timed_out, user, contexts)
        if disconnected is not None and await disconnected():  # nobody to deliver to: count it apart
            self.prometheus.abandoned.inc()
            raise Abandoned("the client closed the request before its answer")
        for turn in turns:  # answered: the turns join their sessions
            if turn.session is not None:
                self.sessions.add(turn.session, turn.text)
        return await self.answered(texts, results, start, user, contexts)

    def feedback(self, body: FeedbackRequest) -> dict:
        """Store a correction or confirmation of an answer (raises FeedbackError, StoreError)."""
        fields = {"correct": body.correct, "replace": body.replace, "source": "api"}
        return feedback_store.add_feedback(self.chain.store, body.id, body.primary_intent, body.all_intents, **fields)

    def readiness(self) -> dict:
        """/healthz's body, decided from the tiers' states now; a degraded server queues one warm-up job at a
        time, which retries the failing load (after the pool's back-off)."""
        if self.stopping:
            body = {"ready": False, "status": "stopping", "primary": None, "detail": None}
        elif self.warming():
            body = {"ready": False, "status": "warming", "primary": None, "detail": "warm-up: loading the models"}
        else:
            body = health(self.served, self.states)
        probe = self.probe
        if body["status"] == "degraded" and (probe is None or probe.future.done()):
            try:
                self.probe = self.batcher.submit(Job([], WARM))
            except (QueueFull, Closed):
                pass
        return body

    def models(self) -> list[dict]:
        """/v1/models' list: the registry's models, then the chain's other tiers."""
        chain, served, states = self.chain, self.served, self.states
        loaded = chain.pool.loaded if chain.pool is not None else {}
        home = chain.pool.home if chain.pool is not None else self.settings.home
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
        return listed

