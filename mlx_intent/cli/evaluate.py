"""``mlx-intent eval DATA``: run a chain (or one tier) over labelled data and write a Markdown report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mlx_intent import distributed as dist
from mlx_intent.cli.options import check_log, check_writable, same_file, settings_options
from mlx_intent.errors import EXIT_ERROR, EXIT_INPUT, EXIT_MODEL, InputError, UserError
from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.evaluation.report import default_report, footer, headline, pct, render, reproduce, write_report
from mlx_intent.evaluation.run import chain_names, make_chain, prediction_rows, run, summarize, use_base_models
from mlx_intent.settings import Settings

_HELP = f"""Evaluate the chain (or one tier) on labelled DATA and write a Markdown report with figures.

DATA is a JSONL file of {{"id", "text", "lang", "primary_intent", "all_intents"}} lines, or a name
(dev, train) of one in benchmarks/data.  The chain comes from --chain (e.g. keyword, or
smollm2-135m,keyword,general), else the settings; the query cache is off.  To score a model alone,
without handing queries over, pass --min-confidence 0 and a large --latency-budget-ms.

\b
Writes REPORT (default eval-<data>-<tiers>.md in the current folder; an existing one is replaced only
with --force) and beside it <report>-confusion.png, -reliability.png, -languages.png, -latency.png;
ends with a short summary:
the tiers that answered, latency per query (a batch call's time over its queries) and per call, the
fallback rate at run time (tiers not installed here are listed apart, not counted) and the next step.

\b
Exit codes:
  0  done, and --min-accuracy (if given) met
  {EXIT_ERROR}  accuracy below --min-accuracy, or an error reported in words
  {EXIT_INPUT}  bad usage or bad data (a missing file, a malformed or unlabelled line)
  {EXIT_MODEL}  an unknown model in the chain
"""


@click.command("eval", help=_HELP)
@click.argument("data")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Markdown report to write.")
@click.option(
    "--predictions", type=click.Path(dir_okay=False, path_type=Path), help="Also write per-row predictions (JSONL)."
)
@click.option("--min-accuracy", type=click.FloatRange(0, 1), help=f"Exit {EXIT_ERROR} when accuracy is below this.")
@click.option("--no-adapter", is_flag=True, help="Score the base models, without their LoRA adapters.")
@click.option("--force", is_flag=True, help="Replace an existing report (and predictions).")
@click.option(
    "--distributed",
    is_flag=True,
    help="Share DATA among the ranks of `mlx.launch ... mlx-intent eval --distributed`; rank 0 writes the report.",
)
@settings_options
def eval_command(
    data: str,
    report: Path | None,
    predictions: Path | None,
    min_accuracy: float | None,
    no_adapter: bool,
    force: bool,
    distributed: bool,
    settings: Settings,
) -> None:
    path = data_path(data, settings.home)
    rows = read_labelled(path)
    names = chain_names(None, settings)
    report = report or default_report("eval", path, names)
    check_outputs(settings, force, report, predictions, data=path)
    chain = make_chain(names, settings)
    if no_adapter:
        use_base_models(chain)
    group = dist.init(distributed)
    if group is None:
        outcome = run(chain, rows, settings.batch_size)
    elif (outcome := dist.run_eval(group, chain, rows, settings.batch_size)) is None:
        return  # a rank other than 0: rank 0 has its results and writes the report
    summary = summarize(rows, outcome, chain.names[0])
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        try:
            from mlx_intent.evaluation.figures import write_figures

            figures = write_figures(summary, report)
        except ImportError:
            click.echo("warning: no figures: matplotlib is not installed (pip install matplotlib)", err=True)
            figures = {}
        flags = [*(["--no-adapter"] if no_adapter else []), *(["--distributed"] if group is not None else [])]
        command = reproduce(["eval", data, "--chain", ",".join(names), *flags], settings, report)
        title = f"Evaluation: {' → '.join(names)} on {path.stem}" + (f", over {group.size()} ranks" if group else "")
        text = render(summary, title=title, command=command, data=path, names=names, settings=settings, figures=figures)
        write_report(text, report)
        if predictions is not None:
            with predictions.open("w", encoding="utf-8") as f:
                for line in prediction_rows(rows, outcome["results"]):
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {e.filename or predictions or report}: {e.strerror or e}") from None
    click.echo(headline(summary))
    for line in footer(summary, report, figures):
        click.echo(f"  {line}")
    if min_accuracy is not None and summary["accuracy"] < min_accuracy:
        click.echo(f"accuracy {pct(summary['accuracy'])} is below --min-accuracy {min_accuracy:.1%}", err=True)
        sys.exit(EXIT_ERROR)


def check_outputs(
    settings: Settings, force: bool, report: Path, predictions: Path | None = None, *, data: Path | None = None
) -> None:
    """Before the run, not after it: the log, the report (and the figures beside it) and the predictions can be
    written, and no existing report or predictions file is replaced without --force.  No two of them are one
    file, and none is the labelled ``data`` (--force or not): one would overwrite the other."""
    check_log(settings, data=data, report=report, predictions=predictions)
    named = [("--report", report), ("--predictions", predictions)]
    if data is not None:
        for what, path in named:
            if path is not None and same_file(path, data):
                raise InputError(f"{what} {path} is the data {data}; writing it would erase the labelled rows")
    if predictions is not None and same_file(report, predictions):
        raise InputError(f"--report and --predictions are one file, {report}; name two")
    for path, what in ((report, "--report"), (predictions, "--predictions")):
        if path is not None and path.exists() and not force:
            raise click.ClickException(f"{what} {path} exists; use --force to replace it, or name another file")
    check_writable(report, "--report", make_parents=True)
    check_writable(report.with_name(f"{report.stem}-confusion.png"), "--report (its figures)", make_parents=True)
    if predictions is not None:
        check_writable(predictions, "--predictions")
