"""``mlx-intent train MODEL``: a LoRA adapter for an LLM, or e5-small's intent head, on labelled data."""

from __future__ import annotations

import math
from pathlib import Path

import click

from mlx_intent.cli.options import clean_stale, home_options
from mlx_intent.encoder import NAME as ENCODER
from mlx_intent.errors import InputError, ModelError
from mlx_intent.feedback.data import FEEDBACK_WEIGHT, fold_feedback, training_rows
from mlx_intent.models import registry
from mlx_intent.settings import Settings
from mlx_intent.tuner.encoder import PAIR_SHARE


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click's FloatRange lets nan and inf through; a training run on them would only waste its time."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@click.command()
@click.argument("model")
@click.option(
    "--data",
    "train_data",
    multiple=True,
    help="Training JSONL, or a name; repeatable. [default: train; e5-small: train, public-train, context-train]",
)
@click.option("--valid", "valid_data", default=None, help="Validation JSONL (loss is reported, never tuned on).")
@click.option(
    "--calib",
    "calib_data",
    multiple=True,
    help="e5-small: calibration JSONL or name, repeatable; never trained on. [default: calib, public-calib]",
)
@click.option(
    "--epochs",
    default=None,
    type=click.FloatRange(0, min_open=True),
    callback=_finite,
    help="Passes over the training examples. [1; e5-small: 5]",
)
@click.option("--iters", type=click.IntRange(1), default=None, help="Training steps (overrides --epochs; LLMs).")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="[16; e5-small: 32]")
@click.option(
    "--learning-rate", default=3e-4, show_default=True, type=click.FloatRange(0, min_open=True), callback=_finite
)
@click.option(
    "--num-layers", default=8, show_default=True, type=click.IntRange(1), help="Top layers that get LoRA (LLMs)."
)
@click.option("--rank", default=16, show_default=True, type=click.IntRange(1), help="LoRA rank.")
@click.option(
    "--tune-layers", default=4, show_default=True, type=click.IntRange(0, 12), help="e5-small: top layers fine-tuned."
)
@click.option(
    "--pair-share",
    default=PAIR_SHARE,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="e5-small: the share of the loss carried by turns read after earlier turns (conversations, request pairs).",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace an existing adapter (e5-small: head); the old one is kept as NAME.previous/."
)
@click.option(
    "--with-feedback",
    is_flag=True,
    help=f"Add the training part of the feedback records (mlx-intent feedback), each {FEEDBACK_WEIGHT} times.",
)
@home_options
def train(
    model,
    train_data,
    valid_data,
    calib_data,
    epochs,
    iters,
    batch_size,
    learning_rate,
    num_layers,
    rank,
    tune_layers,
    pair_share,
    seed,
    force,
    with_feedback,
    settings: Settings,
) -> None:
    """Fine-tune MODEL on labelled data.

    An LLM gets a LoRA adapter so it writes the right JSON after the classifier's prompt, saved in
    <models folder>/adapters/MODEL/ (on a Mac the same command fine-tunes Llama 3.2 3B: QLoRA on the
    4-bit weights).  e5-small trains its intent head and top encoder layers, by default on train,
    public-train (our data and the public corpora of `mlx-intent data build`) and context-train (turns
    read after their earlier turns, plus 1000 single-turn rows after an earlier conversation), calibrates them on the
    calibration split, and saves them in mlx_intent/weights/e5-small/."""
    from mlx_intent.evaluation.data import data_path, read_labelled
    from mlx_intent.tuner.train import train_adapter

    report = lambda msg: click.echo(msg, err=True)  # noqa: E731
    target = _train_target(model, settings.home)
    _check_replace(target, force)
    clean_stale(target.parent)
    feedback = training_rows(settings.home) if with_feedback else []
    if model == ENCODER:
        from mlx_intent.tuner.augment import with_request_pairs
        from mlx_intent.tuner.encoder import train_encoder

        def rows_of(names):
            rows, counts = [], {}
            for name in names:
                path = data_path(name, settings.home)
                part = [{**r, "_source": path.stem} for r in read_labelled(path)]
                rows += part
                counts[path.stem] = len(part)
            return rows, counts

        train_rows, sources = rows_of(train_data or ("train", "public-train", "context-train"))
        if feedback:
            train_rows, sources = fold_feedback(train_rows, feedback), {**sources, "feedback": len(feedback)}
        paired = with_request_pairs(train_rows, seed)  # feedback on conversations included
        if len(paired) > len(train_rows):
            train_rows, sources = paired, {**sources, "request pairs": len(paired) - len(train_rows)}
        _check_rows_per_intent(train_rows)
        calib_rows, _ = rows_of(calib_data or ("calib", "public-calib"))
        try:
            summary = train_encoder(
                train_rows,
                calib_rows,
                tuned_layers=tune_layers,
                epochs=int(epochs or 5),
                batch_size=batch_size or 32,
                learning_rate=learning_rate,
                pair_share=pair_share,
                seed=seed,
                sources=sources,
                home=settings.home,
                report=report,
            )
        except ValueError as e:
            raise InputError(str(e)) from None
        click.echo(
            f"{ENCODER} head: {summary['out_dir']} ({summary['rows']} rows, {summary['epochs']} epochs, "
            f"{summary['train_seconds']:.0f} s)"
        )
        return
    if len(train_data) > 1 or calib_data:
        raise InputError("an LLM adapter trains on one --data file and takes no --calib (run mlx-intent calibrate)")
    summary = train_adapter(
        model,
        data_path(train_data[0] if train_data else "train", settings.home),
        data_path(valid_data, settings.home) if valid_data else None,
        iters=iters,
        epochs=epochs or 1.0,
        batch_size=batch_size or 16,
        learning_rate=learning_rate,
        num_layers=num_layers,
        rank=rank,
        seed=seed,
        report=report,
        home=settings.home,
        feedback=feedback,
    )
    click.echo(
        f"adapter for {model}: {registry.adapter_dir(model, settings.home)} "
        f"({summary['examples']} examples, {summary['iters']} steps, {summary['train_seconds']:.0f} s)"
    )


def _check_rows_per_intent(rows: list[dict]) -> None:
    """Refuse (exit 2, before training) e5-small training rows with fewer than MIN_ROWS_PER_INTENT of an intent:
    the head decides among all the intents, and 3 rows replaced the shipped 9,272-row head."""
    from collections import Counter

    from mlx_intent.schema import INTENTS
    from mlx_intent.tuner import MIN_ROWS_PER_INTENT

    counts = Counter(r.get("primary_intent") for r in rows)
    if short := [f"{i} ({counts[i]})" for i in INTENTS if counts[i] < MIN_ROWS_PER_INTENT]:
        raise InputError(
            f"{ENCODER} needs at least {MIN_ROWS_PER_INTENT} training rows of every intent; too few of: "
            + ", ".join(short)
        )


def _train_target(model: str, home: Path) -> Path:
    """The folder ``train MODEL`` writes: the e5-small head shipped in the package, else MODEL's adapter."""
    if model == ENCODER:
        from mlx_intent.encoder import HEAD_DIR

        return HEAD_DIR
    try:
        return registry.adapter_dir(model, home)
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None


def _check_replace(target: Path, force: bool) -> None:
    """Before any training: an existing adapter or head (and the calibration.json beside it) is only replaced
    with --force, and then kept as <name>.previous/."""
    from mlx_intent.tuner import previous_dir

    if target.exists() and not force:
        raise click.ClickException(
            f"{target} already holds a trained model (and its calibration); use --force to replace it "
            f"(the old one is then kept in {previous_dir(target)})"
        )
