"""Fitting to data: LoRA training of the LLM tiers and calibration of every tier's confidence."""

import os
import shutil
from pathlib import Path


def previous_dir(out_dir: Path) -> Path:
    """Where a replaced adapter or head is kept: ``<name>.previous/`` beside it."""
    return out_dir.with_name(f"{out_dir.name}.previous")


def install(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``; an existing ``out_dir`` (with its calibration.json) is
    kept aside as ``<name>.previous/`` (replacing an older one there), never deleted."""
    if out_dir.exists():
        previous = previous_dir(out_dir)
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(out_dir, previous)
    os.replace(tmp, out_dir)
