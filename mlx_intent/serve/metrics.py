"""The server's Prometheus metrics, in a registry of their own (several apps may live in one process): requests
by endpoint and status (counted by the middleware), answers by intent and tier, fallbacks, tiers absent here,
cache hits, abandoned requests, batch sizes, the queue, peak memory and lost log records; and the feedback
store's figures, read at each scrape (``register_metrics``)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from mlx_intent.chain import Chain
from mlx_intent.feedback.data import accuracy
from mlx_intent.feedback.store import Store, StoreError
from mlx_intent.metrics import MB, is_absent, is_warming
from mlx_intent.serve.batcher import Batcher
from mlx_intent.stats import feedback_alert

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Prometheus:
    """The service's metrics in ``registry``; ``answered`` counts one answer as given."""

    def __init__(self, batcher: Batcher, chain: Chain):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mlx_intent_http_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "mlx_intent_http_request_seconds", "HTTP request time", ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.intents = Counter("mlx_intent_intents", "Answers by primary intent", ["intent"], registry=r)
        self.tiers = Counter("mlx_intent_tiers", "Answers by the tier that gave them", ["tier"], registry=r)
        self.fallbacks = Counter(
            "mlx_intent_fallbacks",
            "Tiers passed over at run time, by reason kind (tiers absent here: mlx_intent_tier_absent)",
            ["tier", "reason"],
            registry=r,
        )
        self.fallback_answers = Counter(
            "mlx_intent_fallback_answers",
            "Answers a tier passed over at run time: the fallback rate is this over mlx_intent_tiers",
            registry=r,
        )
        self.absent = Gauge(
            "mlx_intent_tier_absent",
            "1 for a tier absent here (reason not_installed or too_large): a configuration fact, not a fallback",
            ["tier", "reason"],
            registry=r,
        )
        self.absent_seen: set[tuple[str, str]] = set()
        self.cache_hits = Counter("mlx_intent_cache_hits", "Answers from the result cache", registry=r)
        self.abandoned = Counter(
            "mlx_intent_abandoned_requests",
            "Requests whose client left before the answer (status 499): neither counted as answered, logged nor kept",
            registry=r,
        )
        self.batches = Histogram(
            "mlx_intent_batch_texts", "Texts per batch run by the worker", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        Gauge("mlx_intent_queue_jobs", "Jobs waiting for the worker", registry=r).set_function(batcher.waiting)
        peak = Gauge("mlx_intent_peak_memory_bytes", "Peak MLX memory of this process", registry=r)
        peak.set_function(lambda: (chain.metrics.snapshot()["peak_memory_mb"] or 0) * MB)
        lost = Gauge(
            "mlx_intent_log_write_failures",
            "Answers given whose classification log record could not be written (full disk...); only grows",
            registry=r,
        )
        lost.set_function(lambda: chain.metrics.log_write_failures)

    def answered(self, result: dict) -> None:
        self.intents.labels(result["primary_intent"]).inc()
        self.tiers.labels(result["tier"]).inc()
        present = {result["tier"]}
        for f in result.get("fallbacks") or ():
            if is_absent(f):
                self.absent.labels(f["tier"], f["kind"]).set(1)
                self.absent_seen.add((f["tier"], f["kind"]))
            else:  # a tier still loading is counted by its kind, "loading", but the answer is no fallback
                self.fallbacks.labels(f["tier"], f["kind"]).inc()
                present.update([] if is_warming(f) else [f["tier"]])
        self.fallback_answers.inc(len(present) > 1)
        for tier, kind in self.absent_seen:
            if tier in present:  # pulled since, and loaded: no longer absent
                self.absent.labels(tier, kind).set(0)
        if result.get("cached"):
            self.cache_hits.inc()


def register_metrics(registry, store: Store) -> None:
    """Gauges of the feedback in a Prometheus registry, read from the store at each scrape (other processes
    write to it too): accuracy, records by verdict, and the critical alert of ``stats --check``."""

    class Collector:
        def collect(self):
            lost = GaugeMetricFamily(
                "mlx_intent_feedback_results_lost", "Answers given whose record the store could not keep; only grows"
            )
            lost.add_metric([], store.lost)
            try:
                figures = accuracy(store)
            except StoreError:  # busy past its timeout: this scrape goes without the feedback figures
                return [lost]
            rate = GaugeMetricFamily(
                "mlx_intent_feedback_accuracy", "Share of judged answers whose primary intent was right (NaN: none)"
            )
            rate.add_metric([], math.nan if figures["rate"] is None else figures["rate"])
            records = GaugeMetricFamily("mlx_intent_feedback_records", "Feedback records", labels=["verdict"])
            records.add_metric(["confirmed"], figures["confirmed"])
            records.add_metric(["corrected"], figures["corrected"])
            alert = GaugeMetricFamily(
                "mlx_intent_feedback_accuracy_critical", "1 while feedback accuracy raises the critical alert"
            )
            alert.add_metric([], float(feedback_alert(figures) is not None))
            return [lost, rate, records, alert]

    registry.register(Collector())
