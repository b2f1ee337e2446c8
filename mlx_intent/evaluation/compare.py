"""The A/B test of two chains on the same labelled rows (``mlx-intent compare``).

Both chains answer every row; the report puts their accuracies side by side (overall, per intent, per
language) and tests the difference with McNemar's test, which uses only the rows where exactly one of
the two is right, so the pairing of the rows is not thrown away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_intent.evaluation.report import lang_order, machine_lines, num, pct, shown, table
from mlx_intent.schema import INTENTS


def delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{(b - a) * 100:+.1f} pp"


def _change(a: float | None, b: float | None, show) -> str:
    """B - A: in percentage points for rates, else plain."""
    if show is pct:
        return delta(a, b)
    return "-" if a is None or b is None else f"{b - a:+.3f}"


def _side_by_side(title: str, keys: list[str], a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    rows = []
    for key in keys:
        ga, gb = a.get(key, {}), b.get(key, {})
        if ga.get("n"):
            rows.append(
                [
                    key,
                    str(ga["n"]),
                    pct(ga.get("accuracy")),
                    pct(gb.get("accuracy")),
                    delta(ga.get("accuracy"), gb.get("accuracy")),
                ]
            )
    return table([title, "n", "A", "B", "B − A"], rows)


def render(
    a: dict[str, Any], b: dict[str, Any], test: dict, *, labels: tuple[str, str], command: str, data: Path
) -> str:
    """The A/B report: overall figures, per-intent and per-language accuracy with deltas, McNemar."""
    out = [f"# A/B: {labels[0]} vs {labels[1]} on {data.stem}", "", f"Reproduce: `{command}`", ""]
    out += [f"Data: `{shown(data)}`, {a['n']} queries. A = `{labels[0]}`, B = `{labels[1]}` (query cache off).", ""]
    lines = dict.fromkeys(machine_lines(a, " (A)") + machine_lines(b, " (B)"))  # the machine line once
    out += [line + "\n" for line in lines]
    out += ["## Overall", ""]
    overall = [
        ("accuracy", "accuracy", pct),
        ("macro-F1", "macro_f1", num),
        ("greeting accuracy", "greeting_accuracy", pct),
        ("greeting precision", "greeting_precision", pct),
        ("all_intents exact match, multi-intent rows", "exact_multi", pct),
        ("all_intents exact match, all rows", "exact_all", pct),
        ("mean Jaccard, all rows", "jaccard_all", num),
        ("valid JSON", "valid_json_rate", pct),
        ("ECE", "ece", num),
        ("Brier (binary)", "brier", num),
        ("fallback rate at run time", "fallback_rate", pct),
    ]
    rows = [[name, show(a[key]), show(b[key]), _change(a[key], b[key], show)] for name, key, show in overall]
    timing = [(f"latency p{q} per query (ms)", a["latency"][q], b["latency"][q]) for q in (50, 95, 99)]
    timing += [(f"latency p{q} per call (ms)", a["latency_per_call"][q], b["latency_per_call"][q]) for q in (50, 95)]
    timing.append(("wall time per query (ms)", a["per_query_ms"], b["per_query_ms"]))
    rows += [[name, num(x, 2), num(y, 2), f"{y - x:+.2f}"] for name, x, y in timing]
    out += table(["metric", "A", "B", "B − A"], rows)

    out += ["## McNemar's test of the accuracy difference", ""]
    how = (
        "exact two-sided binomial on the discordant pairs"
        if test["method"] == "exact"
        else f"chi-square with continuity correction, χ² = {test['statistic']:.3f} (1 df)"
    )
    pairs = list(zip(a["correct_flags"], b["correct_flags"]))
    both, neither = sum(x and y for x, y in pairs), sum(not x and not y for x, y in pairs)
    out += table(
        ["", "B right", "B wrong"],
        [["A right", str(both), str(test["b"])], ["A wrong", str(test["c"]), str(neither)]],
    )
    verdict = "significant" if test["p"] < 0.05 else "not significant"
    out += [
        f"Discordant pairs: {test['b']} rows only A gets right, {test['c']} only B gets right; {how}: "
        f"**p = {test['p']:.3g}** ({verdict} at 0.05).",
        "",
    ]
    out += ["## Per intent (by gold primary_intent)", ""]
    out += _side_by_side("intent", list(INTENTS), a["per_intent"], b["per_intent"])
    out += ["## Per language", ""]
    out += _side_by_side("language", lang_order(set(a["per_lang"]) | set(b["per_lang"])), a["per_lang"], b["per_lang"])
    out += ["## Tiers", ""]
    tiers = sorted(set(a["per_tier"]) | set(b["per_tier"]))
    out += table(
        ["tier", "A answered", "B answered"],
        [[t, str(a["per_tier"].get(t, {}).get("n", 0)), str(b["per_tier"].get(t, {}).get("n", 0))] for t in tiers],
    )
    return "\n".join(out)
