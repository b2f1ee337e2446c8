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
Deadlines are checked again between chunks, and per text in generate mode (it writes one text at a
time anyway): work whose request was already answered by the tiers below is dropped, not finished.

Every load of a model tier is recorded (``watched``), so /healthz and the answers given without the
worker (during the warm-up, after a timeout) know each tier's state without loading anything.  The worker holds
one chain and names each batch's mode in the call (``Chain.classify_batch(mode=)``); the chain below the model
tiers (``fallback_chain``) decides per call from the tiers' states, so the server makes it once per reason.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from mlx_intent.chain import WARM_TEXT, Chain, Kind, Tier
from mlx_intent.results import ABSENT, PassOver, Reason
from mlx_intent.settings import BATCH_SIZE, MAX_WAIT_MS, QUEUE_SIZE

STREAM, WARM, GENERATE = "stream", "warm", "generate"
LEARN_RATE = 0.3  # weight of the newest batch in the running estimate of seconds per text


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs already; the client should retry later."""


class Closed(Exception):
    """The service is shutting down and takes no new work."""


class Dropped(Exception):
    """The request that wanted a stream is gone (its client left): the worker stops writing it."""


class Expired(Exception):
    """The job's deadline passed before the worker reached all its texts: its request is answered by the
    tiers below the LLMs instead."""


@dataclass(eq=False)  # a job is itself: hashable by identity
class Job:
    """Texts to classify in ``mode`` (score, generate, stream or warm) by ``deadline`` (time.monotonic);
    ``emit`` receives a stream's events, called from the worker thread."""

    texts: list[str]
    mode: str
    future: Future = field(default_factory=Future)
    emit: Callable[[str, object], None] | None = None
    deadline: float = math.inf
    user: str | None = None  # whose thresholds apply (None: the defaults)
    contexts: list[tuple[str, ...]] | None = None  # each text's earlier turns (mlx_intent/context.py)
    dropped: threading.Event = field(default_factory=threading.Event)  # set when its request is abandoned


STOP = Job([], "stop")  # queued by stop(): the worker ends when it reaches it


COLD, LOADING, READY, ABSENT_STATE, FAILED = "cold", "loading", "ready", "absent", "failed"


@dataclass(frozen=True)
class TierState:
    """What the last load of a model tier gave: ``state`` cold (never tried), loading, ready, absent (not
    installed, too large) or failed, with the pass-over's ``kind`` and words (``detail``)."""

    state: str = COLD
    kind: Reason | None = None
    detail: str | None = None


def watched(chain: Chain, states: dict[str, TierState]) -> Chain:
    """The server's chain: ``chain`` with every load of a model tier recorded in ``states`` (by tier name), which
    the server reads on each /healthz, never loading anything; and recording nothing itself: the server counts,
    logs and keeps each request's answers once, with the request's own latency (a request that timed out would
    otherwise be kept twice, and with the microseconds of the tiers that answered it in the end)."""

    def watch(tier: Tier) -> Tier:
        def load():
            if states.get(tier.name, TierState()).state != READY:  # a loaded tier stays ready meanwhile
                states[tier.name] = TierState(LOADING)
            try:
                value = tier.load()
            except PassOver as e:
                states[tier.name] = TierState(ABSENT_STATE if e.kind in ABSENT else FAILED, e.kind, str(e))
                raise
            except Exception as e:
                states[tier.name] = TierState(FAILED, Reason.ERROR, _error(e))
                raise
            states[tier.name] = TierState(READY)
            return value

        return replace(tier, load=load)

    return chain.derive(tiers=[watch(t) if t.loads_model else t for t in chain.tiers], recording=False)


def fallback_chain(chain: Chain, kind: Reason, reason: str, states: dict[str, TierState] | None = None) -> Chain:
    """The chain below its model tiers, each of those passed over for ``reason`` (of ``kind``), or for being
    absent here when its last load (in ``states``) or a look at the disk (``Tier.absent``) says so: the answer
    for a request whose time ran out, or that came during the warm-up.  During the warm-up (kind LOADING) an
    early tier that is loaded (the e5-small encoder) answers too, on the caller's thread and without a latency
    budget (its runs wait on one another, beside a load), and without the LLM it may blend in (``Tier.alone``:
    that LLM may be the load under way); else no model runs.
    Uncached.  Each of its tiers decides at every call, from the states then, so one made at start-up serves
    every request that timed out (serve/service.py: ``Service.chains_below``)."""
    return _uncached([_below(t, kind, reason, states) if t.loads_model else t for t in chain.tiers], chain)


def _below(tier: Tier, kind: Reason, reason: str, states: dict[str, TierState] | None) -> Tier:
    """``tier`` in the chain below the model tiers: what it does is decided at each call, from ``states`` then."""

    def stand_in() -> Tier:
        state = (states or {}).get(tier.name)
        if state is not None and state.state == ABSENT_STATE:
            return _passed(tier, state.kind, state.detail)
        if kind == Reason.LOADING and tier.early and tier.alone is None and state is not None and state.state == READY:
            return tier  # the best tier there is until the LLMs are in: never timed out
        if (absent := tier.absent()) is not None:
            return _passed(tier, absent.kind, absent.detail)
        if kind == Reason.LOADING and tier.early and tier.alone is not None:  # answers once loaded, loading nothing
            return replace(tier, run=tier.alone, load=lambda: None)
        return _passed(tier, kind, reason)

    def run(texts: list[str], *more) -> list[dict]:
        now = stand_in()
        now.load()
        return now.run(texts, *more)

    return replace(tier, run=run, load=lambda: None, budget_ms=None)


def _passed(tier: Tier, kind: Reason, reason: str) -> Tier:
    """``tier`` passing every text over for ``reason`` (of ``kind``), loading nothing."""

    def run(texts: list[str], *more) -> list[dict]:
        raise PassOver(kind, reason)

    return Tier(tier.name, run, kind=tier.kind)


def stream_classify(chain: Chain, text: str, emit: Callable[[str, object], None], mode: str | None = None) -> dict:
    """Constrained generation by the first LLM tier that loads, its JSON emitted piece by piece as
    ("token", text); returns the final answer as the chain would give it (thresholds, tiers below, the LLM tiers
    there decoding in ``mode``: None, the chain's).

    Only LLM tiers at the head of the chain stream; with none ready the chain answers alone.  The
    tier's latency budget is not applied: the client watches the answer being written."""
    passed: list[Tier] = []
    for index, tier in enumerate(chain.tiers):
        if not tier.loads_model:
            break
        try:
            clf = tier.classifier()
        except Exception as e:
            kind = e.kind if isinstance(e, PassOver) else Reason.ERROR
            passed.append(_passed(tier, kind, str(e) if isinstance(e, PassOver) else _error(e)))
            continue
        result = None
        try:
            for piece in clf.stream(text):
                if isinstance(piece, dict):
                    result = piece
                else:
                    emit("token", piece)
        except Dropped:  # nobody is reading: neither finish nor answer
            raise
        except Exception as e:  # empty once cleaned, a fault in the model: the tiers below answer
            replay = _passed(tier, Reason.ERROR, _error(e))
        else:
            replay = replace(tier, run=lambda texts, *_, r=result, **__: [r], load=lambda: None, budget_ms=None)
        return _uncached([*passed, replay, *chain.tiers[index + 1 :]], chain).classify(text, mode=mode)
    return _uncached([*passed, *chain.tiers[len(passed) :]], chain).classify(text, mode=mode)


def _error(e: Exception) -> str:
    return f"error: {type(e).__name__}: {e}"


def _uncached(tiers: list[Tier], chain: Chain) -> Chain:
    return chain.derive(tiers=tiers, cache_size=0)


def warm(chain: Chain, states: dict[str, TierState]) -> None:
    """Load every model tier of ``chain`` not ready yet and run it once on WARM_TEXT, the early ones (the encoder,
    which then answers while the LLMs load) first, then the others in order; LLMs only while the model pool has
    room (one more would push out the first).  The tiers are called directly, not through the chain: the
    warm-up query is neither logged nor counted.  A tier that cannot load is recorded by its watch and skipped."""
    room = chain.pool.max_loaded if chain.pool is not None else math.inf
    for tier in sorted(chain.tiers, key=lambda t: not t.early):
        pooled = tier.kind is Kind.LLM  # held in the model pool, which has room for max_loaded
        if not tier.loads_model or (pooled and room <= 0):
            continue
        if states.get(tier.name, TierState()).state == READY:
            room -= pooled
            continue
        try:
            tier.load()
        except Exception:  # recorded by the watch
            continue
        room -= pooled
        try:
            tier.run([WARM_TEXT])
        except Exception:  # a fault at run time is the chain's to pass over, request by request
            pass


def health(chain: Chain, states: dict[str, TierState]) -> dict:
    """The /healthz body from the tiers' states now: ready once the first model tier that can be had (absent
    ones skipped) is loaded, degraded while it fails, warming while it is not yet tried or loading.  A
    chain without model tiers is ready at once."""
    for tier in chain.tiers:
        state = states.get(tier.name, TierState()) if tier.loads_model else TierState(READY)
        if state.state == READY:
            return {"ready": True, "status": "ready", "primary": tier.name, "detail": None}
        if state.state == FAILED:
            return {"ready": False, "status": "degraded", "primary": None, "detail": f"{tier.name}: {state.detail}"}
        if state.state != ABSENT_STATE:
            return {"ready": False, "status": "warming", "primary": None, "detail": f"{tier.name}: {state.state}"}
    raise AssertionError("a chain ends with the general tier, which is always ready")


class Batcher:
    """The worker thread and its bounded queue.  ``chain`` answers every mode: its LLM tiers decode in
    ``default_mode`` unless a job names another (streams: generate); ``on_batch(n)`` hears every batch's size.
    ``states`` holds the model tiers' states (see ``watched``), which the warm-up fills."""

    def __init__(
        self,
        chain: Chain,
        default_mode: str = "score",
        max_batch: int = BATCH_SIZE,
        max_wait_s: float = MAX_WAIT_MS / 1000,
        queue_size: int = QUEUE_SIZE,
        on_batch: Callable[[int], None] = lambda n: None,
        states: dict[str, TierState] | None = None,
    ):
        self.chain = chain
        self.default_mode = default_mode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.on_batch = on_batch
        self.states = {} if states is None else states
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.per_text: dict[str, float] = {}  # mode -> seconds a text takes in a batch, as measured
        self.closed = False
        self._waiting = 0  # jobs queued, neither cancelled nor begun: what the queue size bounds
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="mlx-intent-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def waiting(self) -> int:
        """Jobs queued and still wanted: a cancelled job leaves the count at once, not when the worker
        reaches it."""
        return self._waiting

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self.closed:
                raise Closed("the service is shutting down")
            if self._waiting >= self.queue_size:
                raise QueueFull(f"{self.queue_size} requests are waiting already")
            self._waiting += 1
            job.future.add_done_callback(lambda f: f.cancelled() and self._left())  # only a queued job cancels
            self.jobs.put(job)
        return job

    def _left(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _take(self, job: Job) -> bool:
        """Whether the worker is to run ``job`` (False: cancelled, counted out already)."""
        if not job.future.set_running_or_notify_cancel():
            return False
        self._left()
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Take no more jobs, answer every queued one, then end the worker; wait at most ``timeout`` seconds
        for it (a daemon thread: one still busy does not keep the process alive)."""
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
            if not self._take(job):
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
                if self._take(nxt):
                    group.append(nxt)
                    count += len(nxt.texts)
                    due = min(due, nxt.deadline)
            self._run_group(group, job.mode)

    def _run_group(self, group: list[Job], mode: str) -> None:
        """Run the group's texts in chunks, each job answered as soon as its last text is; before each chunk
        the jobs past their deadline are dropped (their requests were answered without them)."""
        size = 1 if mode == GENERATE else self.max_batch  # generation writes text by text: check per text
        todo = [
            (job, text, ctx) for job in group for text, ctx in zip(job.texts, job.contexts or [()] * len(job.texts))
        ]
        answers: dict[Job, list[dict]] = {job: [] for job in group}
        while todo:
            now = time.monotonic()
            for job in {job for job, *_ in todo if job.deadline < now}:
                job.future.set_exception(Expired(f"deadline passed with {len(answers[job])} of {len(job.texts)} texts"))
            todo = [item for item in todo if not item[0].future.done()]
            chunk, todo = todo[:size], todo[size:]
            if not chunk:
                return
            began = time.perf_counter()
            try:
                results = self.chain.classify_batch(
                    [t for _, t, _ in chunk],
                    users=[j.user for j, *_ in chunk],
                    contexts=[c for *_, c in chunk],
                    mode=self._mode(mode),
                )
            except Exception as e:  # tiers catch their own faults; this is a bug, answered as one
                for job in {job for job, *_ in chunk + todo}:
                    job.future.set_exception(e)
                return
            self._learn(mode, (time.perf_counter() - began) / len(chunk))
            self.on_batch(len(chunk))
            for (job, *_), result in zip(chunk, results):
                answers[job].append(result)
                if len(answers[job]) == len(job.texts):
                    job.future.set_result(answers[job])

    def _mode(self, mode: str) -> str | None:
        """The mode to name in a call to the chain: None for its own (the default mode)."""
        return None if mode == self.default_mode else mode

    def _learn(self, mode: str, seconds: float) -> None:
        old = self.per_text.get(mode)
        self.per_text[mode] = seconds if old is None else old + LEARN_RATE * (seconds - old)

    def _run_alone(self, job: Job) -> None:
        try:
            if job.mode == WARM:
                warm(self.chain, self.states)
                job.future.set_result(None)
            else:

                def emit(kind: str, data: object) -> None:
                    if job.dropped.is_set():  # checked at every token: an abandoned stream stops at once
                        raise Dropped("the client left")
                    job.emit(kind, data)

                result = stream_classify(self.chain, job.texts[0], emit, self._mode(GENERATE))
                job.emit("result", result)
                job.future.set_result(result)
        except Dropped as e:
            job.future.set_exception(e)
        except Exception as e:  # a bug: the request hears of it, the worker goes on
            if job.emit is not None:
                job.emit("error", _error(e))
            job.future.set_exception(e)
