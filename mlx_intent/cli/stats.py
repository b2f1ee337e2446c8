"""``mlx-intent stats LOG``: figures, alerts and charts from a classification log."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_intent.cli.options import check_writable
from mlx_intent.metrics import read_log
from mlx_intent.settings import SettingsError, load_settings
from mlx_intent.stats import (
    ACCURACY_MIN,
    EXIT_CRITICAL,
    EXIT_OK,
    EXIT_WARNING,
    FALLBACK_RATE_MAX,
    P95_LATENCY_MAX_MS,
    PEAK_MEMORY_MAX_MB,
    check,
    exit_code,
    render,
    summarize,
    write_plots,
)

_HELP = f"""Summarize a classification log (JSON lines; default: the MLX_INTENT_LOG setting).

Prints counts by intent, tier and language, latency p50/p95/p99 per query (each query's share of
the batch call that answered it) and per call, the run-time fallback rate and its top reasons, the
tiers absent here (not installed, too large: listed once, not counted as fallbacks), valid-JSON rate,
confidence histogram, cache hit rate, peak memory and, where records carry labels, accuracy.
--plot DIR writes latency.png, confidence.png and intents_by_tier.png.

\b
--check prints the alerts instead and exits with:
  {EXIT_OK}  no alert
  {EXIT_WARNING}  warnings only: p95 latency per query > {P95_LATENCY_MAX_MS:g} ms,
     run-time fallback rate > {FALLBACK_RATE_MAX:.0%} (absent tiers do not count)
  {EXIT_CRITICAL}  any critical: accuracy < {ACCURACY_MIN:.0%} (labelled records),
     peak memory > {PEAK_MEMORY_MAX_MB / 1024:g} GB
A missing, unreadable or empty log is an error (exit 1).
"""


@click.command("stats", help=_HELP)
@click.argument("log", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), help="Write PNG charts here.")
@click.option("--check", "check_only", is_flag=True, help="Print only the alerts and set the exit code.")
def stats_command(log: Path | None, plot_dir: Path | None, check_only: bool) -> None:
    """Report on a log; with --check, alert and set the exit code (see _HELP)."""
    if log is None:
        try:
            log = load_settings().log
        except SettingsError as e:
            raise click.ClickException(str(e)) from None
        if log is None:
            raise click.ClickException("no log given: pass LOG or set MLX_INTENT_LOG")
    if not log.is_file():
        raise click.ClickException(f"no log file at {log}")
    if plot_dir is not None:
        check_writable(plot_dir, "--plot", folder=True, make_parents=True)
    try:
        records = read_log(log)
        summary = summarize(records)
    except ValueError as e:  # LogError included
        raise click.ClickException(str(e)) from None
    if not records:
        raise click.ClickException(f"log {log} holds no records")

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
            click.echo(f"OK: no alerts over {summary['count']} records")
        click.get_current_context().exit(exit_code(alerts))
    click.echo(render(summary, records.skipped))
