"""The fallback chain: an ordered list of tiers; the first that answers well enough wins.

A tier is passed over, with the reason recorded (its kind, a ``Reason``, and words), when its model is not on disk,
does not fit in memory, fails to load (then it is not retried until a back-off has
passed), raises, runs past its latency budget, is less confident than its
threshold, or is ambiguous: its top two intents closer than its margin (the last tier before ``general``
answers then, flagged ``"ambiguous": true``).  A request's ``user`` may carry thresholds of its own
(``mlx_intent.feedback``'s users table), which replace the tiers' for that request.  The last tier,
``general``, always answers.  Every result says which
tier answered (``tier``, ``model``) and why the ones above it did not (``fallbacks``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Protocol

from mlx_intent.calibration import read_place
from mlx_intent.context import Context, Detector, inherit, learned_detector, rule_detector, topic
from mlx_intent.encoder import NAME as ENCODER
from mlx_intent.errors import warn_once
from mlx_intent.feedback.store import Store, StoreError, record_results
from mlx_intent.feedback.users import user_thresholds
from mlx_intent.langid import detect_language
from mlx_intent.metrics import ClassificationLog, Metrics, log_record, runtime_fallback
from mlx_intent.models import backend, loading, registry
from mlx_intent.results import TRANSIENT, PassOver, Reason, check_user, fallback, new_id, top_gap
from mlx_intent.schema import FALLBACK_INTENT, INTENTS, MAX_INTENTS, SOCIAL_INTENT, answer_of, validate
from mlx_intent.settings import Settings

logger = logging.getLogger("mlx_intent.chain")

KEYWORD, GENERAL = "keyword", "general"
GENERAL_CONFIDENCE = 0.1
WARM_TEXT = "Hello! Where can I eat good fish near the Galata Tower?"  # the query a tier runs once as it loads


def cache_key(context: Context, text: str):
    """A text's cache key: the text itself, with its earlier turns when it has any (they may change its answer);
    None for what is not a text (never cached)."""
    if not isinstance(text, str):
        return None
    return (context, text) if context else text


def timing_fields(call_ms: float, texts: int) -> dict:
    """The latency fields of a result from a call of ``texts`` texts that took ``call_ms``."""
    texts = max(texts, 1)
    return {"latency_ms": round(call_ms, 2), "latency_per_query_ms": round(call_ms / texts, 3), "batch_texts": texts}


class Classifier(Protocol):
    """What a model tier runs: the LLM classifier (``classifier.IntentClassifier``) and the e5-small encoder
    (``encoder.EncoderClassifier``) both are one.  ``contexts`` holds each text's earlier turns (oldest first);
    a classifier that reads no conversation ignores them."""

    def classify_batch(self, texts: list[str], *, contexts: Sequence[Sequence[str]] | None = None) -> list[dict]: ...


class Kind(str, Enum):
    """What a tier is: the chain, the server and the evaluation ask ``Tier.kind``, never guess from its model."""

    LLM = "llm"  # a causal LM in the model pool: decodes in a mode, streams, reads the conversation
    ENCODER = "encoder"  # the e5-small encoder (blended with the keyword tier and maybe an LLM)
    KEYWORD = "keyword"  # the keyword tier
    GENERAL = "general"  # the last tier, which always answers
    RULE = "rule"  # any other tier that loads no model (a stand-in, a test's)

    def __str__(self) -> str:
        return self.value


MODEL_KINDS = frozenset({Kind.LLM, Kind.ENCODER})  # the tiers that load a model: watched, warmed, recalibrated


@dataclass
class Tier:
    """A named classifier: ``run(texts) -> results`` (schema fields at least).
    ``load`` readies it (raising PassOver) and gives its Classifier (a model tier's; None for the others); its time
    does not count against the budget."""

    name: str
    run: Callable[[list[str]], list[dict]]
    load: Callable[[], object] = lambda: None
    model: str | None = None  # the model it runs, as its results name it
    kind: Kind = Kind.RULE
    threshold: float = 0.0
    budget_ms: float | None = None
    veto: bool = True  # the keyword tier's rule-1 veto applies (not to a tier that already blends it in)
    contextual: bool = False  # ``run(texts, contexts)`` reads the earlier turns (the LLM tiers' chat)
    margin: float = 0.0  # top two intents closer than this: passed over as ambiguous (0: off)
    floor: float = 0.0  # the least threshold a user's min_confidence may give it (the keyword floor)
    # Why it cannot load here at all (not installed, too large) without loading anything, or None: what a request
    # that cannot wait for its load (the server's warm-up, a timeout) records instead of "loading" or "timeout".
    absent: Callable[[], PassOver | None] = lambda: None
    # Small and fast (the e5-small encoder): the server's warm-up loads it first, and it answers requests
    # while the LLM tiers still load.
    early: bool = False
    # An early tier's answer with what it has loaded, loading nothing (the encoder without the LLM it blends in),
    # raising PassOver(LOADING) before that: what it answers while the server warms up.  None: ``run`` once loaded.
    alone: Callable[[list[str]], list[dict]] | None = None

    @property
    def loads_model(self) -> bool:
        """Whether it loads a model (an LLM, the encoder): a load to watch, warm, recalibrate or pass over."""
        return self.kind in MODEL_KINDS

    def classifier(self) -> Classifier:
        """A model tier's classifier, loaded (raising PassOver where it cannot be)."""
        if not self.loads_model:
            raise TypeError(f"tier {self.name} ({self.kind}) has no classifier")
        return self.load()


def keyword_tier(home: Path) -> Tier:
    """The keyword tier, with the fit of ``home`` (the models folder) or the packaged one."""
    from mlx_intent.keyword import KeywordClassifier

    # A broken lexicon fails at start-up, naming it; a broken calibration only costs the calibration (a warning).
    keyword = KeywordClassifier(home=home)
    return Tier(KEYWORD, lambda texts: [keyword.classify(t) for t in texts], kind=Kind.KEYWORD)


def general_tier() -> Tier:
    answer = {"primary_intent": FALLBACK_INTENT, "confidence": GENERAL_CONFIDENCE, "all_intents": [FALLBACK_INTENT]}
    return Tier(GENERAL, lambda texts: [dict(answer) for _ in texts], kind=Kind.GENERAL)


@dataclass
class ModelPool:
    """Loads LLM classifiers lazily, keeps at most ``max_loaded`` in memory, and backs
    off from a model that failed to load for ``retry_after_s`` seconds."""

    max_loaded: int = 2
    retry_after_s: float = 60.0
    mode: str = "score"
    memory: int | None = None  # bytes the device can give; None = ask the device
    home: Path = field(kw_only=True)  # the models folder (Settings.home)
    sample: bool = False  # generate mode samples at each model's ModelSpec.temperature (classify --sample)
    loaded: OrderedDict = field(default_factory=OrderedDict)
    failed: dict[str, tuple[float, str]] = field(default_factory=dict)
    unstamped: dict[str, int] = field(default_factory=dict)  # just loaded: MLX bytes in use before the load
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str):
        with self.lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
            if name in self.failed:
                when, why = self.failed[name]
                if time.monotonic() - when < self.retry_after_s:
                    raise PassOver(Reason.LOAD_FAILED, _backing_off(self.retry_after_s, why))
            if (absent := self.absent(name)) is not None:
                raise absent
            while len(self.loaded) >= self.max_loaded:
                self.loaded.popitem(last=False)
            try:
                from mlx_intent.classifier import IntentClassifier

                before = _start_peak()
                clf = IntentClassifier(name, mode=self.mode, home=self.home, sample=self.sample)
            except Exception as e:  # corrupt weights, missing files, out of memory...
                self.failed[name] = (time.monotonic(), f"{type(e).__name__}: {e}")
                raise PassOver(Reason.LOAD_FAILED, f"load failed: {type(e).__name__}: {e}") from e
            self.failed.pop(name, None)
            self.loaded[name] = clf
            self.unstamped[name] = before
            return clf

    def adopt(self, name: str, clf) -> None:
        """Hold ``clf``, a classifier of ``name`` loaded already (the calibration's model in memory, eval's base
        model without its adapter), as if the pool had loaded it: one copy of the weights, not two."""
        with self.lock:
            self.loaded[name] = clf
            self.failed.pop(name, None)

    def absent(self, name: str) -> PassOver | None:
        """Why ``name`` cannot load here (not on disk, too large for memory), from the disk only; None if it can."""
        if name in self.loaded:
            return None
        if not loading.is_available(name, self.home):
            return PassOver(Reason.NOT_INSTALLED, f"not downloaded (get it with: {registry.how_to_get(name)})")
        if not loading.fits(name, self.memory, home=self.home):
            need = loading.budget(name, self.home)
            why = f"does not fit in memory (needs {need.bytes / registry.GB:.1f} GB: {need.source})"
            return PassOver(Reason.TOO_LARGE, why)
        return None

    def stamp_peak(self, name: str) -> None:
        """After a model's first run since its load, write the memory its load and run took (peak less what
        was in use before) next to its weights: ``mlx-intent models list`` shows it as "peak seen"."""
        before = self.unstamped.pop(name, None)
        path = registry.resolve_dir(name, self.home) if before is not None else None
        if path is None:
            return
        import mlx.core as mx

        try:
            registry.write_stamp(path, self.home, peak_memory=mx.get_peak_memory() - before)
        except OSError:  # a read-only models folder costs the figure, not the answer
            pass


def _backing_off(retry_after_s: float, why: str) -> str:
    """The words for a tier not retried yet: the same every time (no "12s ago"), so the reasons counted by
    ``stats`` and in the log do not grow by one with every second of a back-off."""
    return f"load failed, backing off for {retry_after_s:g}s ({why})"


def _start_peak() -> int:
    """Restart MLX's peak counter so the next reading belongs to the model about to load; the bytes in use."""
    backend.use_openblas()  # before the first import of mlx.core
    import mlx.core as mx

    mx.reset_peak_memory()
    return mx.get_active_memory()


@dataclass
class Lazy:
    """Loads one classifier on first use and keeps it; a failed load is retried only after ``retry_after_s``."""

    build: Callable[[], object]
    absent: Callable[[], str | None] = lambda: None  # why it cannot load at all (not installed), or None
    retry_after_s: float = 60.0
    value: object = None
    failed: tuple[float, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self):
        with self.lock:
            if self.value is not None:
                return self.value
            if self.failed and time.monotonic() - self.failed[0] < self.retry_after_s:
                raise PassOver(Reason.LOAD_FAILED, _backing_off(self.retry_after_s, self.failed[1]))
            if why := self.absent():
                raise PassOver(Reason.NOT_INSTALLED, why)
            try:
                self.value = self.build()
            except Exception as e:  # a corrupt head, missing weights...
                self.failed = (time.monotonic(), f"{type(e).__name__}: {e}")
                raise PassOver(Reason.LOAD_FAILED, f"load failed: {type(e).__name__}: {e}") from e
            self.failed = None
            return self.value


def encoder_tier(
    threshold: float,
    budget_ms: float | None,
    retry_after_s: float = 60.0,
    combine: bool = False,
    *,
    home: Path,
    llm: Callable[[list[str]], list[list[float]] | None] | None = None,
    llm_weight: float = 0.0,
    llm_load: Callable[[], object] | None = None,
) -> Tier:
    """The e5-small tier (mlx_intent/encoder.py), loaded on first use; with ``combine`` it answers with its
    calibrated blend with the keyword tier, whose rule-1 veto then does not apply a second time (measured:
    the veto cost the blend 1.3 points on probe and 2.8 on dev's greetings; the multi-intent merge stays).
    ``home`` is the models folder whose pulled weights (``models pull e5-small``) it prefers; ``llm`` and
    ``llm_weight`` blend an LLM in (``llm_distributions``), which ``llm_load`` loads as part of the tier's load
    (so that its load time never counts against a query's budget; a failure there leaves the blend without it)."""
    from mlx_intent import encoder

    def build() -> encoder.EncoderClassifier:
        # One query as part of the load: MLX compiles its kernels on a first run (seconds on a fresh machine),
        # which would otherwise count against the first query's latency budget.  Without the LLM: the encoder is
        # ready (and answers alone during the server's warm-up) before the LLM has loaded.
        clf = encoder.EncoderClassifier(combine=combine, home=home, llm=llm, llm_weight=llm_weight)
        clf.classify_batch([WARM_TEXT], with_llm=False)
        return clf

    def load() -> encoder.EncoderClassifier:
        clf = lazy.get()
        if llm_load is not None:
            try:
                llm_load()
            except Exception:  # said once when the blend runs without it (llm_distributions)
                pass
        return clf

    def absent() -> PassOver | None:
        why = None if lazy.value is not None else encoder.available(home=home)
        return None if why is None else PassOver(Reason.NOT_INSTALLED, why)

    lazy = Lazy(build, lambda: encoder.available(home=home), retry_after_s)
    lock = threading.Lock()  # the server's request threads may run it during the warm-up: one at a time

    def run(texts: list[str]) -> list[dict]:
        clf = lazy.get()
        with lock:
            return clf.classify_batch(texts)

    def alone(texts: list[str]) -> list[dict]:
        clf = lazy.value
        if clf is None:
            raise PassOver(Reason.LOADING, f"loading: {encoder.NAME} is not loaded yet")
        with lock:
            return clf.classify_batch(texts, with_llm=False)

    return Tier(
        encoder.NAME,
        run,
        load,
        model=encoder.NAME,
        kind=Kind.ENCODER,
        threshold=threshold,
        budget_ms=budget_ms,
        veto=not combine,
        absent=absent,
        early=True,
        alone=alone,
    )


def llm_tier(name: str, pool: ModelPool, threshold: float, budget_ms: float) -> Tier:
    registry.get_spec(name)  # unknown names fail when the chain is built

    def run(texts: list[str], contexts: list[Context] | None = None, mode: str | None = None) -> list[dict]:
        """The answers in ``mode`` (None: the pool's); a classifier is asked only for what the call names."""
        clf = pool.get(name)
        named = {"contexts": contexts, "mode": mode}
        answers = clf.classify_batch(texts, **{k: v for k, v in named.items() if v is not None})
        pool.stamp_peak(name)
        return answers

    return Tier(
        name,
        run,
        lambda: pool.get(name),
        model=name,
        kind=Kind.LLM,
        threshold=threshold,
        budget_ms=budget_ms,
        contextual=True,
        absent=lambda: pool.absent(name),
    )


def llm_distributions(name: str, pool: ModelPool) -> Callable[[list[str]], list[list[float]] | None]:
    """The LLM ``name``'s distributions over INTENTS, for the encoder's blend; None when it cannot answer (not
    installed, failed to load, raised): the blend then answers without it, and the fault is said once."""

    def run(texts: list[str]) -> list[list[float]] | None:
        try:
            rows = pool.get(name).distributions(texts)
        except Exception as e:  # PassOver included: the blend never waits on an LLM that is not there
            warn_once(("blend", name, type(e).__name__), f"{ENCODER}: blending without {name} ({e})")
            return None
        pool.stamp_peak(name)
        return [[row[intent] for intent in INTENTS] for row in rows]

    return run


def blended_name(llm: str) -> str:
    """The chain name of e5-small blended with ``llm`` (its place "blend"): ``e5-small+llm``."""
    return f"{ENCODER}+{llm}"


def default_chain_names(settings: Settings) -> list[str]:
    """The LLMs (Llama 3.2 3B, TinyLlama, or LLM_MODEL / LLM_FALLBACK_MODEL), each where `mlx-intent calibrate`
    measured it best on the calibration split (calibration.read_place): in front of e5-small, inside its blend
    (``e5-small+MODEL``), or, never measured, after it as a cascade tier for the texts it is unsure of; then the
    keyword tier and general.  On this CPU the bundled SmolLM2-135M first made answers worse
    (benchmarks/reports/chains-llm.md); unmeasured, no LLM goes first.  The bundled model is not in the default
    chain: name it with --chain, or LLM_MODEL=smollm2-135m."""
    front, cascade, blended = [], [], None
    llms = dict.fromkeys([settings.model or registry.PRIMARY, settings.fallback_model or registry.FALLBACK])
    for name in llms:
        if name in (ENCODER, KEYWORD, GENERAL):  # LLM_MODEL may name a tier that is in the chain anyway
            continue
        place = read_place(name, settings.home).name
        if place == "blend" and blended is None:
            blended = name
        elif place == "first":
            front.append(name)
        else:
            cascade.append(name)
    return [*front, blended_name(blended) if blended else ENCODER, *cascade, KEYWORD, GENERAL]


class Chain:
    """Classify through the tiers, with an LRU cache, metrics and an optional log."""

    def __init__(
        self,
        tiers: list[Tier],
        cache_size: int = 1024,
        metrics: Metrics | None = None,
        log: ClassificationLog | None = None,
        pool: ModelPool | None = None,
        secondaries: Callable[[list[str]], list[dict]] | None = None,
        store: Store | None = None,
        users: Callable[[str], dict | None] | None = None,
        followup: Detector | None = None,
        recording: bool = True,
    ):
        if not tiers or tiers[-1].name != GENERAL:
            tiers = [*tiers, general_tier()]
        self.tiers = tiers
        self.names = tuple(t.name for t in tiers)
        self.cache_size = cache_size
        self.cache: OrderedDict[str, dict] = OrderedDict()
        self.cache_hits = 0
        self.metrics = metrics or Metrics()
        self.log = log
        self.pool = pool
        # A model sure enough to answer puts almost all its mass on the primary, so its own
        # all_intents rarely names a second intent; the keyword tier (``secondaries``) gives
        # a second opinion: see _second_opinion.
        self.secondaries = secondaries
        self.store = store  # the feedback store that keeps every result (mlx_intent.feedback), or None
        self.users = users  # a user's threshold overrides, or None (feedback.user_thresholds)
        # Whether a turn reads as a follow-up of its earlier turns (mlx_intent/context.py): learned on the
        # encoder when the chain has one, else the keyword rule.
        self.followup = followup or rule_detector
        # Whether classify_batch counts, logs and keeps its answers (``keep``); the server's copy does not: it
        # keeps each request's answers itself, with the request's own latency.
        self.recording = recording
        self._lock = threading.Lock()

    def derive(
        self, tiers: list[Tier] | None = None, cache_size: int | None = None, recording: bool | None = None
    ) -> Chain:
        """A variant of this chain: other ``tiers``, ``cache_size`` or ``recording``, the same metrics, log,
        feedback store, model pool and keyword second opinion (``secondaries``), and a cache of its own.  Every
        variant (the server's watched chain, the chain below timed-out LLM tiers, a stream's replay) is made here,
        so none loses the rule-1 veto or the multi-intent merge."""
        return Chain(
            list(self.tiers if tiers is None else tiers),
            cache_size=self.cache_size if cache_size is None else cache_size,
            metrics=self.metrics,
            log=self.log,
            pool=self.pool,
            secondaries=self.secondaries,
            store=self.store,
            users=self.users,
            followup=self.followup,
            recording=self.recording if recording is None else recording,
        )

    def classify(
        self,
        text: str,
        label: str | None = None,
        user: str | None = None,
        context: Sequence[str] | None = None,
        mode: str | None = None,
    ) -> dict:
        return self.classify_batch([text], labels=[label], users=[user], contexts=[context], mode=mode)[0]

    def classify_batch(
        self,
        texts: list[str],
        labels: list[str | None] | None = None,
        users: list[str | None] | None = None,
        contexts: Sequence[Sequence[str] | None] | None = None,
        mode: str | None = None,
    ) -> list[dict]:
        """Answers in order; uncached texts go down the chain together, one batch per tier.

        ``latency_ms`` is the call's time in the chain, less the time tiers spent loading models
        (a one-time cost: ``mlx-intent models list`` shows it); the call answers ``batch_texts`` texts at
        once, so ``latency_per_query_ms`` is ``latency_ms / batch_texts``, each query's share of it.
        ``runtime_fallback`` says whether a tier passed the text over at run time, not only for being absent.
        ``users`` (ids, or None) name whose thresholds apply to each text; an unknown user gets the defaults.
        ``contexts`` gives each text its earlier turns (oldest first, mlx_intent/context.py): each earlier turn
        is answered as the conversation stood then (cached like any answer), and a text that reads as a
        follow-up takes the topic it continues (``context_used``, on every result).
        ``mode`` (score, generate; None: the model pool's) is how the LLM tiers decode, for this call only (the
        server's requests name theirs); its answers are cached apart from the other mode's."""
        start = time.perf_counter()
        users = users or [None] * len(texts)
        limits = self._limits(users)
        contexts = [tuple(c or ()) for c in (contexts if contexts is not None else [None] * len(texts))]
        if len(contexts) != len(texts):
            raise ValueError(f"{len(contexts)} contexts for {len(texts)} texts")
        # Every (earlier turns, turn) to answer, each once: the texts, and each earlier turn as it stood then.
        # Keyed on the text exactly as the tiers get it: any folding (case, emoji, punctuation) would hand one
        # text another's answer, since some tier reads what was folded away ("IST", "☔", a "?").  A user with
        # thresholds of their own bypasses the cache: it holds answers under the defaults.
        items: list[tuple[Context, str]] = []
        keys, item_limits, earlier = [], [], []  # per item: its cache key, its user's limits, its earlier items
        where: dict = {}
        asked = []
        for text, ctx, limit in zip(texts, contexts, limits):
            turns: list[int] = []
            for i in range(len(ctx) + 1):
                turn = (ctx[:i], ctx[i]) if i < len(ctx) else (ctx, text)
                key = cache_key(*turn) if limit is None else None
                key = (mode, key) if mode is not None and key is not None else key  # a mode's answers apart
                if key is None or key not in where:
                    items.append(turn)
                    keys.append(key)
                    item_limits.append(limit)
                    earlier.append(list(turns))
                    if key is not None:
                        where[key] = len(items) - 1
                turns.append(len(items) - 1 if key is None else where[key])
            asked.append(turns[-1])
        results, loading = self._answer(items, keys, item_limits, earlier, mode)
        elapsed = (time.perf_counter() - start) * 1000 - loading
        timing = timing_fields(elapsed, len(texts))
        labels = labels or [None] * len(texts)
        out = []
        for j in asked:
            res = dict(results[j])  # one text asked twice gets two answers, two ids
            res.update(timing)
            res["id"] = new_id()  # every answer its own, a cache hit's too: what feedback refers to
            out.append(res)
        for text, res in zip(texts, out):
            res["lang"] = detect_language(text) if isinstance(text, str) else None
        if self.recording:
            self.keep(texts, out, labels, users, contexts)
        return out

    def keep(
        self,
        texts: Sequence[str],
        results: Sequence[dict],
        labels: Sequence[str | None] | None = None,
        users: Sequence[str | None] | None = None,
        contexts: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """Count the answers in the metrics, log them and keep them in the feedback store, once each (with their
        user and earlier turns).  The log never costs an answer: a record it cannot write is only counted."""
        n = len(texts)
        records = []
        rows = zip(texts, results, labels or [None] * n, users or [None] * n, contexts or [()] * n)
        for text, result, label, user, context in rows:
            self.metrics.record(result, lang=result.get("lang"), label=label)
            record = log_record(result, text, result.get("lang"), label=label)
            record = record if user is None else {**record, "user": user}
            records.append({**record, "context": list(context)} if context else record)
        if self.log is not None:
            self.metrics.record_log_failures(self.log.write_many(records))
        if self.store is not None:
            record_results(self.store, records)

    def _answer(self, items: list[tuple[Context, str]], keys: list, limits: list, earlier: list[list[int]], mode=None):
        """The answers to ``items`` (cached, or down the tiers and then through the context rule; cached where
        nothing transient happened), and the ms spent loading models."""
        results: list[dict | None] = [None] * len(items)
        todo = []
        with self._lock:
            for i, key in enumerate(keys):
                hit = None if key is None else self.cache.get(key)
                if hit is not None:
                    self.cache.move_to_end(key)
                    self.cache_hits += 1
                    results[i] = {**hit, "cached": True}
                else:
                    todo.append(i)
        fresh = list(todo)
        fallbacks: dict[int, list[dict]] = {i: [] for i in todo}
        loading = 0.0  # ms spent loading models: a one-time cost, not the queries' latency
        texts, contexts = [text for _, text in items], [ctx for ctx, _ in items]
        for tier in self.tiers:
            if not todo:
                break
            todo, load_ms = self._run_tier(tier, texts, todo, results, fallbacks, limits, contexts, mode)
            loading += load_ms
        for i in fresh:
            results[i].update(fallbacks=fallbacks[i], cached=False, context_used=False)
            results[i]["runtime_fallback"] = runtime_fallback(fallbacks[i])
        self._continue(items, fresh, earlier, results)
        for i in fresh:
            if self.cache_size and keys[i] is not None and not any(f["kind"] in TRANSIENT for f in fallbacks[i]):
                with self._lock:
                    self.cache[keys[i]] = dict(results[i])  # callers may edit what they get back
                    while len(self.cache) > self.cache_size:
                        self.cache.popitem(last=False)
        return results, loading

    def _continue(self, items: list[tuple[Context, str]], fresh: list[int], earlier: list[list[int]], results):
        """Give each fresh turn with earlier turns the topic it continues, where it reads as a follow-up of it;
        shorter conversations first, so that every earlier turn's answer is final before a later one reads it."""
        follow = [i for i in fresh if earlier[i] and isinstance(items[i][1], str)]
        for depth in sorted({len(earlier[i]) for i in follow}):
            level = [i for i in follow if len(earlier[i]) == depth]
            continued = {i: topic([results[k] for k in earlier[i]]) for i in level}
            level = [i for i in level if continued[i] is not None]
            asked = [(items[i][0], items[i][1], results[i], continued[i]) for i in level]
            try:
                chances = self.followup(asked) if asked else []
            except Exception:  # a failing learned test costs the context, never the answer
                chances = rule_detector(asked)
            for i, p in zip(level, chances):
                if p >= 0.5:
                    results[i] = inherit(results[i], continued[i], p)

    def _limits(self, users: list[str | None]) -> list[dict | None]:
        """Each text's threshold overrides (its user's), or None for the defaults.  A store that cannot be read
        costs the overrides, never the answer."""
        found: dict[str, dict | None] = {}  # each user read once a batch (a batch is often one user's)
        for user in {u for u in users if u is not None and self.users is not None}:
            try:
                found[user] = self.users(check_user(user))
            except StoreError as e:
                found[user] = None
                logger.warning("thresholds of user %s unread (%s): the defaults apply", user, e)
        return [found.get(user) if user is not None else None for user in users]

    def _run_tier(
        self, tier: Tier, texts, todo: list[int], results, fallbacks, limits=None, contexts=None, mode=None
    ) -> tuple[list[int], float]:
        """Run ``tier`` on the texts still unanswered (an LLM tier decoding in ``mode``, when one is named); return
        those it passed over, and the milliseconds ``tier.load()`` took."""
        t_load = time.perf_counter()
        try:
            try:
                tier.load()
            finally:
                load_ms = (time.perf_counter() - t_load) * 1000
            t0 = time.perf_counter()
            batch = [texts[i] for i in todo]
            modal = {"mode": mode} if mode is not None and tier.kind is Kind.LLM else {}
            if tier.contextual and contexts is not None and any(contexts[i] for i in todo):
                answers = list(tier.run(batch, [contexts[i] for i in todo], **modal))
            else:
                answers = list(tier.run(batch, **modal))
            spent = (time.perf_counter() - t0) * 1000
        except PassOver as e:
            return self._pass(tier, todo, e.kind, str(e), fallbacks), load_ms
        except Exception as e:  # a fault inside a tier never reaches the caller
            return self._pass(tier, todo, Reason.ERROR, f"error: {type(e).__name__}: {e}", fallbacks), load_ms
        return self._keep(tier, texts, todo, answers, spent, results, fallbacks, limits), load_ms

    def _keep(
        self, tier: Tier, texts, todo: list[int], answers: list[dict], spent: float, results, fallbacks, limits=None
    ) -> list[int]:
        """Keep the answers ``tier`` stands by (in time, valid, confident, unambiguous); return the texts it passed
        over.  ``limits`` holds each text's user overrides: a user's min_confidence is the threshold of every tier
        but ``general`` (never below the tier's floor), their margin its margin."""
        per_query = spent / max(len(todo), 1)  # a batch of n answers n queries at once
        if tier.budget_ms is not None and per_query > tier.budget_ms:
            reason = f"timeout: {per_query:.0f} ms per query > budget {tier.budget_ms:.0f} ms"
            return self._pass(tier, todo, Reason.TIMEOUT, reason, fallbacks)
        if len(answers) != len(todo):  # zip would silently leave texts unanswered
            reason = f"invalid answer: {len(answers)} answers for {len(todo)} texts"
            return self._pass(tier, todo, Reason.INVALID, reason, fallbacks)
        left = []
        last = len(self.tiers) < 2 or tier is self.tiers[-2]  # the last tier before general: it flags, never passes
        for i, raw in zip(todo, answers):
            try:
                answer = validate(answer_of(raw))
            except Exception as e:
                fallbacks[i].append(fallback(tier.name, Reason.INVALID, f"invalid answer: {e}"))
                left.append(i)
                continue
            limit = (limits[i] if limits else None) or {}
            threshold, margin = tier.threshold, limit.get("margin", tier.margin)
            if "min_confidence" in limit and tier.name != GENERAL:
                threshold = max(limit["min_confidence"], tier.floor)
            if answer["confidence"] < threshold:
                reason = f"low confidence: {answer['confidence']:.2f} < {threshold:.2f}"
                fallbacks[i].append(fallback(tier.name, Reason.LOW_CONFIDENCE, reason))
                left.append(i)
                continue
            gap = top_gap(raw)
            ambiguous = gap is not None and gap < margin
            if ambiguous and not last:
                reason = f"ambiguous: top two intents {gap:.2f} apart < margin {margin:.2f}"
                fallbacks[i].append(fallback(tier.name, Reason.AMBIGUOUS, reason))
                left.append(i)
                continue
            extra = {k: raw[k] for k in ("truncated", "top") if k in raw}
            results[i] = {**answer, **extra, "tier": tier.name, "model": tier.model, "ambiguous": ambiguous}
        if tier.loads_model and self.secondaries is not None:
            passed = set(left)
            answered = [i for i in todo if i not in passed]
            read = {i: raw["keyword"] for i, raw in zip(todo, answers) if isinstance(raw, dict) and "keyword" in raw}
            left = sorted(left + self._second_opinion(tier, texts, answered, results, fallbacks, read))
        return left

    def _second_opinion(self, tier: Tier, texts, answered: list[int], results, fallbacks, read=None) -> list[int]:
        """Check model answers against the keyword tier's reading (``read``: the readings the tier had already,
        the encoder's blend; the others are read now); return the texts passed over.

        Where the keyword tier names the model's primary among its intents, its other intents
        join the answer (up to 3).  Where the model calls a text social talk but the keyword tier
        reads social words and a request, rule 1 of the guide says the request decides, so the
        model is passed over and the tiers below answer."""
        read = read or {}
        unread = [i for i in answered if i not in read]
        try:
            fresh = self.secondaries([texts[i] for i in unread]) if unread else []
        except Exception:  # a second opinion is optional: the model's answers stand
            return []
        others = {**read, **dict(zip(unread, fresh))}
        declined = []
        for i in (i for i in answered if i in others):  # a short reply reads fewer texts, as zip would
            other = others[i]
            res, named = results[i], [n for n in other.get("all_intents", []) if n in INTENTS]
            request = other.get("primary_intent")
            social = tier.veto and res["primary_intent"] == SOCIAL_INTENT and SOCIAL_INTENT in named
            if social and request not in (SOCIAL_INTENT, FALLBACK_INTENT):
                results[i] = None
                reason = f"rule 1: social words with a request ({request}, keyword tier)"
                fallbacks[i].append(fallback(tier.name, Reason.RULE1, reason))
                declined.append(i)
            elif res["primary_intent"] in named:
                res["all_intents"] = list(dict.fromkeys([*res["all_intents"], *named]))[:MAX_INTENTS]
        return declined

    @staticmethod
    def _pass(tier: Tier, todo: list[int], kind: Reason, reason: str, fallbacks) -> list[int]:
        for i in todo:
            fallbacks[i].append(fallback(tier.name, kind, reason))
        return todo


def model_floor(settings: Settings, names: list[str]) -> float:
    """The confidence a model tier needs when the keyword tier comes after it.

    Both confidences are calibrated probabilities of being right, so a model's answer is
    worth taking over the keyword tier's only when it is at least as likely to be right as
    the keyword tier is on average (its accuracy on its calibration data).  A strong model
    rarely meets the floor from below; the bundled 135M model on the CPU often does, and
    then the keyword tier is the better bet.  ``--keyword-floor off`` turns it off."""
    from mlx_intent.keyword import calibrated_accuracy

    if not settings.keyword_floor or KEYWORD not in names:
        return 0.0
    return calibrated_accuracy(home=settings.home) or 0.0


def build_chain(
    settings: Settings | None = None,
    names: list[str] | None = None,
    memory: int | None = None,
    llm_weights: dict[str, float] | None = None,
    *,
    store: Store | None = None,
    sample: bool = False,
    recording: bool = True,
    mode: str | None = None,
    wrap_load: Callable[[Callable[[], object]], Callable[[], object]] | None = None,
) -> Chain:
    """The chain from settings (default: ``load_settings()``: .env, then the environment): ``names``
    (--chain) or MLX_INTENT_CHAIN, else the default, finished: nobody changes it afterwards.  ``llm_weights`` give
    a blended LLM's weight instead of its stored one (`mlx-intent calibrate` measures the blend before it stores
    anything).  ``store`` keeps every answer (``classify --record``, the server); ``sample``: the LLM tiers sample
    in generate mode (``classify --sample``); ``recording`` False: ``classify_batch`` neither counts, logs nor
    keeps its answers (the caller does, or nobody); ``mode`` is how the LLM tiers decode (default settings.mode);
    ``wrap_load`` wraps every model tier's load (the server's live recalibration, which refits there)."""
    if settings is None:
        from mlx_intent.settings import load_settings

        settings = load_settings()
    names = list(names or settings.chain or default_chain_names(settings))
    mode = mode or settings.mode
    pool = ModelPool(
        settings.max_loaded_models, settings.retry_after_s, mode, memory, home=settings.home, sample=sample
    )
    floor = model_floor(settings, names)
    # Unset, the blend and the keyword tier answer at any confidence (handing their unsure answers down only loses
    # them); set by the user (--min-confidence, MLX_INTENT_MIN_CONFIDENCE), it holds for them too, as documented.
    chosen = settings.sources.get("min_confidence", "default") != "default"
    last = settings.min_confidence if chosen or settings.min_confidence != Settings.min_confidence else 0.0
    tiers = []
    secondaries = followup = None
    for i, name in enumerate(names):
        if name == KEYWORD:
            tiers.append(replace(keyword_tier(settings.home), margin=settings.margin, threshold=last))
            secondaries = tiers[-1].run
        elif name == GENERAL:
            tiers.append(general_tier())
        else:
            tier_floor = floor if KEYWORD in names[i + 1 :] else 0.0
            threshold = max(settings.min_confidence, tier_floor)
            base, _, mixed = name.partition("+")
            if base == ENCODER:
                # Blended, the tier already holds the keyword tier's reading: handing its unsure answers
                # to the keyword tier alone would answer worse, so it takes every text it can load for.  LLMs
                # between it and the keyword tier (the cascade place) get the texts it is unsure of, when one of
                # them is on disk: else the blend keeps them.
                below = names[i + 1 :]
                cascade = below[: below.index(KEYWORD)] if KEYWORD in below else None
                blended = settings.combine and cascade is not None and all(n in registry.REGISTRY for n in cascade)
                present = blended and any(pool.absent(n) is None for n in cascade)
                threshold = last if blended and not present else threshold
                llm, weight = None, 0.0
                if mixed:
                    registry.get_spec(mixed)  # unknown names fail when the chain is built
                    stored = read_place(mixed, settings.home).weight  # None: named by hand, never fitted
                    weight = (llm_weights or {}).get(mixed, 1.0 if stored is None else stored)
                    llm = llm_distributions(mixed, pool)
                budget, retry = settings.latency_budget_ms, settings.retry_after_s
                llm_load = (lambda m=mixed: pool.get(m)) if mixed else None
                tier = encoder_tier(
                    threshold, budget, retry, blended, home=settings.home, llm=llm, llm_weight=weight, llm_load=llm_load
                )
                followup = followup or learned_detector(tier.load)
            else:
                tier = llm_tier(name, pool, threshold, settings.latency_budget_ms)
            tiers.append(replace(tier, margin=settings.margin, floor=tier_floor))
    if wrap_load is not None:
        tiers = [replace(t, load=wrap_load(t.load)) if t.loads_model else t for t in tiers]
    return Chain(
        tiers,
        cache_size=settings.cache_size,
        log=ClassificationLog(settings.log) if settings.log else None,
        pool=pool,
        secondaries=secondaries,
        store=store,
        users=user_thresholds(settings.home),
        followup=followup,
        recording=recording,
    )


_DEFAULT: dict[str, object] = {}  # model name -> a shared IntentClassifier


def classify(text: str, model: str | None = None, mode: str = "score", user: str | None = None) -> dict:
    """Classify one text with a shared classifier (loaded on first use); the result's ``id`` is its own, as
    the chain's are (``mlx_intent.feedback``).  ``ambiguous`` says whether its top two intents are closer than
    ``user``'s margin (``mlx-intent users``; else MLX_INTENT_MARGIN).  One model has no tier to pass a text
    to: a user's min_confidence takes effect in the chain (``build_chain().classify(text, user=)``)."""
    from mlx_intent.classifier import IntentClassifier
    from mlx_intent.settings import load_settings

    settings = load_settings()
    limits = (user_thresholds(settings.home)(check_user(user)) if user is not None else None) or {}
    name = model or loading.select_from_settings(settings=settings)
    if name not in _DEFAULT:  # picked and loaded from one folder, the settings' (.env included)
        _DEFAULT[name] = IntentClassifier(name, home=settings.home)
    result = _DEFAULT[name].classify(text, mode=mode)
    gap = top_gap(result)
    ambiguous = gap is not None and gap < limits.get("margin", settings.margin)
    return {**result, "ambiguous": ambiguous, "id": new_id()}
