"""The Markdown report of a run (``eval``), its file, and the number formats the other reports share.

Only formatting: it reads a summary (``run.summarize``) and writes text; running a chain is ``run``'s.  The
report starts with the command that reproduces it and links PNG figures written beside it.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from mlx_intent.chain import GENERAL, model_floor
from mlx_intent.models import registry
from mlx_intent.schema import LANGUAGES
from mlx_intent.settings import Settings

# ---- formats ------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def floor(x: tuple[float, float] | None) -> str:
    return "-" if x is None else f"{x[0]:.3f} / {x[1]:.3f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, first column left-aligned and the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def lang_order(langs) -> list[str]:
    return [lang for lang in LANGUAGES if lang in langs] + sorted(set(langs) - set(LANGUAGES))


def _floor_note(settings: Settings, names) -> str:
    floor = model_floor(settings, list(names))
    if floor <= settings.min_confidence:
        return ""
    return f" (for a model tier before the keyword tier: {floor:g}, the keyword tier's calibrated accuracy)"


def reproduce(words: list[str], settings: Settings, report: Path) -> str:
    """The command line that reruns this run whatever .env or the environment say: ``words`` (command,
    arguments) plus every setting that changes the answers or their timing."""
    parts = ["mlx-intent", *words, "--mode", settings.mode, "--min-confidence", f"{settings.min_confidence:g}"]
    parts += ["--keyword-floor", "on" if settings.keyword_floor else "off"]
    parts += ["--latency-budget-ms", f"{settings.latency_budget_ms:g}", "--batch-size", str(settings.batch_size)]
    if settings.sources.get("home", "default") != "default":  # set, not default_home()
        parts += ["--home", str(settings.home)]
    return shlex.join([*parts, "--report", shown(report)])


def shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def machine_lines(summary: dict[str, Any], who: str = "") -> list[str]:
    """Machine, load average around the run, and what each model tier ran with; ``who`` names the run."""
    (b1, b5, b15), (a1, a5, a15) = summary["load_avg"]
    mlx = sys.modules.get("mlx.core")
    lines = [
        f"Machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs"
        + (f", MLX {mlx.__version__} on {mlx.default_device()}" if mlx else ""),
        f"Load average{who} (1/5/15 min) before: {b1:.2f} / {b5:.2f} / {b15:.2f}, "
        f"after: {a1:.2f} / {a5:.2f} / {a15:.2f} (the machine is shared: latency is indicative).",
    ]
    for name, m in summary["models"].items():
        source = "from calibration.json" if m["calibration_file"] else "defaults, no calibration.json"
        if m.get("calibration_ignored"):
            source += "; ignored " + "; ".join(m["calibration_ignored"])
        adapter = f"LoRA adapter {m['adapter']}" if m["adapter"] else "no adapter"
        lines.append(
            f"Model {name}{who}: {adapter}; temperature {m['temperature']:g}, threshold {m['threshold']:g} ({source})."
        )
    for tier, reason in summary.get("absent_tiers", {}).items():
        lines.append(f"Tier {tier}{who} is not installed here (passed over, not counted as a fallback): {reason}.")
    for tier, reason in summary["skipped"].items():
        lines.append(f"**Tier {tier}{who} could not load and passed over every query:** {reason}.")
    return lines


def render(
    summary: dict[str, Any],
    *,
    title: str,
    command: str,
    data: Path,
    names: tuple[str, ...],
    settings: Settings,
    figures: dict[str, str],
) -> str:
    s = summary
    lat, call, batch = s["latency"], s["latency_per_call"], s["batch_texts"]
    out = [f"# {title}", "", f"Reproduce: `{command}`", ""]
    out += [f"Data: `{shown(data)}`, {s['n']} queries ({s['multi_n']} multi-intent).", ""]
    out += [
        f"Chain: {' → '.join(names)}{' → general' if names[-1] != GENERAL else ''}; mode {settings.mode}, "
        f"batch size {settings.batch_size}, min confidence {settings.min_confidence:g}"
        f"{_floor_note(settings, names)}, latency budget {settings.latency_budget_ms:g} ms per query, query cache off.",
        "",
    ]
    out += [line + "\n" for line in machine_lines(s)]
    out += ["## Summary", ""]
    out += table(
        ["metric", "value"],
        [
            ["accuracy (primary_intent)", f"**{pct(s['accuracy'])}** ({s['correct']}/{s['n']})"],
            ["macro-F1", num(s["macro_f1"])],
            ["greeting accuracy (recall)", f"{pct(s['greeting_accuracy'])} (of {s['greeting_n']})"],
            [
                "greeting precision (answers `greeting` that are)",
                f"{pct(s.get('greeting_precision'))} (of {s.get('greeting_predicted', 0)})",
            ],
            ["all_intents exact match, multi-intent rows", f"{pct(s['exact_multi'])} (of {s['multi_n']})"],
            ["all_intents exact match, all rows", pct(s["exact_all"])],
            ["mean Jaccard of all_intents, multi-intent rows", num(s["jaccard_multi"])],
            ["mean Jaccard of all_intents, all rows", num(s["jaccard_all"])],
            ["valid JSON (schema.validate)", pct(s["valid_json_rate"])],
            ["ECE (15 equal-width bins)", num(s["ece"])],
            ["ECE a perfectly calibrated model shows on this many rows (mean / 95th pct)", floor(s.get("ece_floor"))],
            ["Brier (binary, primary's confidence)", num(s["brier"])],
            ["mean confidence", num(s["mean_confidence"])],
            ["**latency per query** p50 / p95 / p99 (ms)", " / ".join(num(lat[q], 1) for q in (50, 95, 99))],
            [
                f"latency per call (batches of up to {settings.batch_size}) p50 / p95 / p99 (ms)",
                " / ".join(num(call[q], 1) for q in (50, 95, 99)),
            ],
            ["wall time per query (ms)", num(s["per_query_ms"], 2)],
            ["peak MLX memory", "-" if s["peak_mlx_mb"] is None else f"{s['peak_mlx_mb']:.1f} MB"],
            ["max resident memory of the process", f"{s['max_rss_mb']:.1f} MB"],
            ["fallback rate at run time (a tier passed the query over)", pct(s["fallback_rate"])],
            ["tiers not installed here (not counted as fallbacks)", ", ".join(s["absent_tiers"]) or "none"],
            ["answer not from the first tier", pct(s["not_first_rate"])],
        ],
    )
    out += [
        "The Brier score is binary (on the primary's confidence against correctness): the chain's results carry",
        "at most the top 5 of a model's distribution, not all 15 probabilities.",
        "",
    ]
    out += ["## Per language", ""]
    out += table(
        ["language", "n", "correct", "accuracy", "ECE", "ECE if calibrated", "greeting precision", "greeting recall"],
        [
            [
                k,
                str(g["n"]),
                str(g["correct"]),
                pct(g["accuracy"]),
                num(g.get("ece")),
                floor(g.get("ece_floor")),
                f"{pct(g.get('greeting_precision'))} (of {g.get('greeting_predicted', 0)})",
                f"{pct(g.get('greeting_recall'))} (of {g.get('greeting_n', 0)})",
            ]
            for k, g in ((k, s["per_lang"][k]) for k in lang_order(s["per_lang"]))
        ],
    )
    out += [
        "ECE if calibrated: the mean (and 95th percentile) ECE of a perfectly calibrated model with the same",
        "confidences on as many rows (scores.ece_floor). ECE is biased upward on small sets; an ECE under the",
        "95th percentile is what perfect calibration looks like at that size.",
        "",
    ]
    out += _figure(figures, "languages", "Accuracy per language")
    if s.get("per_kind_lang"):
        out += kind_table(s["per_kind_lang"])
        out += [f"The earlier turns decided {pct(s['context_used_rate'])} of the answers (context_used).", ""]
    out += ["## Per intent (by gold primary_intent)", ""]
    out += table(
        ["intent", "n", "correct", "accuracy", "precision", "F1"],
        [
            [i, str(g["n"]), str(g["correct"]), pct(g["accuracy"]), pct(g["precision"]), num(g["f1"])]
            for i, g in s["per_intent"].items()
            if g["n"] or g["precision"] is not None
        ],
    )
    confusions = sorted(
        ((n, g, p) for (g, p), n in s["confusion"].items() if g != p), key=lambda x: (-x[0], x[1], x[2])
    )
    out += ["### Most frequent confusions (gold → predicted)", ""]
    out += table(["gold", "predicted", "n"], [[g, p, str(n)] for n, g, p in confusions[:12]])
    out += _figure(figures, "confusion", "Confusion matrix")
    out += ["## Calibration", ""]
    out += [
        f"ECE {num(s['ece'])}, Brier (binary) {num(s['brier'])}, mean confidence {num(s['mean_confidence'])} "
        f"against accuracy {pct(s['accuracy'])}.",
        "",
    ]
    out += table(
        ["confidence bin", "n", "mean confidence", "accuracy"],
        [
            [f"{b['low']:.3f}-{b['high']:.3f}", str(b["count"]), num(b["confidence"]), pct(b["accuracy"])]
            for b in s["reliability"]
            if b["count"]
        ],
    )
    out += _figure(figures, "reliability", "Reliability diagram")
    out += ["## Latency", ""]
    out += [
        f"Per query (a call's time over the queries it answered): p50 {num(lat[50], 1)} ms, "
        f"p95 {num(lat[95], 1)} ms, p99 {num(lat[99], 1)} ms, max {num(lat['max'], 1)} ms.",
        "",
        f"Per call of the chain, a batch of up to {settings.batch_size} queries ({batch['mean']:.1f} on average; "
        f"each query of a batch waits for the whole call): p50 {num(call[50], 1)} ms, p95 {num(call[95], 1)} ms, "
        f"p99 {num(call[99], 1)} ms, max {num(call['max'], 1)} ms. "
        f"Wall time {s['wall_s']:.1f} s for {s['n']} queries ({num(s['per_query_ms'], 2)} ms per query); "
        "models were loaded before timing.",
        "",
    ]
    out += _figure(figures, "latency", "Latency histogram")
    out += ["## Tiers", ""]
    out += table(
        ["tier", "answered", "share", "accuracy on its answers"],
        [
            [t, str(g["n"]), pct(g["n"] / s["n"]), pct(g["accuracy"])]
            for t, g in sorted(s["per_tier"].items(), key=lambda kv: -kv[1]["n"])
        ],
    )
    if s["reasons"]:
        out += ["Top run-time pass-over reasons:", ""]
        out += table(["reason", "n"], [[r.replace("|", "\\|"), str(n)] for r, n in s["reasons"].most_common(8)])
    return "\n".join(out)


def kind_table(groups: dict[str, dict]) -> list[str]:
    """Accuracy per kind of turn (rows) and language (columns), from summarize's per_kind_lang."""
    kinds = sorted({k.split(" ")[0] for k in groups})
    langs = lang_order({k.split(" ", 1)[1] for k in groups})
    rows = []
    for kind in kinds:
        cells = [groups.get(f"{kind} {lang}") for lang in langs]
        n, right = sum(g["n"] for g in cells if g), sum(g["correct"] for g in cells if g)
        rows.append([kind, *(pct(g["accuracy"]) if g else "–" for g in cells), f"{pct(right / n)} ({right}/{n})"])
    return ["## Per kind of turn and language", "", *table(["kind", *langs, "all"], rows)]


def headline(s: dict[str, Any]) -> str:
    """The one line ``eval`` ends its figures with: latency per query, fallbacks at run time."""
    lat = s["latency"]
    return (
        f"accuracy {pct(s['accuracy'])}  macro-F1 {num(s['macro_f1'])}  ECE {num(s['ece'])}  "
        f"latency per query p50 {num(lat[50], 1)} ms  p95 {num(lat[95], 1)} ms  "
        f"fallback at run time {pct(s['fallback_rate'])}"
    )


def footer(s: dict[str, Any], report: Path, figures: dict[str, str]) -> list[str]:
    """A short plain summary after the headline: who answered, latency per query and per call, fallbacks
    at run time apart from the tiers absent here, where the report and figures are, and the next step."""
    lat, call, absent = s["latency"], s["latency_per_call"], s["absent_tiers"]
    tiers = sorted(s["per_tier"].items(), key=lambda kv: -kv[1]["n"])
    lines = [
        "answered by: " + ", ".join(f"{t} {pct(g['n'] / s['n'])}" for t, g in tiers),
        f"latency per query: p50 {num(lat[50], 1)} ms, p95 {num(lat[95], 1)} ms "
        f"(per call of up to {s['batch_texts']['max']} queries: p50 {num(call[50], 1)} ms, p95 {num(call[95], 1)} ms)",
        f"fallback at run time: {pct(s['fallback_rate'])} of queries"
        + (f" ({', '.join(f'{k} {n}' for k, n in s['runtime_kinds'].most_common(3))})" if s["runtime_kinds"] else "")
        + (f"; not installed here, not counted: {', '.join(absent)}" if absent else ""),
        f"report: {shown(report)}"
        + (f"; plots beside it: {report.stem}-*.png ({', '.join(sorted(figures))})" if figures else ""),
    ]
    if registry.PRIMARY in absent:
        lines.append(
            f"next step on a Mac: {registry.how_to_get(registry.PRIMARY)} (Llama 3.2 3B), then "
            f"`mlx-intent calibrate {registry.PRIMARY} --data calib` to measure where it goes in the chain"
        )
    return lines


def _figure(figures: dict[str, str], key: str, alt: str) -> list[str]:
    return [f"![{alt}]({figures[key]})", ""] if key in figures else []


# ---- the file -----------------------------------------------------------------------------------


def default_report(kind: str, data: Path, *labels: tuple[str, ...]) -> Path:
    """The report of a run given no --report: in the current folder, never among the committed reports of
    benchmarks/reports (those are written by naming them, with --force)."""
    return Path(f"{kind}-{data.stem}-{'-vs-'.join('+'.join(names) for names in labels)}.md")


def write_report(text: str, report: Path) -> None:
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {report}", file=sys.stderr)
