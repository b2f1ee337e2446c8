"""Calibration files: where each tier's fit lives, reading one without trusting it, and writing one safely.

Every tier's confidence goes through a fit read from a file: an LLM's ``calibration.json`` beside its adapter
(else its weights); the keyword tier's and e5-small's shipped with the package, or fitted by ``mlx-intent
calibrate`` into ``<models home>/calibration/``, which is preferred.  A file is anyone's to damage, so none is
trusted: one that is not JSON, lacks a key or holds a value out of range (a temperature of 0 would make every
confidence 1.0) is warned about once and ignored, with the reason kept for ``models list``; the next file in line
is used, else raw confidences.  A bad fit never stops an answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_intent.errors import warn_once

FOLDER = "calibration"  # under the models home: the fits of `mlx-intent calibrate keyword` and `... e5-small`
MIN_ROWS = 50  # `mlx-intent calibrate` refuses fewer labelled rows without --force: such a fit is mostly noise
T_RANGE = (0.05, 20.0)  # the softmax temperatures a fit may choose, and a file may hold
_REQUIRED = object()


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Loaded:
    """The fit a loader settled on: ``fit`` (None: raw confidences), the file it came from, and the files
    ignored on the way, each with its reason."""

    fit: Any = None
    path: Path | None = None
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for ``models list``: where the fit came from, or why there is none."""
        used = str(self.path) if self.path is not None else "none (raw confidences)"
        return "; ".join([used, *(f"IGNORED {p}" for p in self.problems)])


def home_file(name: str, home: Path) -> Path:
    """Where ``mlx-intent calibrate`` keeps the fit of tier ``name``: under the models home, never the package."""

    return home / FOLDER / f"{name}.json"


def read_record(path: Path) -> dict | None:
    """The JSON object in ``path``; None when there is no such file; CalibrationError for anything else."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read it ({e})") from None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CalibrationError(f"not JSON ({e})") from None
    if not isinstance(record, dict):
        raise CalibrationError(f"not a JSON object but {type(record).__name__}")
    return record


def number(record: dict, key: str, low: float, high: float, *, default: Any = _REQUIRED, open_low: bool = False):
    """``record[key]`` as a float in [low, high] ((low, high] with ``open_low``); ``default`` when absent."""
    if key not in record:
        if default is _REQUIRED:
            raise CalibrationError(f"no {key!r}")
        return default
    return checked(record[key], key, low, high, open_low=open_low)


def checked(value: Any, what: str, low: float, high: float, *, open_low: bool = False) -> float:
    """``value`` as a finite float in [low, high] ((low, high] with ``open_low``), else CalibrationError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalibrationError(f"{what} is not a number: {value!r:.40}")
    try:
        x = float(value)
    except OverflowError:  # an integer past float's range
        x = math.nan
    if not (math.isfinite(x) and (x > low if open_low else x >= low) and x <= high):
        raise CalibrationError(f"{what} = {value!r:.40} is out of range ({'(' if open_low else '['}{low:g}, {high:g}])")
    return x


def numbers(value: Any, what: str, count: int) -> list:
    """``value`` as a list of ``count`` items (each then checked by the caller), else CalibrationError."""
    if not isinstance(value, list) or len(value) != count:
        raise CalibrationError(f"{what} is not a list of {count} numbers: {value!r:.60}")
    return value


def load(candidates: Iterable[Path], parse: Callable[[dict, Path], Any], tier: str) -> Loaded:
    """The fit of the first of ``candidates`` that exists and that ``parse`` accepts; a file it refuses (or that
    is no JSON object) is warned about once and skipped.  Never raises for a file's contents."""
    problems = []
    for path in candidates:
        try:
            record = read_record(path)
            if record is None:
                continue
            fit = parse(record, path)
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
            problems.append(f"{path}: {e}")
            continue
        return _warned(Loaded(fit, path, tuple(problems)), tier)
    return _warned(Loaded(None, None, tuple(problems)), tier)


def _warned(loaded: Loaded, tier: str) -> Loaded:
    instead = f"the fit in {loaded.path}" if loaded.path is not None else "raw confidences"
    for problem in loaded.problems:
        warn_once(("calibration", problem), f"{tier}: ignoring the calibration {problem}; answering with {instead}")
    return loaded


def fingerprint(paths: Iterable[Path]) -> str:
    """A short hash of files' names and contents: a fit under the home names what it was fitted for."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def write(path: Path, record: dict) -> Path:
    """Write ``record`` as JSON atomically (a temporary file beside it, fsynced, then renamed over it), so a
    crash or a full disk leaves the old fit or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# Where an LLM goes in the default chain, measured by `mlx-intent calibrate MODEL` on the calibration split and kept
# beside its fits as <models home>/calibration/<MODEL>.place.json: in front of the encoder ("first"), after it for
# the texts it is unsure of ("cascade"), or inside its blend with the keyword tier at a fitted weight ("blend").
PLACES = ("first", "cascade", "blend")
DEFAULT_PLACE = "cascade"  # never measured: an LLM whose accuracy on people's text is unknown does not go first
WEIGHT_RANGE = (0.0, 5.0)  # the LLM's log-linear weight in the blend


@dataclass(frozen=True)
class Place:
    """An LLM's measured place: ``name`` (one of PLACES), its blend ``weight`` (None: not fitted), the calibration
    split's ``figures`` for each place, and the file it came from (``source``; an unusable one is named there)."""

    name: str = DEFAULT_PLACE
    weight: float | None = None
    figures: dict | None = None
    source: Loaded = Loaded()

    def why(self) -> str:
        """One line for ``models list`` and ``config``: the place and the figures that chose it."""
        ignored = "".join(f"; IGNORED {p}" for p in self.source.problems)
        if self.figures is None:
            return f"{self.name} (not measured, so never first){ignored}"
        shown = ", ".join(f"{name} {100 * f['accuracy']:.1f}%" for name, f in self.figures.items())
        return f"{self.name} (accuracy on the calibration split: {shown}; {self.source.path})"


def place_file(model: str, home: Path) -> Path:
    return home_file(f"{model}.place", home)


def read_place(model: str, home: Path) -> Place:
    """``model``'s measured place, else the default (cascade); a file that cannot be used is warned about once
    and ignored."""
    path = place_file(model, home)
    try:
        record = read_record(path)
        if record is None:
            return Place()
        if record.get("model") != model:
            raise CalibrationError(f"measured for {record.get('model')!r:.40}, not {model}")
        if record.get("place") not in PLACES:
            raise CalibrationError(f"place {record.get('place')!r:.40} is not one of {', '.join(PLACES)}")
        weight = number(record, "llm_weight", *WEIGHT_RANGE, default=None)
        figures = record.get("figures")
        if not isinstance(figures, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("accuracy"), (int, float)) for f in figures.values()
        ):
            raise CalibrationError("figures is not an object of {place: {accuracy, ...}}")
    except (OSError, ValueError, TypeError) as e:
        problem = f"{path}: {e}"
        warn_once(("place", problem), f"{model}: ignoring the place {problem}; it runs as the {DEFAULT_PLACE} tier")
        return Place(source=Loaded(problems=(problem,)))
    return Place(record["place"], weight, figures, Loaded(record["place"], path))
