"""``mlx-intent compare A B DATA``: the A/B test of two chains on the same labelled rows."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_intent.cli.evaluate import check_outputs
from mlx_intent.cli.options import settings_options
from mlx_intent.errors import EXIT_INPUT, EXIT_MODEL
from mlx_intent.evaluation import scores
from mlx_intent.evaluation.compare import delta, render
from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.evaluation.report import default_report, pct, reproduce, write_report
from mlx_intent.evaluation.run import chain_names, make_chain, run, summarize
from mlx_intent.settings import Settings

_HELP = f"""A/B test: run chains A and B (comma-separated tiers, e.g. keyword and smollm2-135m,keyword) on DATA.

DATA is a labelled JSONL file or a name (dev, train) in benchmarks/data.  Writes a side-by-side report
(default compare-<data>-<A>-vs-<B>.md in the current folder; an existing one is replaced only with
--force) with per-intent and per-language deltas and McNemar's test of the accuracy difference (exact
binomial below {scores.MCNEMAR_EXACT_BELOW} discordant pairs, else chi-square with continuity correction).

\b
Exit codes: 0 done; 1 an error reported in words; {EXIT_INPUT} bad usage or bad data; {EXIT_MODEL} an unknown model.
"""


@click.command("compare", help=_HELP)
@click.argument("a")
@click.argument("b")
@click.argument("data")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Markdown report to write.")
@click.option("--force", is_flag=True, help="Replace an existing report.")
@settings_options
def compare_command(a: str, b: str, data: str, report: Path | None, force: bool, settings: Settings) -> None:
    path = data_path(data, settings.home)
    rows = read_labelled(path)
    names = (chain_names(a, settings), chain_names(b, settings))
    if not all(names):
        raise click.UsageError("A and B must each name at least one tier")
    report = report or default_report("compare", path, *names)
    check_outputs(settings, force, report, data=path)
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
        f"({delta(sa['accuracy'], sb['accuracy'])}, McNemar p = {test['p']:.3g}, {test['method']})"
    )
