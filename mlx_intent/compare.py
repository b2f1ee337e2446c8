"""``mlx-intent compare A B DATA``: the A/B test of two chains on the same labelled rows.

Both chains answer every row; the report puts their accuracies side by side (overall, per intent, per
language) and tests the difference with McNemar's test, which uses only the rows where exactly one of
the two is right, so the pairing of the rows is not thrown away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mlx_intent import scores
from mlx_intent.evaluate import (
    EXIT_INPUT,
    EXIT_MODEL,
    chain_names,
    data_path,
    default_report,
    lang_order,
    machine_lines,
    make_chain,
    num,
    pct,
    read_labelled,
    reproduce,
    run,
    shown,
    summarize,
    table,
    write_report,
)
from mlx_intent.schema import INTENTS
from mlx_intent.settings import Settings, settings_options


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{(b - a) * 100:+.1f} pp"


def _change(a: float | None, b: float | None, show) -> str:
    """B - A: in percentage points for rates, else plain."""
    if show is pct:
        return _delta(a, b)
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
                    _delta(ga.get("accuracy"), gb.get("accuracy")),
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
        ("all_intents exact match, multi-intent rows", "exact_multi", pct),
        ("all_intents exact match, all rows", "exact_all", pct),
        ("mean Jaccard, all rows", "jaccard_all", num),
        ("valid JSON", "valid_json_rate", pct),
        ("ECE", "ece", num),
        ("Brier (binary)", "brier", num),
        ("fallback rate", "fallback_rate", pct),
    ]
    rows = [[name, show(a[key]), show(b[key]), _change(a[key], b[key], show)] for name, key, show in overall]
    timing = [(f"latency p{q} per call (ms)", a["latency"][q], b["latency"][q]) for q in (50, 95, 99)]
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


_HELP = f"""A/B test: run chains A and B (comma-separated tiers, e.g. keyword and smollm2-135m,keyword) on DATA.

DATA is a labelled JSONL file or a name (dev, train) in benchmarks/data.  Writes a side-by-side report
(default benchmarks/reports/compare-<data>-<A>-vs-<B>.md) with per-intent and per-language deltas and
McNemar's test of the accuracy difference (exact binomial below {scores.MCNEMAR_EXACT_BELOW} discordant pairs,
else chi-square with continuity correction).

\b
Exit codes: 0 done; 1 an error reported in words; {EXIT_INPUT} bad usage or bad data; {EXIT_MODEL} an unknown model.
"""


@click.command("compare", help=_HELP)
@click.argument("a")
@click.argument("b")
@click.argument("data")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Markdown report to write.")
@settings_options
def compare_command(a: str, b: str, data: str, report: Path | None, settings: Settings) -> None:
    path = data_path(data)
    rows = read_labelled(path)
    names = (chain_names(a, settings), chain_names(b, settings))
    if not all(names):
        raise click.UsageError("A and B must each name at least one tier")
    report = report or default_report("compare", path, *names)
    summaries = []
    for label, tiers in zip("AB", names):
        chain = make_chain(tiers, settings)
        summaries.append(summarize(rows, run(chain, rows, settings.batch_size, desc=label), chain.names[0]))
    sa, sb = summaries
    test = scores.mcnemar(sa["correct_flags"], sb["correct_flags"])
    command = reproduce(["compare", a, b, data], settings, report)
    labels = (",".join(names[0]), ",".join(names[1]))
    write_report(render(sa, sb, test, labels=labels, command=command, data=path), report)
    click.echo(
        f"A {labels[0]}: {pct(sa['accuracy'])}  B {labels[1]}: {pct(sb['accuracy'])}  "
        f"({_delta(sa['accuracy'], sb['accuracy'])}, McNemar p = {test['p']:.3g}, {test['method']})"
    )
