"""Figures, alerts and charts from a classification log (``mlx-intent stats``).

The summary is built by replaying the log through the same Metrics the live process uses, so the two
never disagree on how a figure is computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_intent.errors import EXIT_CRITICAL, EXIT_WARNING
from mlx_intent.metrics import Metrics
from mlx_intent.schema import INTENTS, LANGUAGES

# The seed's alert thresholds.
ACCURACY_MIN = 0.80  # below: critical (only where labels are present; for feedback, the seed's user satisfaction)
FEEDBACK_MIN_RECORDS = 20  # fewer feedback records raise no accuracy alert: a few unhappy users are not a trend
P95_LATENCY_MAX_MS = 1000.0  # per query; above: warning
FALLBACK_RATE_MAX = 0.10  # run-time fallbacks (a tier merely absent here is not one); above: warning
PEAK_MEMORY_MAX_MB = 7 * 1024.0  # 7 GB (in MiB, like peak_memory_mb); above: critical

EXIT_OK = 0  # warnings and criticals have their own exit codes (mlx_intent.errors), never 1 or 2


@dataclass(frozen=True)
class Alert:
    """One threshold crossed: level is "warning" or "critical"."""

    level: str
    metric: str
    value: float
    threshold: float
    message: str


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics.snapshot() of the records (each with its own lang and optional label)."""
    metrics = Metrics(live_memory=False)
    for number, record in enumerate(records, 1):
        try:
            metrics.record(record, lang=record.get("lang"), label=record.get("label"))
        except KeyError as e:
            raise ValueError(f"record {number}: missing field {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"record {number}: {e}") from None
    return metrics.snapshot()


def feedback_alert(figures: Mapping[str, Any] | None) -> Alert | None:
    """The critical alert of the accuracy the feedback reports (``mlx_intent.feedback.data.accuracy``), from
    FEEDBACK_MIN_RECORDS records on; /metrics shows the same."""
    if not figures or figures["count"] < FEEDBACK_MIN_RECORDS or figures["rate"] >= ACCURACY_MIN:
        return None
    rate = figures["rate"]
    why = f"feedback accuracy {rate:.1%} < {ACCURACY_MIN:.0%} ({figures['corrected']} of {figures['count']} corrected)"
    return Alert("critical", "feedback_accuracy", rate, ACCURACY_MIN, why)


def check(summary: Mapping[str, Any]) -> list[Alert]:
    """The alerts a summary raises; figures that are None (no data) raise none.  Latency is per query;
    the fallback rate counts tiers passed over at run time, not those absent here (not installed, too large);
    ``summary["feedback"]``, where present, is the feedback store's accuracy."""
    alerts = [a for a in [feedback_alert(summary.get("feedback"))] if a is not None]
    accuracy = summary["accuracy"]["rate"]
    if accuracy is not None and accuracy < ACCURACY_MIN:
        alerts.append(
            Alert(
                "critical",
                "accuracy",
                accuracy,
                ACCURACY_MIN,
                f"accuracy {accuracy:.1%} < {ACCURACY_MIN:.0%}",
            )
        )
    p95 = summary["latency_ms"]["p95"]
    if p95 is not None and p95 > P95_LATENCY_MAX_MS:
        alerts.append(
            Alert(
                "warning",
                "p95_latency_ms",
                p95,
                P95_LATENCY_MAX_MS,
                f"p95 latency {p95:.0f} ms per query > {P95_LATENCY_MAX_MS:g} ms",
            )
        )
    fallback = summary["fallback"]["rate"]
    if fallback is not None and fallback > FALLBACK_RATE_MAX:
        alerts.append(
            Alert(
                "warning",
                "fallback_rate",
                fallback,
                FALLBACK_RATE_MAX,
                f"fallback rate {fallback:.1%} at run time > {FALLBACK_RATE_MAX:.0%}",
            )
        )
    memory = summary["peak_memory_mb"]
    if memory is not None and memory > PEAK_MEMORY_MAX_MB:
        alerts.append(
            Alert(
                "critical",
                "peak_memory_mb",
                memory,
                PEAK_MEMORY_MAX_MB,
                f"peak memory {memory / 1024:.2f} GB > {PEAK_MEMORY_MAX_MB / 1024:.0f} GB",
            )
        )
    return alerts


def exit_code(alerts: list[Alert]) -> int:
    """0 with no alerts, EXIT_WARNING with warnings only, EXIT_CRITICAL with any critical alert."""
    if any(a.level == "critical" for a in alerts):
        return EXIT_CRITICAL
    return EXIT_WARNING if alerts else EXIT_OK


def _ordered(counts: Mapping[str, int], known: Iterable[str]) -> list[str]:
    """Known names in their canonical order, then any others seen, sorted."""
    known = list(known)
    return known + sorted(set(counts) - set(known))


def _by_count(counts: Mapping[str, int]) -> list[str]:
    return sorted(counts, key=lambda name: (-counts[name], name))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _table(rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def _counts_table(title: str, counts: Mapping[str, int], order: Iterable[str], total: int) -> str:
    rows = [[title, "count", "share"]]
    rows += [[name, str(counts.get(name, 0)), _pct(counts.get(name, 0) / total)] for name in order]
    return _table(rows)


def feedback_line(figures: Mapping[str, Any]) -> str:
    """The feedback row of the report: accuracy over the judged answers."""
    if not figures["count"]:
        return "-"
    return f"{_pct(figures['rate'])} ({figures['confirmed']} confirmed, {figures['corrected']} corrected)"


def render(summary: Mapping[str, Any], skipped: int = 0) -> str:
    """The text report of `mlx-intent stats`."""
    n = summary["count"]
    lat, fb, acc, cache = summary["latency_ms"], summary["fallback"], summary["accuracy"], summary["cache"]
    call, batch = summary.get("latency_per_call_ms") or {}, summary.get("batch_texts") or {}
    memory = summary["peak_memory_mb"]
    absent = fb.get("absent_tiers") or {}
    overview = [
        ["records", str(n) + (f" ({skipped} torn trailing line skipped)" if skipped else "")],
        [
            "accuracy",
            f"{_pct(acc['rate'])} ({acc['correct']}/{acc['labelled']} labelled)" if acc["labelled"] else "-",
        ],
        *([["feedback", feedback_line(summary["feedback"])]] if summary.get("feedback") else []),
        [
            "latency ms",
            f"p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}  p99 {_ms(lat['p99'])}  max {_ms(lat['max'])}  per query",
        ],
    ]
    if call:
        overview.append(
            [
                "",
                f"p50 {_ms(call['p50'])}  p95 {_ms(call['p95'])}  p99 {_ms(call['p99'])}  max {_ms(call['max'])}"
                f"  per call (batches of {_ms(batch.get('mean'))} queries on average, at most {batch.get('max')})",
            ]
        )
    overview += [
        [
            "fallback rate",
            f"{_pct(fb['rate'])} ({fb['count']}) at run time" + (" (absent tiers not counted)" if absent else ""),
        ],
        ["valid JSON", _pct(summary["valid_json_rate"])],
        ["cache hit rate", f"{_pct(cache['rate'])} ({cache['hits']})"],
        ["peak memory", "-" if memory is None else f"{memory:.1f} MB"],
    ]
    overview += [
        ["top fallback" if i == 0 else "", f"{count:>6}  {reason}"]
        for i, (reason, count) in enumerate(list(fb["reasons"].items())[:5])
    ]
    overview += [
        ["absent tiers" if i == 0 else "", f"{name}: {seen['reason']}"] for i, (name, seen) in enumerate(absent.items())
    ]
    sections = ["\n".join(f"{k:<15} {v}" for k, v in overview)]

    tiers = _by_count(summary["by_tier"])
    by_tier_intent = summary["by_tier_intent"]
    rows = [["intent", "count", "share", *tiers]]
    for intent in _ordered(summary["by_intent"], INTENTS):
        count = summary["by_intent"].get(intent, 0)
        per_tier = [str(by_tier_intent[t].get(intent, 0)) for t in tiers]
        rows.append([intent, str(count), _pct(count / n), *per_tier])
    sections.append(_table(rows))
    sections.append(_counts_table("tier", summary["by_tier"], tiers, n))
    sections.append(_counts_table("language", summary["by_lang"], _ordered(summary["by_lang"], LANGUAGES), n))
    sections.append(_counts_table("model", summary["by_model"], _by_count(summary["by_model"]), n))

    conf = summary["confidence"]
    peak = max(conf["counts"]) or 1
    rows = [["confidence", "count"]]
    rows += [[f"{lo:.1f}-{hi:.1f}", str(c)] for lo, hi, c in zip(conf["edges"], conf["edges"][1:], conf["counts"])]
    bars = [""] + ["#" * round(30 * c / peak) for c in conf["counts"]]
    sections.append("\n".join(f"{line}  {bar}".rstrip() for line, bar in zip(_table(rows).splitlines(), bars)))
    return "\n\n".join(sections)


def _bucket_labels(edges: list[float]) -> list[str]:
    return [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]


def write_plots(summary: Mapping[str, Any], directory: Path) -> list[Path]:
    """latency.png, confidence.png and intents_by_tier.png in directory (created); needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: files only, no display needed
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig: Figure, name: str) -> None:
        fig.tight_layout()
        path = directory / name
        FigureCanvasAgg(fig).print_png(path)
        paths.append(path)

    lat = summary["latency_ms"]
    counts, labels = lat["counts"], _bucket_labels(lat["edges"])
    used = [i for i, c in enumerate(counts) if c] or [0]
    span = range(used[0], used[-1] + 1)
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.bar([labels[i] for i in span], [counts[i] for i in span], color="tab:blue")
    ax.set(xlabel="latency per query (ms)", ylabel="queries")
    ax.set_title(f"Latency per query: p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}  p99 {_ms(lat['p99'])} ms")
    ax.tick_params(axis="x", labelrotation=45)
    save(fig, "latency.png")

    conf = summary["confidence"]
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.bar(
        [e + 0.05 for e in conf["edges"][:-1]],
        conf["counts"],
        width=0.1,
        edgecolor="white",
        color="tab:green",
    )
    ax.set(xlabel="confidence", ylabel="queries", xlim=(0, 1), title="Confidence")
    save(fig, "confidence.png")

    intents = _ordered(summary["by_intent"], INTENTS)
    fig = Figure(figsize=(10, 5))
    ax = fig.subplots()
    bottom = [0] * len(intents)
    for tier in _by_count(summary["by_tier"]):
        heights = [summary["by_tier_intent"][tier].get(i, 0) for i in intents]
        ax.bar(range(len(intents)), heights, bottom=bottom, label=tier)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(intents)), intents, rotation=60, ha="right", rotation_mode="anchor")
    ax.set(ylabel="queries", title="Intents by tier")
    ax.legend(title="tier")
    save(fig, "intents_by_tier.png")
    return paths
