"""Metrics (percentiles, rates, histograms, thread safety) and the crash-safe classification log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from mlx_intent.metrics import (
    LATENCY_EDGES_MS,
    ClassificationLog,
    LogError,
    Metrics,
    log_record,
    peak_memory_mb,
    read_log,
)
from mlx_intent.schema import INTENTS


def result(
    intent: str = INTENTS[0],
    confidence: float = 0.9,
    tier: str = "primary",
    latency_ms: float = 100.0,
    fallbacks: list | None = None,
    **extra: object,
) -> dict:
    return {
        "primary_intent": intent,
        "confidence": confidence,
        "all_intents": [intent],
        "tier": tier,
        "model": "m",
        "fallbacks": fallbacks or [],
        "latency_ms": latency_ms,
        "cached": False,
        **extra,
    }


def test_empty_snapshot():
    snap = Metrics().snapshot()
    assert snap["count"] == 0
    assert snap["latency_ms"]["p50"] is None and snap["fallback"]["rate"] is None
    assert snap["valid_json_rate"] is None and snap["accuracy"]["rate"] is None
    json.dumps(snap)


def test_percentiles_match_numpy_linear():
    import numpy as np

    m = Metrics()
    latencies = [float(x) for x in range(1, 101)]  # 1..100 ms
    for x in reversed(latencies):
        m.record(result(latency_ms=x))
    lat = m.snapshot()["latency_ms"]
    for q in (50, 95, 99):
        assert lat[f"p{q}"] == pytest.approx(np.percentile(latencies, q))
    assert lat["mean"] == pytest.approx(50.5) and lat["max"] == 100.0


def test_latency_histogram_buckets():
    m = Metrics()
    for x in (0.5, 1.0, 1.5, 999.0, 1000.0, 10**6):
        m.record(result(latency_ms=x))
    lat = m.snapshot()["latency_ms"]
    assert lat["edges"] == list(LATENCY_EDGES_MS) and len(lat["counts"]) == len(LATENCY_EDGES_MS) + 1
    counts = lat["counts"]
    assert counts[0] == 1  # < 1 ms
    assert counts[1] == 2  # [1, 2)
    assert counts[LATENCY_EDGES_MS.index(1000)] == 1  # [500, 1000)
    assert counts[LATENCY_EDGES_MS.index(1000) + 1] == 1  # [1000, 2000)
    assert counts[-1] == 1  # beyond the last edge
    assert sum(counts) == 6


def test_reservoir_is_bounded_and_representative():
    """Latencies that grow with time: a reservoir that stopped replacing once full would keep only the
    first 1,000 (p50 near 500), one that kept only the newest the last 1,000 (p50 near 19,500)."""
    m = Metrics(reservoir_size=1000)
    for i in range(20_000):
        m.record(result(latency_ms=float(i)))
    assert len(m._latencies) == 1000
    lat = m.snapshot()["latency_ms"]
    assert lat["p50"] == pytest.approx(10_000, abs=1_200)
    assert lat["p95"] == pytest.approx(19_000, abs=500)
    assert m.snapshot()["count"] == 20_000


def test_counts_rates_and_histograms():
    m = Metrics()
    a, b = INTENTS[1], INTENTS[2]
    m.record(result(a, 0.95, "primary"), lang="en", label=a)
    m.record(result(a, 0.05, "primary", cached=True), lang="tr", label=b)
    m.record(
        result(b, 0.55, "keyword", fallbacks=[{"tier": "primary", "reason": "low_confidence"}], valid_json=False),
        lang="tr",
    )
    m.record(
        result(
            b,
            1.0,
            "constant",
            fallbacks=[{"tier": "primary", "reason": "timeout"}, {"tier": "keyword", "reason": "no_match"}],
        )
    )
    snap = m.snapshot()
    assert snap["count"] == 4
    assert snap["by_intent"] == {a: 2, b: 2}
    assert snap["by_tier"] == {"primary": 2, "keyword": 1, "constant": 1}
    assert snap["by_lang"] == {"en": 1, "tr": 2, "unknown": 1}
    assert snap["by_tier_intent"] == {"primary": {a: 2}, "keyword": {b: 1}, "constant": {b: 1}}
    assert snap["fallback"]["count"] == 2 and snap["fallback"]["rate"] == 0.5
    assert snap["fallback"]["reasons"] == {
        "primary: low_confidence": 1,
        "primary: timeout": 1,
        "keyword: no_match": 1,
    }
    assert snap["valid_json_rate"] == 0.75
    assert snap["cache"] == {"hits": 1, "rate": 0.25}
    assert snap["accuracy"] == {"labelled": 2, "correct": 1, "rate": 0.5}
    conf = snap["confidence"]
    assert len(conf["counts"]) == 10 and len(conf["edges"]) == 11
    assert conf["counts"][0] == 1 and conf["counts"][5] == 1 and conf["counts"][9] == 2
    json.dumps(snap)


def test_distinct_fallback_reasons_are_bounded():
    m = Metrics()
    for i in range(500):
        m.record(result(fallbacks=[{"tier": "t", "reason": f"error {i}"}]))
    reasons = m.snapshot()["fallback"]["reasons"]
    assert len(reasons) <= 101 and sum(reasons.values()) == 500 and "(other)" in reasons


def test_peak_memory_from_results_and_mlx():
    m = Metrics(live_memory=False)
    m.record(result(peak_memory_mb=100.0))
    m.record(result(peak_memory_mb=50.0))
    m.record(result())
    assert m.snapshot()["peak_memory_mb"] == 100.0


def test_peak_memory_mb_reads_mlx_only_when_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    assert peak_memory_mb() is None  # MLX not imported: no figure, and no import to get one
    assert "mlx.core" not in sys.modules
    monkeypatch.setitem(sys.modules, "mlx.core", types.SimpleNamespace(get_peak_memory=lambda: 3 * 1024 * 1024))
    assert peak_memory_mb() == 3.0
    monkeypatch.setitem(sys.modules, "mlx.core", types.SimpleNamespace(get_peak_memory=lambda: 1 / 0))
    assert peak_memory_mb() is None  # a backend without the counter never fails a classification


def test_thread_safety():
    m = Metrics()

    def work():
        for i in range(2000):
            m.record(result(INTENTS[i % len(INTENTS)], latency_ms=float(i)), lang="en", label=INTENTS[0])
            if i % 500 == 0:
                m.snapshot()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap["count"] == 16_000
    assert sum(snap["by_intent"].values()) == 16_000 and sum(snap["latency_ms"]["counts"]) == 16_000
    assert snap["by_lang"] == {"en": 16_000}


def test_log_record_fields():
    record = log_record(result(), "where to eat", "en", label=INTENTS[1])
    assert record["text"] == "where to eat" and record["lang"] == "en" and record["label"] == INTENTS[1]
    assert "ts" in record and "peak_memory_mb" in record and record["primary_intent"] == INTENTS[0]
    assert "label" not in log_record(result(), "x", None)


def test_log_roundtrip_and_append(tmp_path):
    path = tmp_path / "log.jsonl"
    with ClassificationLog(path) as log:
        log.write(log_record(result(), "ü ş ı — 東京", "tr"))
    with ClassificationLog(path) as log:  # reopening appends
        log.write(log_record(result(), "second", "en"))
    records = read_log(path)
    assert [r["text"] for r in records] == ["ü ş ı — 東京", "second"] and records.skipped == 0
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_torn_last_line_is_tolerated_and_repaired(tmp_path):
    path = tmp_path / "log.jsonl"
    with ClassificationLog(path) as log:
        for i in range(3):
            log.write({"ts": "t", "i": i})  # a log's records start with their time (metrics.LOG_START)
    with open(path, "ab") as f:
        f.write(b'{"ts":"t","i": 3, "te')  # a crash mid-write
    records = read_log(path)
    assert [r["i"] for r in records] == [0, 1, 2] and records.skipped == 1

    with ClassificationLog(path) as log:  # reopening cuts the fragment off before appending
        log.write({"ts": "t", "i": 4})
    records = read_log(path)
    assert [r["i"] for r in records] == [0, 1, 2, 4] and records.skipped == 0


def test_whole_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"ts":"t","i": 0}\n{"ts":"t","i": 1}')
    with ClassificationLog(path) as log:
        log.write({"ts": "t", "i": 2})
    assert [r["i"] for r in read_log(path)] == [0, 1, 2]


def test_corruption_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"i": 0}\n\n{"i": 1\n{"i": 2}\n')
    with pytest.raises(LogError, match=r"log\.jsonl:3: corrupt record"):
        read_log(path)
    path.write_text('{"i": 0}\n[1, 2]\n{"i": 2}\n')
    with pytest.raises(LogError, match=r":2: corrupt record \(expected a JSON object"):
        read_log(path)


def test_missing_log(tmp_path):
    with pytest.raises(LogError, match="cannot read log"):
        read_log(tmp_path / "absent.jsonl")


WRITER = textwrap.dedent(
    """
    import sys
    from mlx_intent.metrics import ClassificationLog, read_log

    i = len(read_log(sys.argv[1])) if len(sys.argv) > 2 else 0
    log = ClassificationLog(sys.argv[1])
    while True:
        log.write({"ts": "t", "i": i, "text": "x" * (i % 5000), "primary_intent": "general"})
        print(i, flush=True)  # printed only once the line is durable
        i += 1
    """
)


def test_log_survives_sigkill(tmp_path):
    """Kill a writer mid-run, three times on the same log: no completed line is ever lost."""
    path = tmp_path / "log.jsonl"
    for round_ in range(3):
        args = [sys.executable, "-c", WRITER, str(path)] + (["resume"] if round_ else [])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        try:
            acknowledged = -1
            deadline = time.monotonic() + 30
            while acknowledged < 200 * (round_ + 1) and time.monotonic() < deadline:
                acknowledged = int(proc.stdout.readline())
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for line in proc.stdout:  # acknowledgements still in the pipe
            acknowledged = int(line)
        proc.stdout.close()
        assert acknowledged >= 200 * (round_ + 1) and proc.returncode == -signal.SIGKILL

        records = read_log(path)
        numbers = [r["i"] for r in records]
        assert numbers == list(range(len(numbers)))  # every completed line parses, none lost or reordered
        assert acknowledged + 1 <= len(numbers) <= acknowledged + 2  # at most one written, unacknowledged
        assert records.skipped <= 1


def test_one_percentile_for_metrics_scores_and_benchmarks():
    """numpy's linear definition everywhere: the metrics, eval scores and benchmark reports agree."""
    import random

    import numpy as np

    from mlx_intent.evaluation import scores
    from mlx_intent.metrics import percentile_sorted

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    rng = random.Random(3)
    values = [rng.expovariate(1.0) for _ in range(37)]  # unsorted, as the benchmarks pass them
    for q in (50, 95, 99):
        want = float(np.percentile(values, q))
        assert percentile_sorted(sorted(values), q) == pytest.approx(want)
        assert scores.percentile(values, q) == pytest.approx(want)
        assert common.percentile(values, q) == pytest.approx(want)
