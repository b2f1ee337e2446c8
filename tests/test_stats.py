"""`mlx-intent stats`: summarize, alerts and --check exit codes, --plot files, errors on bad logs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mlx_intent.cli.stats import stats_command
from mlx_intent.errors import EXIT_CRITICAL, EXIT_INPUT, EXIT_WARNING
from mlx_intent.metrics import ClassificationLog, log_record
from mlx_intent.schema import INTENTS
from mlx_intent.stats import (
    ACCURACY_MIN,
    FALLBACK_RATE_MAX,
    P95_LATENCY_MAX_MS,
    PEAK_MEMORY_MAX_MB,
    check,
    summarize,
)


def record(
    i: int,
    *,
    latency_ms: float = 100.0,
    correct: bool = True,
    fallback: bool = False,
    memory_mb: float = 500.0,
    lang: str | None = "en",
) -> dict:
    intent = INTENTS[i % len(INTENTS)]
    result = {
        "primary_intent": intent,
        "confidence": (i % 10) / 10 + 0.05,
        "all_intents": [intent],
        "tier": "keyword" if fallback else "primary",
        "model": None if fallback else "smol",
        "fallbacks": [{"tier": "primary", "reason": "low_confidence"}] if fallback else [],
        "latency_ms": latency_ms,
        "cached": i % 4 == 0,
        "valid_json": True,
        "peak_memory_mb": memory_mb,
    }
    label = intent if correct else INTENTS[(i + 1) % len(INTENTS)]
    return log_record(result, f"query {i}", lang, label=label)


def write_log(path, records) -> str:
    with ClassificationLog(path) as log:
        for r in records:
            log.write(r)
    return str(path)


def healthy(n: int = 100) -> list[dict]:
    return [record(i) for i in range(n)]


def test_summarize():
    records = healthy(100)
    records += [record(i, fallback=True, correct=False, latency_ms=2000.0) for i in range(100, 105)]
    summary = summarize(records)
    assert summary["count"] == 105
    assert summary["accuracy"] == {"labelled": 105, "correct": 100, "rate": 100 / 105}
    assert summary["fallback"]["rate"] == pytest.approx(5 / 105)
    assert summary["fallback"]["reasons"] == {"primary: low_confidence": 5}
    assert summary["by_tier"] == {"primary": 100, "keyword": 5}
    assert summary["by_lang"] == {"en": 105}
    assert summary["latency_ms"]["p50"] == 100.0 and summary["latency_ms"]["max"] == 2000.0
    assert summary["cache"]["hits"] == 27
    assert summary["peak_memory_mb"] == 500.0
    assert sum(summary["confidence"]["counts"]) == 105
    assert check(summary) == []


def test_summarize_names_a_bad_record():
    records = healthy(3)
    del records[1]["latency_ms"]
    with pytest.raises(ValueError, match="record 2: missing field 'latency_ms'"):
        summarize(records)


def test_check_thresholds():
    def alerts(records):
        return [(a.level, a.metric) for a in check(summarize(records))]

    assert alerts([record(i, latency_ms=P95_LATENCY_MAX_MS) for i in range(20)]) == []  # at the line: fine
    assert alerts([record(i, latency_ms=P95_LATENCY_MAX_MS + 1) for i in range(20)]) == [("warning", "p95_latency_ms")]
    assert FALLBACK_RATE_MAX == 0.10 and ACCURACY_MIN == 0.80
    assert alerts([record(i, fallback=i < 2) for i in range(20)]) == []  # 10%
    assert alerts([record(i, fallback=i < 3) for i in range(20)]) == [("warning", "fallback_rate")]  # 15%
    assert alerts([record(i, correct=i >= 4) for i in range(20)]) == []  # 80%
    assert alerts([record(i, correct=i >= 5) for i in range(20)]) == [("critical", "accuracy")]  # 75%

    heavy = check(summarize([record(i, memory_mb=PEAK_MEMORY_MAX_MB + 1) for i in range(20)]))
    assert [(a.level, a.metric) for a in heavy] == [("critical", "peak_memory_mb")]
    assert "GB" in heavy[0].message and heavy[0].threshold == PEAK_MEMORY_MAX_MB == 7 * 1024


ABSENT = [
    {
        "tier": "llama-3.2-3b",
        "reason": "not downloaded (get it with: mlx-intent models pull llama-3.2-3b)",
        "kind": "not_installed",
    },
    {"tier": "tinyllama", "reason": "does not fit in memory (needs 2 GB)", "kind": "too_large"},
]


def test_tiers_absent_here_raise_no_fallback_alert(tmp_path):
    """Every answer passed over two tiers that are not installed here: a configuration fact, listed once,
    with no fallback warning; one tier passed over at run time in 3 of 20 still warns."""
    absent_only = [{**record(i), "fallbacks": ABSENT} for i in range(20)]
    summary = summarize(absent_only)
    assert summary["fallback"]["rate"] == 0.0 and summary["fallback"]["passed_over"]["rate"] == 1.0
    assert list(summary["fallback"]["absent_tiers"]) == ["llama-3.2-3b", "tinyllama"]
    assert check(summary) == []
    log = write_log(tmp_path / "log.jsonl", absent_only)
    result = CliRunner().invoke(stats_command, [log, "--check"])
    assert result.exit_code == 0 and "OK: no alerts" in result.output, result.output
    report = CliRunner().invoke(stats_command, [log]).output
    assert "fallback rate   0.0% (0) at run time" in report
    assert "absent tiers    llama-3.2-3b: not downloaded" in report and report.count("tinyllama") == 1

    mixed = [{**r, "fallbacks": [*ABSENT, *r["fallbacks"]]} for r in (record(i, fallback=i < 3) for i in range(20))]
    alerts = check(summarize(mixed))
    assert [(a.metric, a.value) for a in alerts] == [("fallback_rate", pytest.approx(3 / 20))]
    assert alerts[0].message == "fallback rate 15.0% at run time > 10%"


def test_latency_alert_is_per_query():
    """A batch of 8 taking 1600 ms is 200 ms per query: no latency alert (a log without the per-query
    field is read as one text per call)."""
    batched = [{**record(i, latency_ms=1600.0), "latency_per_query_ms": 200.0, "batch_texts": 8} for i in range(16)]
    summary = summarize(batched)
    assert summary["latency_ms"]["p95"] == 200.0 and summary["latency_per_call_ms"]["p95"] == 1600.0
    assert summary["batch_texts"] == {"mean": 8.0, "max": 8}
    assert check(summary) == []
    assert [a.metric for a in check(summarize([record(i, latency_ms=1600.0) for i in range(16)]))] == ["p95_latency_ms"]


def test_no_labels_means_no_accuracy_alert():
    records = healthy(10)
    for r in records:
        del r["label"]
    summary = summarize(records)
    assert summary["accuracy"]["rate"] is None and check(summary) == []


@pytest.mark.parametrize(
    ("kind", "code", "shown"),
    [
        ("healthy", 0, "OK: no alerts"),
        ("slow", EXIT_WARNING, "WARNING  p95 latency"),
        ("slow_and_wrong", EXIT_CRITICAL, "CRITICAL accuracy"),
        ("heavy", EXIT_CRITICAL, "CRITICAL peak memory"),
    ],
)
def test_check_exit_codes(tmp_path, kind, code, shown):
    records = {
        "healthy": healthy(50),
        "slow": [record(i, latency_ms=1500.0) for i in range(50)],
        "slow_and_wrong": [record(i, latency_ms=1500.0, correct=i % 2 == 0) for i in range(50)],
        "heavy": [record(i, memory_mb=8 * 1024.0) for i in range(50)],
    }[kind]
    log = write_log(tmp_path / "log.jsonl", records)
    result = CliRunner().invoke(stats_command, [log, "--check"])
    assert result.exit_code == code, result.output
    assert shown in result.output


def test_report(tmp_path):
    records = healthy(30) + [record(30, fallback=True, lang="tr"), record(31, lang=None)]
    log = write_log(tmp_path / "log.jsonl", records)
    with open(log, "ab") as f:
        f.write(b'{"primary_intent": "gen')  # torn by a crash
    result = CliRunner().invoke(stats_command, [log])
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in (
        "32 (1 torn trailing line skipped)",
        "accuracy",
        "p50 100.0",
        "p95",
        "p99",
        "fallback rate   3.1% (1)",
        "primary: low_confidence",
        "valid JSON      100.0%",
        "cache hit rate",
        "peak memory     500.0 MB",
        "unknown",
        "confidence",
    ):
        assert expected in out, expected
    for intent in INTENTS:
        assert intent in out


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    log = write_log(tmp_path / "log.jsonl", healthy(40) + [record(40, fallback=True, latency_ms=3000.0)])
    out = tmp_path / "charts"
    result = CliRunner().invoke(stats_command, [log, "--plot", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("latency.png", "confidence.png", "intents_by_tier.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_log_from_settings(tmp_path):
    log = write_log(tmp_path / "log.jsonl", healthy(5))
    result = CliRunner().invoke(stats_command, ["--check"], env={"MLX_INTENT_LOG": log})
    assert result.exit_code == 0 and "no alerts over 5 records" in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no log file at"),
        (b"", "holds no records"),
        (b'{"torn', "holds no records"),
        (b'{"a": 1}\nnot json\n{"a": 2}\n', "log.jsonl:2: corrupt record"),
        (b'{"a": 1}\n', "record 1: missing field"),
    ],
)
def test_bad_logs_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "log.jsonl"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(stats_command, [str(path)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_no_log_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty_home = {"MLX_INTENT_LOG": None, "MLX_INTENT_HOME": str(tmp_path / "models")}  # no feedback store either
    result = CliRunner().invoke(stats_command, [], env=empty_home)
    assert result.exit_code == 1 and "no log given" in result.output


def test_help_documents_exit_codes():
    out = CliRunner().invoke(stats_command, ["--help"]).output
    assert "0  no alert" in out and "4  warnings only" in out and "5  any critical" in out
    # an alert never reads as an error in words (1) or as bad usage (2, click's code too)
    assert len({0, 1, EXIT_INPUT, EXIT_WARNING, EXIT_CRITICAL}) == 5
