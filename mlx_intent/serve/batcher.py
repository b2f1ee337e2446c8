"""Dynamic batching for the HTTP service: one worker thread owns MLX and runs many requests as one batch.

MLX must not be called from several threads at once, and where a forward pass is bound by reading the
weights (Metal, CUDA) a batch costs little more than one text.  (On a small CPU that one request already
keeps busy it gains nothing: see benchmarks/reports/server.md.)  Requests become jobs on a bounded queue;
the worker takes the first, then gathers more of the same mode for up to ``max_wait_s`` or until
``max_batch`` texts, and answers them with one ``chain.classify_batch``.  A job's
``concurrent.futures.Future`` is the hand-over: cancelling it before the worker starts it (a request
that timed out) drops it from the batch.

Each job carries its request's deadline.  The worker learns the seconds a text takes and grows a batch
only while it can still end before the earliest deadline in it.  Otherwise, under overload, every batch
would end after its requests had timed out and the LLM would answer none of them.  A batch's first job
always runs, so the estimate keeps learning (one slow moment cannot shut the LLM out for good).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from mlx_intent.chain import ABSENT, Chain, PassOver, Reason, Tier
from mlx_intent.settings import BATCH_SIZE, MAX_WAIT_MS, QUEUE_SIZE

STREAM, WARM = "stream", "warm"
LEARN_RATE = 0.3  # weight of the newest batch in the running estimate of seconds per text
WARM_TEXT = "Hello! Where can I eat good fish near the Galata Tower?"


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs already; the client should retry later."""


class Closed(Exception):
    """The service is shutting down and takes no new work."""


@dataclass
class Job:
    """Texts to classify in ``mode`` (score, generate, stream or warm) by ``deadline`` (time.monotonic);
    ``emit`` receives a stream's events, called from the worker thread."""

    texts: list[str]
    mode: str
    future: Future = field(default_factory=Future)
    emit: Callable[[str, object], None] | None = None
    deadline: float = math.inf
    users: list[str | None] | None = None  # each text's user, whose thresholds apply (None: the defaults)


STOP = Job([], "stop")  # queued by stop(): the worker ends when it reaches it


def mode_chain(chain: Chain, mode: str) -> Chain:
    """The same tiers, loaded models and metrics, with the LLM tiers decoding in ``mode``; its own cache,
    since the two modes may answer differently."""
    tiers = [_in_mode(t, mode) if t.model else t for t in chain.tiers]
    return chain.derive(tiers=tiers)


def _in_mode(tier: Tier, mode: str) -> Tier:
    return replace(tier, run=lambda texts: tier.load().classify_batch(texts, mode=mode))


def fallback_chain(chain: Chain, kind: Reason, reason: str) -> Chain:
    """The chain below its LLM tiers, each of those passed over for ``reason`` (of ``kind``): the answer for
    a request whose time ran out.  Uncached; it calls no model, so any thread may use it."""
    return _uncached([_passed(t.name, kind, reason) if t.model else t for t in chain.tiers], chain)


def _passed(name: str, kind: Reason, reason: str) -> Tier:
    def run(texts: list[str]) -> list[dict]:
        raise PassOver(kind, reason)

    return Tier(name, run)


def stream_classify(chain: Chain, text: str, emit: Callable[[str, object], None]) -> dict:
    """Constrained generation by the first LLM tier that loads, its JSON emitted piece by piece as
    ("token", text); returns the final answer as the chain would give it (thresholds, tiers below).

    Only LLM tiers at the head of the chain stream; with none ready the chain answers alone.  The
    tier's latency budget is not applied: the client watches the answer being written."""
    passed: list[Tier] = []
    for index, tier in enumerate(chain.tiers):
        if not tier.model:
            break
        try:
            clf = tier.load()
        except Exception as e:
            kind = e.kind if isinstance(e, PassOver) else Reason.ERROR
            passed.append(_passed(tier.name, kind, str(e) if isinstance(e, PassOver) else _error(e)))
            continue
        result = None
        try:
            for piece in clf.stream(text):
                if isinstance(piece, dict):
                    result = piece
                else:
                    emit("token", piece)
        except Exception as e:  # empty once cleaned, a fault in the model: the tiers below answer
            replay = _passed(tier.name, Reason.ERROR, _error(e))
        else:
            replay = replace(tier, run=lambda texts, r=result: [r], load=lambda: None, budget_ms=None)
        return _uncached([*passed, replay, *chain.tiers[index + 1 :]], chain).classify(text)
    return _uncached([*passed, *chain.tiers[len(passed) :]], chain).classify(text)


def _error(e: Exception) -> str:
    return f"error: {type(e).__name__}: {e}"


def _uncached(tiers: list[Tier], chain: Chain) -> Chain:
    return chain.derive(tiers=tiers, cache_size=0)


def readiness(chain: Chain) -> tuple[bool, str]:
    """(ready, detail) after the warm-up: ready once the first LLM tier that can be had is loaded; tiers
    not on disk or too big are skipped.  A chain without LLM tiers is ready at once."""
    for tier in chain.tiers:
        if not tier.model:
            return True, tier.name
        try:
            tier.load()
        except PassOver as e:
            if e.kind in ABSENT:
                continue
            return False, f"{tier.name}: {e}"
        except Exception as e:
            return False, f"{tier.name}: {_error(e)}"
        return True, tier.name
    return True, chain.tiers[-1].name


class Batcher:
    """The worker thread and its bounded queue.  ``chains`` maps each mode to the chain that answers it;
    warm-up uses ``default_mode``, streams the generate chain; ``on_batch(n)`` hears every batch's size."""

    def __init__(
        self,
        chains: dict[str, Chain],
        default_mode: str = "score",
        max_batch: int = BATCH_SIZE,
        max_wait_s: float = MAX_WAIT_MS / 1000,
        queue_size: int = QUEUE_SIZE,
        on_batch: Callable[[int], None] = lambda n: None,
    ):
        self.chains = chains
        self.default_mode = default_mode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.on_batch = on_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.per_text: dict[str, float] = {}  # mode -> seconds a text takes in a batch, as measured
        self.closed = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="mlx-intent-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self.closed:
                raise Closed("the service is shutting down")
            if self.jobs.qsize() >= self.queue_size:
                raise QueueFull(f"{self.queue_size} requests are waiting already")
            self.jobs.put(job)
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Take no more jobs, answer every queued one, then end the worker."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.jobs.put(STOP)
        if self.thread.is_alive():
            self.thread.join(timeout)

    def fits(self, mode: str, texts: int, deadline: float) -> bool:
        """Whether a batch of ``texts`` texts started now is expected to end by ``deadline``."""
        return time.monotonic() + self.per_text.get(mode, 0.0) * texts <= deadline

    def _work(self) -> None:
        held: Job | None = None
        while True:
            job = held if held is not None else self.jobs.get()
            held = None
            if job is STOP:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.mode in (STREAM, WARM):
                self._run_alone(job)
                continue
            group, count, due = [job], len(job.texts), job.deadline
            until = time.monotonic() + self.max_wait_s
            while count < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if nxt.mode != job.mode or not self.fits(job.mode, count + len(nxt.texts), min(due, nxt.deadline)):
                    held = nxt
                    break
                if nxt.future.set_running_or_notify_cancel():
                    group.append(nxt)
                    count += len(nxt.texts)
                    due = min(due, nxt.deadline)
            self._run_group(group, job.mode)

    def _run_group(self, group: list[Job], mode: str) -> None:
        texts = [t for job in group for t in job.texts]
        users = [u for job in group for u in (job.users or [None] * len(job.texts))]
        try:
            results: list[dict] = []
            for start in range(0, len(texts), self.max_batch):
                chunk = texts[start : start + self.max_batch]
                began = time.perf_counter()
                results += self.chains[mode].classify_batch(chunk, users=users[start : start + self.max_batch])
                self._learn(mode, (time.perf_counter() - began) / len(chunk))
                self.on_batch(len(chunk))
        except Exception as e:  # tiers catch their own faults; this is a bug, answered as one
            for job in group:
                job.future.set_exception(e)
            return
        start = 0
        for job in group:
            job.future.set_result(results[start : start + len(job.texts)])
            start += len(job.texts)

    def _learn(self, mode: str, seconds: float) -> None:
        old = self.per_text.get(mode)
        self.per_text[mode] = seconds if old is None else old + LEARN_RATE * (seconds - old)

    def _run_alone(self, job: Job) -> None:
        try:
            if job.mode == WARM:
                chain = self.chains[self.default_mode]
                chain.classify(job.texts[0])
                job.future.set_result(readiness(chain))
            else:
                result = stream_classify(self.chains["generate"], job.texts[0], job.emit)
                job.emit("result", result)
                job.future.set_result(result)
        except Exception as e:  # a bug: the request hears of it, the worker goes on
            if job.emit is not None:
                job.emit("error", _error(e))
            job.future.set_exception(e)
