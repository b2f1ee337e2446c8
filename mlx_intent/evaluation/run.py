"""Run a chain (or one tier) over labelled data, summarize the outcome and render the Markdown report.

The chain runs exactly as ``classify`` runs it, in batches, with the query cache off so every latency is
a real one.  Scores come from the pure functions in ``scores``; the report starts with the command that
reproduces it and links PNG figures written beside it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_intent.chain import ABSENT, GENERAL, Chain, Kind, PassOver, build_chain, default_chain_names, model_floor
from mlx_intent.errors import ModelError
from mlx_intent.evaluation import scores
from mlx_intent.metrics import is_absent, peak_memory_mb, peak_rss_mb, runtime_fallback
from mlx_intent.models import registry
from mlx_intent.schema import INTENTS, KEYS, LANGUAGES, validate
from mlx_intent.settings import Settings

# ---- running ------------------------------------------------------------------------------------


def chain_names(spec: str | tuple[str, ...] | None, settings: Settings) -> tuple[str, ...]:
    """Tier names from a comma-separated spec, else the settings' chain, else the default chain."""
    if isinstance(spec, str):
        spec = tuple(n.strip() for n in spec.split(",") if n.strip())
    return tuple(spec or settings.chain or default_chain_names(settings))


def make_chain(names: tuple[str, ...], settings: Settings) -> Chain:
    """The chain of ``names`` with the query cache off, so repeated texts are timed for real."""
    try:
        return build_chain(dataclasses.replace(settings, chain=names, cache_size=0))
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None


def use_base_models(chain: Chain) -> None:
    """Load every model tier without its LoRA adapter (the pool would load the adapter automatically)."""
    from mlx_intent.classifier import IntentClassifier

    for tier in chain.tiers:
        if tier.kind is Kind.LLM and chain.pool is not None:  # the encoder has no adapter: it keeps its head
            try:
                base = IntentClassifier(tier.model, mode=chain.pool.mode, use_adapter=False, home=chain.pool.home)
                chain.pool.adopt(tier.model, base)
            except registry.ModelNotAvailableError as e:
                raise ModelError(str(e)) from None


def warm_up(chain: Chain) -> tuple[dict[str, str], dict[str, str]]:
    """Load every tier before timing, so model loading is not counted as query latency.

    Returns ({tier: reason} for tiers that failed to load, {tier: reason} for tiers absent here: not
    installed or too large, a configuration fact).  Both pass over during the run too."""
    skipped, absent = {}, {}
    for tier in chain.tiers:
        try:
            tier.load()
        except PassOver as e:
            (absent if e.kind in ABSENT else skipped)[tier.name] = str(e)
    return skipped, absent


def run(
    chain: Chain, rows: list[dict], batch_size: int, desc: str = "eval", progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Classify every row through ``chain`` in batches; results plus wall time, memory and load.

    ``progress`` is told each batch's size instead of a bar of its own (a distributed run counts every rank's)."""
    from tqdm import tqdm

    load_before = os.getloadavg()
    skipped, absent = warm_up(chain)
    mx = sys.modules.get("mlx.core")
    if mx is not None:  # the peak while classifying, loaded weights included
        mx.reset_peak_memory()
    for tier, reason in absent.items():
        print(f"note: tier {tier} is not installed here and is skipped: {reason}", file=sys.stderr)
    for tier, reason in skipped.items():
        print(f"warning: tier {tier} passes over: {reason}", file=sys.stderr)
    results: list[dict] = []
    start = time.perf_counter()
    with tqdm(total=len(rows), unit="q", desc=desc, disable=None if progress is None else True) as bar:
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            texts, labels = [r["text"] for r in batch], [r["primary_intent"] for r in batch]
            results += chain.classify_batch(texts, labels=labels, contexts=[r.get("context") for r in batch])
            (progress or bar.update)(len(batch))
    wall = time.perf_counter() - start
    return {
        "results": results,
        "wall_s": wall,
        "skipped": skipped,
        "absent": absent,
        "peak_mlx_mb": peak_memory_mb(),
        "max_rss_mb": peak_rss_mb(),
        "load_avg": (load_before, os.getloadavg()),
        "models": _model_settings(chain),
    }


def _model_settings(chain: Chain) -> dict[str, dict]:
    """Temperature and threshold each loaded LLM tier used, and where they came from."""
    out = {}
    for name, clf in chain.pool.loaded.items() if chain.pool else ():
        out[name] = {
            "temperature": clf.temperature,
            "threshold": clf.threshold,
            "calibration_file": clf.calibration.path is not None,
            "calibration_ignored": list(clf.calibration.problems),
            "adapter": shown(clf.adapter) if clf.adapter else None,
        }
    return out


# ---- scoring ------------------------------------------------------------------------------------


def _valid(result: dict) -> bool:
    try:
        validate({k: result[k] for k in KEYS})
    except Exception:
        return False
    return True


def _group(keys: list[str], correct: list[bool]) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for key, hit in zip(keys, correct):
        g = groups.setdefault(key, {"n": 0, "correct": 0})
        g["n"] += 1
        g["correct"] += hit
    for g in groups.values():
        g["accuracy"] = g["correct"] / g["n"]
    return groups


def summarize(rows: list[dict], outcome: dict[str, Any], first_tier: str) -> dict[str, Any]:
    """Every figure of the report from the rows and the results of ``run``."""
    results = outcome["results"]
    gold = [r["primary_intent"] for r in rows]
    pred = [res["primary_intent"] for res in results]
    correct = [g == p for g, p in zip(gold, pred, strict=True)]
    conf = [float(res["confidence"]) for res in results]
    langs = [r.get("lang") or res.get("lang") or "unknown" for r, res in zip(rows, results)]
    tiers = [res["tier"] for res in results]
    same_set = [set(r["all_intents"]) == set(res["all_intents"]) for r, res in zip(rows, results)]
    jac = [scores.jaccard(r["all_intents"], res["all_intents"]) for r, res in zip(rows, results)]
    multi = [i for i, r in enumerate(rows) if len(set(r["all_intents"])) > 1]
    call_latency = [float(res["latency_ms"]) for res in results]
    latency = [float(res.get("latency_per_query_ms", res["latency_ms"])) for res in results]  # the headline
    batch = [int(res.get("batch_texts") or 1) for res in results]

    per_intent = {}
    for intent in INTENTS:
        tp = sum(g == intent and p == intent for g, p in zip(gold, pred))
        support, predicted = gold.count(intent), pred.count(intent)
        per_intent[intent] = {
            "n": support,
            "correct": tp,
            "accuracy": tp / support if support else None,
            "precision": tp / predicted if predicted else None,
            "f1": 2 * tp / (support + predicted) if support + predicted else None,
        }
    fallbacks = [res.get("fallbacks") or () for res in results]
    reasons = Counter(f"{f['tier']}: {f['reason']}" for fs in fallbacks for f in fs if not is_absent(f))
    kinds = Counter(f"{f['tier']} {f.get('kind', '?')}" for fs in fallbacks for f in fs if not is_absent(f))
    absent = dict(outcome.get("absent") or {})
    for f in (f for fs in fallbacks for f in fs if is_absent(f)):
        absent.setdefault(f["tier"], f["reason"])
    greeting = [c for g, c in zip(gold, correct) if g == "greeting"]
    said_greeting = [c for p, c in zip(pred, correct) if p == "greeting"]
    per_lang = _group(langs, correct)
    for lang, g in per_lang.items():
        idx = [i for i, k in enumerate(langs) if k == lang]
        g["ece"] = scores.ece([conf[i] for i in idx], [correct[i] for i in idx])
        g["greeting_n"] = sum(gold[i] == "greeting" for i in idx)
        g["greeting_predicted"] = sum(pred[i] == "greeting" for i in idx)
        hits = sum(gold[i] == pred[i] == "greeting" for i in idx)
        g["greeting_recall"] = hits / g["greeting_n"] if g["greeting_n"] else None
        g["greeting_precision"] = hits / g["greeting_predicted"] if g["greeting_predicted"] else None
    return {
        "n": len(rows),
        "correct": sum(correct),
        "accuracy": scores.accuracy(gold, pred),
        "macro_f1": scores.macro_f1(gold, pred),
        "greeting_accuracy": sum(greeting) / len(greeting) if greeting else None,
        "greeting_n": len(greeting),
        # A short command is not social talk: how often a `greeting` answer is one.
        "greeting_precision": sum(said_greeting) / len(said_greeting) if said_greeting else None,
        "greeting_predicted": len(said_greeting),
        "per_intent": per_intent,
        "per_lang": per_lang,
        # A conversation set (context-dev): its kinds of turn (follow_up, new_request, social) per language.
        "per_kind_lang": _group([f"{r['kind']} {lang}" for r, lang in zip(rows, langs)], correct)
        if all("kind" in r for r in rows)
        else {},
        "context_used_rate": sum(bool(res.get("context_used")) for res in results) / len(results),
        "confusion": Counter(zip(gold, pred)),
        "multi_n": len(multi),
        "exact_multi": sum(same_set[i] for i in multi) / len(multi) if multi else None,
        "exact_all": sum(same_set) / len(same_set),
        "jaccard_multi": sum(jac[i] for i in multi) / len(multi) if multi else None,
        "jaccard_all": sum(jac) / len(jac),
        "valid_json_rate": sum(map(_valid, results)) / len(results),
        "ece": scores.ece(conf, correct),
        "brier": scores.brier_binary(conf, correct),
        "reliability": scores.reliability(conf, correct),
        "mean_confidence": sum(conf) / len(conf),
        # Latency per query (each query's share of its batch call: the headline), and per call.
        "latency": {q: scores.percentile(latency, q) for q in (50, 95, 99)} | {"max": max(latency)},
        "latency_per_call": {q: scores.percentile(call_latency, q) for q in (50, 95, 99)} | {"max": max(call_latency)},
        "batch_texts": {"mean": sum(batch) / len(batch), "max": max(batch)},
        "latencies": latency,
        "per_query_ms": outcome["wall_s"] * 1000 / len(rows),
        "wall_s": outcome["wall_s"],
        # Run-time fallbacks: a tier passed the query over while running.  A tier absent here (not installed,
        # too large) is a configuration fact, listed once in absent_tiers.
        "fallback_rate": sum(map(runtime_fallback, fallbacks)) / len(results),
        "not_first_rate": sum(t != first_tier for t in tiers) / len(tiers),
        "absent_tiers": absent,
        "per_tier": _group(tiers, correct),
        "reasons": reasons,
        "runtime_kinds": kinds,
        "correct_flags": correct,
        **{k: outcome[k] for k in ("peak_mlx_mb", "max_rss_mb", "load_avg", "models", "skipped")},
    }


def prediction_rows(rows: list[dict], results: list[dict]) -> list[dict]:
    """One line per row for --predictions: gold, answer, tier and timing."""
    return [
        {
            "id": r["id"],
            "text": r["text"],
            "lang": r.get("lang"),
            "gold_primary": r["primary_intent"],
            "gold_all": r["all_intents"],
            **{k: res[k] for k in KEYS},
            "correct": r["primary_intent"] == res["primary_intent"],
            "tier": res["tier"],
            "model": res.get("model"),
            "top": res.get("top"),
            "latency_ms": res["latency_ms"],
            "latency_per_query_ms": res.get("latency_per_query_ms"),
        }
        for r, res in zip(rows, results)
    ]


# ---- report -------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


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
    if settings.home is not None:
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
        ["language", "n", "correct", "accuracy", "ECE", "greeting precision", "greeting recall"],
        [
            [
                k,
                str(g["n"]),
                str(g["correct"]),
                pct(g["accuracy"]),
                num(g.get("ece")),
                f"{pct(g.get('greeting_precision'))} (of {g.get('greeting_predicted', 0)})",
                f"{pct(g.get('greeting_recall'))} (of {g.get('greeting_n', 0)})",
            ]
            for k, g in ((k, s["per_lang"][k]) for k in lang_order(s["per_lang"]))
        ],
    )
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


# ---- command ------------------------------------------------------------------------------------


def default_report(kind: str, data: Path, *labels: tuple[str, ...]) -> Path:
    """The report of a run given no --report: in the current folder, never among the committed reports of
    benchmarks/reports (those are written by naming them, with --force)."""
    return Path(f"{kind}-{data.stem}-{'-vs-'.join('+'.join(names) for names in labels)}.md")


def write_report(text: str, report: Path) -> None:
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {report}", file=sys.stderr)
