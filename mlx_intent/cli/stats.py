"""``mlx-intent stats LOG``: figures, alerts and charts from a classification log."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from mlx_intent.cli.options import check_writable, settings_options
from mlx_intent.feedback.data import accuracy
from mlx_intent.feedback.store import open_store
from mlx_intent.metrics import LogRecords, read_log
from mlx_intent.settings import Settings
from mlx_intent.stats import (
    ACCURACY_MIN,
    EXIT_CRITICAL,
    EXIT_OK,
    EXIT_WARNING,
    FALLBACK_RATE_MAX,
    FEEDBACK_MIN_RECORDS,
    P95_LATENCY_MAX_MS,
    PEAK_MEMORY_MAX_MB,
    check,
    exit_code,
    feedback_line,
    render,
    summarize,
    write_plots,
)

_HELP = f"""Summarize a classification log (JSON lines; default: the MLX_INTENT_LOG setting).

Prints counts by intent, tier and language, latency p50/p95/p99 per query (each query's share of
the batch call that answered it) and per call, the run-time fallback rate and its top reasons, the
tiers absent here (not installed, too large: listed once, not counted as fallbacks), valid-JSON rate,
confidence histogram, cache hit rate, peak memory and, where records carry labels, accuracy.
With a feedback store in the models folder (mlx-intent feedback), the accuracy its records report
(confirmed and corrected answers); that alone, without a log, is a report too.
--plot DIR writes latency.png, confidence.png and intents_by_tier.png.

\b
--check prints the alerts instead and exits with:
  {EXIT_OK}  no alert
  {EXIT_WARNING}  warnings only: p95 latency per query > {P95_LATENCY_MAX_MS:g} ms,
     run-time fallback rate > {FALLBACK_RATE_MAX:.0%} (absent tiers do not count)
  {EXIT_CRITICAL}  any critical: accuracy < {ACCURACY_MIN:.0%} (labelled records, or feedback from
     {FEEDBACK_MIN_RECORDS} records on), peak memory > {PEAK_MEMORY_MAX_MB / 1024:g} GB
A missing, unreadable or empty log is an error (exit 1).
"""


@click.command("stats", help=_HELP)
@click.argument("log", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), help="Write PNG charts here.")
@click.option("--check", "check_only", is_flag=True, help="Print only the alerts and set the exit code.")
@functools.partial(settings_options, names=("home", "log"))
def stats_command(log: Path | None, plot_dir: Path | None, check_only: bool, settings: Settings) -> None:
    """Report on a log and the feedback store; with --check, alert and set the exit code (see _HELP)."""
    if plot_dir is not None:
        check_writable(plot_dir, "--plot", folder=True, make_parents=True)
    store = open_store(settings.home, create=False)
    feedback = accuracy(store) if store is not None else None
    log = log or settings.log
    if log is None and feedback is None:
        raise click.ClickException("no log given: pass LOG or set MLX_INTENT_LOG")
    records, summary = LogRecords(), summarize([])
    if log is not None:
        if not log.is_file():
            raise click.ClickException(f"no log file at {log}")
        try:
            records = read_log(log)
            summary = summarize(records)
        except ValueError as e:  # LogError included
            raise click.ClickException(str(e)) from None
        if not records:
            raise click.ClickException(f"log {log} holds no records")
    if feedback is not None:
        summary["feedback"] = feedback

    if plot_dir is not None and not records:
        raise click.ClickException("--plot needs a classification log")
    if plot_dir is not None:
        try:
            paths = write_plots(summary, plot_dir)
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
        except OSError as e:
            raise click.ClickException(f"cannot write {e.filename or plot_dir}: {e.strerror or e}") from None
        for path in paths:
            click.echo(f"wrote {path}", err=True)

    if check_only:
        alerts = check(summary)
        for alert in alerts:
            click.echo(f"{alert.level.upper():<8} {alert.message}")
        if not alerts:
            judged = f", {feedback['count']} feedback records" if feedback is not None else ""
            click.echo(f"OK: no alerts over {summary['count']} records{judged}")
        click.get_current_context().exit(exit_code(alerts))
    click.echo(render(summary, records.skipped) if records else f"{'feedback':<15} {feedback_line(feedback)}")
