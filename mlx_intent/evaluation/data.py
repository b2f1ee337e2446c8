"""Labelled data: finding a set by name and reading its rows (used by eval, compare, train and calibrate)."""

from __future__ import annotations

from pathlib import Path

from mlx_intent.context import context_problem
from mlx_intent.errors import InputError
from mlx_intent.jsonl import read_jsonl
from mlx_intent.normalize import text_problem
from mlx_intent.schema import INTENTS

ROOT = Path(__file__).resolve().parent.parent.parent
DATA_DIR = ROOT / "benchmarks" / "data"


def data_path(data: str, home: Path) -> Path:
    """A JSONL file, or a bare name of one under benchmarks/data (``dev``, ``train``, ``calib``) or
    under <models home>/data, where ``mlx-intent data build`` writes the public corpora
    (``public-train``, ``public-heldout-clinc150``, ``reserved-xsid``...); ``home`` is the models folder
    (``Settings.home``)."""

    path = Path(data)
    if path.is_file():
        return path
    places = [DATA_DIR / f"{data}.jsonl", home / "data" / f"{data}.jsonl"]
    for named in places:
        if not path.suffix and named.is_file():
            return named
    hint = " (run `mlx-intent data build` for the public sets)" if data.startswith(("public-", "reserved-")) else ""
    raise InputError(f"{data}: no such file, nor {' nor '.join(map(str, places))}{hint}")


def read_labelled(path: Path) -> list[dict]:
    """Rows {id, text, lang, primary_intent, all_intents, and optionally context (earlier turns) and kind};
    all_intents defaults to [primary_intent].

    Stops at the first bad line, naming it: evaluating on silently skipped rows would mislead."""
    rows = []
    for n, row in read_jsonl(path):  # a line that is not UTF-8 JSON: a JSONLError (an InputError) naming it
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or text_problem(row["text"]) is not None:
            raise InputError(f'{path}:{n}: expected an object with a non-empty string "text"')
        primary = row.get("primary_intent")
        all_intents = row.get("all_intents") or [primary]
        if not isinstance(all_intents, list) or not all(
            isinstance(i, str) and i in INTENTS for i in [primary, *all_intents]
        ):
            raise InputError(f"{path}:{n}: primary_intent and all_intents must be among the 15 intents")
        if not isinstance(row.get("lang"), (str, type(None))):
            raise InputError(f"{path}:{n}: lang must be a language code such as en")
        if row.get("context") is not None and (problem := context_problem(row["context"])) is not None:
            raise InputError(f"{path}:{n}: {problem}")
        rows.append({**row, "id": str(row.get("id", n)), "all_intents": all_intents})
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows
