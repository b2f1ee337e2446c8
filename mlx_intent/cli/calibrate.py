"""``mlx-intent calibrate MODEL``: fit a tier's confidence calibration on labelled data."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_intent import calibration
from mlx_intent.cli.options import settings_options
from mlx_intent.encoder import NAME as ENCODER
from mlx_intent.errors import InputError, ModelError
from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.evaluation.report import pct, shown
from mlx_intent.feedback.data import calibration_rows
from mlx_intent.feedback.store import db_path
from mlx_intent.models import registry
from mlx_intent.schema import MAX_INTENTS
from mlx_intent.settings import Settings
from mlx_intent.tuner.calibrate import SHOWN_FIGURES, calibrate_keyword, fit_scoring, scoring_figures, set_match


@click.command("calibrate")
@click.argument("model")
@click.option(
    "--data",
    multiple=True,
    help="Labelled JSONL or a name, repeatable: the calibration split, never a reported set. "
    "[default: calib; e5-small: calib, public-calib]",
)
@click.option(
    "--force",
    is_flag=True,
    help=f"Fit on fewer than {calibration.MIN_ROWS} labelled rows anyway (such a fit is mostly noise).",
)
@click.option(
    "--from-feedback",
    is_flag=True,
    help="Fit on the calibration part of the feedback records (mlx-intent feedback) instead of --data.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Run the model again at the fitted temperature and score that run.",
)
@click.option(
    "--place/--no-place",
    default=True,
    show_default=True,
    help="An LLM: measure the chain with it first, as a cascade tier after the blend, and inside the blend, on "
    "the same rows, and keep the most accurate place for the default chain.",
)
@settings_options
def calibrate_command(
    model: str,
    data: tuple[str, ...],
    force: bool,
    from_feedback: bool,
    verify: bool,
    place: bool,
    settings: Settings,
) -> None:
    """Fit MODEL's temperature (NLL of the gold primary) and multi-intent threshold (all_intents exact match)
    on labelled data, and save them in calibration.json for classify: beside MODEL's adapter, else beside its
    converted weights, or under <home>/hub-state/ for weights pulled into the Hub cache.  Then measure on the
    same rows where MODEL goes in the default chain (first; a cascade tier for the texts the encoder's blend is
    unsure of; inside the blend at a fitted weight) and keep the most accurate place in
    <home>/calibration/MODEL.place.json (--no-place skips it; never measured, an LLM is the cascade tier).

    MODEL `keyword` fits Platt scaling of the keyword tier's confidence instead; `e5-small` refits its head's
    temperature, multi-intent threshold and blend with the keyword tier.  Both are saved under the models folder
    (<home>/calibration/keyword.json, e5-small.json), never into the installed package, and preferred to the
    fits that ship with it while the lexicons or head they were fitted for are installed.  Files are replaced
    atomically.  A fit needs at least 50 labelled rows, unless --force.  --from-feedback fits on confirmed and
    corrected answers (their calibration part; too few are refused).

    \b
    Exit codes: 0 done; 1 an error reported in words; 2 bad usage or bad data; 3 an unknown or missing model.
    """
    from mlx_intent.classifier import DEFAULT_THRESHOLD, IntentClassifier

    if from_feedback:
        if data:
            raise click.UsageError("--from-feedback fits on the feedback records: give no --data")
        rows, path = calibration_rows(settings.home), db_path(settings.home)
    else:
        names = data or (("calib", "public-calib") if model == ENCODER else ("calib",))
        paths = [data_path(d, settings.home) for d in names]
        rows = [{**r, "_source": p.stem} for p in paths for r in read_labelled(p)]
        path = paths[0] if len(paths) == 1 else Path("+".join(str(p) for p in paths))
        _enough(rows, force)
    if model == ENCODER:
        from mlx_intent.tuner.encoder import recalibrate

        recalibrate(rows, home=settings.home, report=click.echo)
        return
    if model == "keyword":
        return calibrate_keyword(path, rows, settings.home, click.echo)
    try:  # T = 1 whatever an earlier calibration.json says: the fit starts from the raw model
        clf = IntentClassifier(model, temperature=1.0, threshold=DEFAULT_THRESHOLD, home=settings.home)
    except (registry.UnknownModelError, registry.ModelNotAvailableError) as e:
        raise ModelError(str(e)) from None
    fit = fit_scoring(clf, rows, settings.batch_size, verify)
    if verify:
        click.echo(f"verify: largest |p(run) - p(fit)| = {fit['gap']:.2e}", err=True)
    temperature, threshold, raw, fitted, gold, gold_sets = (
        fit[k] for k in ("temperature", "threshold", "raw", "fitted", "gold", "gold_sets")
    )
    before, after = scoring_figures(raw, gold), scoring_figures(fitted, gold)
    record = {
        "temperature": temperature,
        "threshold": threshold,
        "fitted_on": shown(path),
        "n": len(rows),
        "ece_before": round(before["ece"], 4),
        "ece_after": round(after["ece"], 4),
        "adapter": shown(clf.adapter) if clf.adapter else None,  # a retrained adapter needs a new fit
    }
    if clf.calibration_weights is not None:  # a fit under the home for the shipped adapter names its weights
        record["weights"] = clf.calibration_weights
    calibration.write(clf.calibration_file, record)
    click.echo(f"{'':<24}{'T = 1':>10}{f'T = {temperature:.3f}':>12}")
    for label, key, show in SHOWN_FIGURES:
        click.echo(f"{label:<24}{show(before[key]):>10}{show(after[key]):>12}")
    default_match = set_match(fitted, gold_sets, DEFAULT_THRESHOLD, MAX_INTENTS)
    click.echo(
        f"threshold {threshold:g}: all_intents exact match {pct(set_match(fitted, gold_sets, threshold, MAX_INTENTS))}"
        f" (at {DEFAULT_THRESHOLD:g}: {pct(default_match)}) over {len(rows)} rows"
    )
    click.echo(f"wrote {clf.calibration_file}")
    if place:
        _place(clf, rows, fitted, path, temperature, threshold, settings)


def _place(clf, rows: list[dict], fitted, path: Path, temperature: float, threshold: float, settings) -> None:
    """Measure where MODEL goes in the default chain (first, cascade, blend) and store the winner beside its fits."""
    from mlx_intent import encoder
    from mlx_intent.tuner.calibrate import measure_places

    if (why := encoder.available(home=settings.home)) is not None:
        click.echo(f"place not measured ({encoder.NAME}: {why}); {clf.name} runs as the cascade tier", err=True)
        return
    clf.temperature, clf.threshold = temperature, threshold
    record = {**measure_places(clf, rows, fitted, settings, click.echo), "fitted_on": shown(path)}
    written = calibration.write(calibration.place_file(clf.name, settings.home), record)
    click.echo(f"wrote {written}: the default chain puts {clf.name} at its place {record['place']!r}")


def _enough(rows: list[dict], force: bool) -> None:
    """Refuse a fit on fewer than calibration.MIN_ROWS rows without --force: a temperature or a Platt fit on
    a handful of rows follows their noise, and every confidence of the tier would carry it."""
    if len(rows) < calibration.MIN_ROWS and not force:
        raise InputError(
            f"only {len(rows)} labelled rows: a calibration needs at least {calibration.MIN_ROWS} "
            "(use --force to fit on fewer anyway)"
        )
