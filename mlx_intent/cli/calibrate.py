"""``mlx-intent calibrate MODEL``: fit a tier's confidence calibration on labelled data."""

from __future__ import annotations

import json
import os

import click
import numpy as np

from mlx_intent.cli.options import settings_options
from mlx_intent.errors import ModelError
from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.evaluation.run import pct, shown
from mlx_intent.models import registry
from mlx_intent.schema import INTENTS, MAX_INTENTS
from mlx_intent.settings import Settings
from mlx_intent.tuner.calibrate import (
    _SHOWN,
    _distributions,
    _figures,
    calibrate_keyword,
    every_branch,
    fit_temperature,
    fit_threshold,
    set_match,
    temper,
    trie_tree,
)


@click.command("calibrate")
@click.argument("model")
@click.option("--data", default="dev", show_default=True, help="Labelled JSONL, or a name in benchmarks/data.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Run the model again at the fitted temperature and score that run.",
)
@settings_options
def calibrate_command(model: str, data: str, verify: bool, settings: Settings) -> None:
    """Fit MODEL's temperature (NLL of the gold primary) and multi-intent threshold (all_intents exact match)
    on labelled data, and save them in calibration.json (beside MODEL's adapter, else in its folder) for classify.

    MODEL `keyword` fits Platt scaling of the keyword tier's confidence instead (saved beside the lexicons).

    \b
    Exit codes: 0 done; 1 an error reported in words; 2 bad usage or bad data; 3 an unknown or missing model.
    """
    from mlx_intent.classifier import CALIBRATION, DEFAULT_THRESHOLD, IntentClassifier

    if settings.home is not None:  # the registry reads the environment
        os.environ["MLX_INTENT_HOME"] = str(settings.home)
    path = data_path(data)
    rows = read_labelled(path)
    if model == "keyword":
        return calibrate_keyword(path, rows)
    texts = [r["text"] for r in rows]
    gold = [INTENTS.index(r["primary_intent"]) for r in rows]
    try:  # T = 1 whatever an earlier calibration.json says: the fit starts from the raw model
        clf = IntentClassifier(model, temperature=1.0, threshold=DEFAULT_THRESHOLD)
    except (registry.UnknownModelError, registry.ModelNotAvailableError) as e:
        raise ModelError(str(e)) from None
    with every_branch():
        raw = _distributions(clf, texts, settings.batch_size, "T=1")
    tree = trie_tree(clf._branch)
    temperature = round(fit_temperature(raw, gold, tree), 4)
    fitted = temper(raw, temperature, tree)
    if verify:
        clf.temperature = temperature
        run = _distributions(clf, texts, settings.batch_size, f"T={temperature:.3f}")
        click.echo(f"verify: largest |p(run) - p(fit)| = {np.abs(run - fitted).max():.2e}", err=True)
        fitted = run
    gold_sets = [set(r["all_intents"]) for r in rows]
    threshold = fit_threshold(fitted, gold_sets, MAX_INTENTS, DEFAULT_THRESHOLD)
    before, after = _figures(raw, gold), _figures(fitted, gold)
    folder = clf.calibration_dir
    record = {
        "temperature": temperature,
        "threshold": threshold,
        "fitted_on": shown(path),
        "n": len(rows),
        "ece_before": round(before["ece"], 4),
        "ece_after": round(after["ece"], 4),
        "adapter": shown(clf.adapter) if clf.adapter else None,  # a retrained adapter needs a new fit
    }
    (folder / CALIBRATION).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    click.echo(f"{'':<24}{'T = 1':>10}{f'T = {temperature:.3f}':>12}")
    for label, key, show in _SHOWN:
        click.echo(f"{label:<24}{show(before[key]):>10}{show(after[key]):>12}")
    default_match = set_match(fitted, gold_sets, DEFAULT_THRESHOLD, MAX_INTENTS)
    click.echo(
        f"threshold {threshold:g}: all_intents exact match {pct(set_match(fitted, gold_sets, threshold, MAX_INTENTS))}"
        f" (at {DEFAULT_THRESHOLD:g}: {pct(default_match)}) over {len(rows)} rows"
    )
    click.echo(f"wrote {folder / CALIBRATION}")
