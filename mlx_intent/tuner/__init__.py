"""Fitting to data: LoRA training of the LLM tiers and calibration of every tier's confidence."""

import os
import shutil
from pathlib import Path

from mlx_intent.errors import UserError
from mlx_intent.schema import INTENTS

MIN_ROWS_PER_INTENT = 5  # e5-small's training rows of each intent, at least (its head decides among all of them)


class TrainingError(UserError):
    """A training run whose result must not replace the model in use (exit 1)."""


def previous_dir(out_dir: Path) -> Path:
    """Where a replaced adapter or head is kept: ``<name>.previous/`` beside it."""
    return out_dir.with_name(f"{out_dir.name}.previous")


def original_dir(out_dir: Path) -> Path:
    """Where the first adapter or head ever replaced (the shipped e5-small head) is kept: ``<name>.original/``."""
    return out_dir.with_name(f"{out_dir.name}.original")


def install(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``; an existing ``out_dir`` (with its calibration.json) is
    kept aside as ``<name>.previous/``.  The one there before goes to ``<name>.original/`` if that is free, so a
    second --force never loses the first model replaced (the shipped head); later ones are replaced."""
    if out_dir.exists():
        previous = previous_dir(out_dir)
        if previous.exists():
            original = original_dir(out_dir)
            if original.exists():
                shutil.rmtree(previous)
            else:
                os.replace(previous, original)
        os.replace(out_dir, previous)
    os.replace(tmp, out_dir)


def check_finite(weights: Path) -> None:
    """Refuse (TrainingError) trained weights that hold NaN or infinity (a learning rate too high): installed, they
    would make every answer fall to the next tier."""
    import mlx.core as mx

    bad = [k for k, v in mx.load(str(weights)).items() if not mx.all(mx.isfinite(v.astype(mx.float32))).item()]
    if bad:
        raise TrainingError(
            f"training diverged: {len(bad)} trained tensors hold NaN or infinity ({bad[0]}, ...); nothing was "
            "installed (try a lower --learning-rate)"
        )


def check_better_than_chance(accuracy: float | None) -> None:
    """Refuse (TrainingError) a model whose accuracy on its own calibration split is no better than guessing one
    of the intents: it would answer worse than the model it replaces."""
    if accuracy is not None and not accuracy > 1 / len(INTENTS):
        raise TrainingError(
            f"the trained model scores {accuracy:.1%} on its calibration split, no better than chance "
            f"({1 / len(INTENTS):.1%}); nothing was installed"
        )
