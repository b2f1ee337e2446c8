"""The feedback store's figures as Prometheus gauges, for the server's ``/metrics``."""

from __future__ import annotations

import math

from mlx_intent.feedback.data import accuracy
from mlx_intent.feedback.store import Store, StoreError


def register_metrics(registry, store: Store) -> None:
    """Gauges of the feedback in a Prometheus registry, read from the store at each scrape (other processes
    write to it too): accuracy, records by verdict, and the critical alert of ``stats --check``."""
    from prometheus_client.core import GaugeMetricFamily

    from mlx_intent.stats import feedback_alert

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
