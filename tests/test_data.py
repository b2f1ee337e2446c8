"""Checks on the labelled data in benchmarks/data: format, labels, scripts, coverage, duplicates.

dev.jsonl is the held-out evaluation set and must always be present: its absence is a
failure, never a skip.  train.jsonl is added by the training-data work; every per-file
check below runs on it too once it exists, and its own size and coverage test runs
only when the file is present.  probe.jsonl is a second held-out set, social talk beside
chatty requests, written by another author without sight of the project's data.  Intent
and language names come from mlx_intent.schema only, and texts are compared through
mlx_intent.normalize.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from mlx_intent.normalize import normalize
from mlx_intent.schema import INTENTS, LANGUAGES

DATA_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "data"
DEV = DATA_DIR / "dev.jsonl"
TRAIN = DATA_DIR / "train.jsonl"
PROBE = DATA_DIR / "probe.jsonl"
NOISE = DATA_DIR / "noise.jsonl"  # held-out noise and short greetings (issue 23), never trained on

# dev.jsonl is always checked (and fails when missing); train.jsonl and probe.jsonl once they exist.
FILES = [DEV] + [path for path in (TRAIN, PROBE) if path.exists()]
CHECKED = FILES + [NOISE]  # every labelled set of ours: format, labels, script, unique ids and texts
# Rule-7 noise typed on another keyboard layout: "тест" on a Latin one.  Checked by id, so nothing else slips by.
WRONG_LAYOUT = {"train-nA-ru-043"}

KEYS = {"id", "text", "lang", "primary_intent", "all_intents"}
SCRIPT_LANGS = {"ar": "ARABIC", "ru": "CYRILLIC"}  # every other language is Latin-script
DEV_MIN_LINES, DEV_MIN_PER_CELL = 450, 4
TRAIN_MIN_LINES, TRAIN_MIN_PER_CELL = 1500, 12
MIN_MULTI_SHARE = 0.10
DEV_ID = re.compile(r"dev-([a-z]{2})-\d{4}")
MAX_SHOWN = 20


@cache
def load(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a JSONL file and the parse errors met on the way."""
    assert path.exists(), f"{path} is missing"
    records, errors = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                errors.append(f"{path.name}:{n}: blank line")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path.name}:{n}: invalid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{path.name}:{n}: not a JSON object")
                continue
            obj["_where"] = f"{path.name}:{n}"
            records.append(obj)
    return records, errors


def fields(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "_where"}


def report(errors: list[str]) -> str:
    more = f"\n... and {len(errors) - MAX_SHOWN} more" if len(errors) > MAX_SHOWN else ""
    return "\n".join(errors[:MAX_SHOWN]) + more


def script_counts(text: str) -> Counter:
    """Letters of the text counted by script: LATIN, CYRILLIC, ARABIC or OTHER."""
    counts: Counter = Counter()
    for ch in text:
        if ch.isalpha():
            script = unicodedata.name(ch, "OTHER").split()[0]
            counts[script if script in ("LATIN", "CYRILLIC", "ARABIC") else "OTHER"] += 1
    return counts


def cells(records: list[dict]) -> Counter:
    return Counter((r.get("primary_intent"), r.get("lang")) for r in records)


def check_coverage(path: Path, min_lines: int, min_per_cell: int) -> None:
    records, _ = load(path)
    assert len(records) >= min_lines, f"{path.name}: {len(records)} lines, need at least {min_lines}"
    counts = cells(records)
    thin = [
        f"{intent}/{lang}: {counts[intent, lang]}"
        for intent in INTENTS
        for lang in LANGUAGES
        if counts[intent, lang] < min_per_cell
    ]
    assert not thin, f"{path.name}: fewer than {min_per_cell} per intent x language:\n" + report(thin)


def test_dev_exists_and_covers_every_intent_and_language():
    assert DEV.exists(), f"{DEV} is missing"
    check_coverage(DEV, DEV_MIN_LINES, DEV_MIN_PER_CELL)


def test_train_size_and_coverage():
    assert TRAIN.exists(), f"{TRAIN} is missing"
    check_coverage(TRAIN, TRAIN_MIN_LINES, TRAIN_MIN_PER_CELL)


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_lines_are_json_objects_with_exact_keys(path):
    records, parse_errors = load(path)
    errors = list(parse_errors)
    for r in records:
        keys = set(fields(r))
        if keys != KEYS:
            errors.append(
                f"{r['_where']}: keys {sorted(keys)}; missing {sorted(KEYS - keys)}, extra {sorted(keys - KEYS)}"
            )
            continue
        for k in ("id", "text", "lang", "primary_intent"):
            if not isinstance(r[k], str) or not r[k].strip():
                errors.append(f"{r['_where']}: {k} must be a non-empty string, got {r[k]!r}")
        if not isinstance(r["all_intents"], list):
            errors.append(f"{r['_where']}: all_intents must be a list")
    assert not errors, report(errors)


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_labels_follow_schema(path):
    records, _ = load(path)
    errors = []
    for r in records:
        where, primary, all_intents = r["_where"], r.get("primary_intent"), r.get("all_intents")
        if r.get("lang") not in LANGUAGES:
            errors.append(f"{where}: unknown lang {r.get('lang')!r}")
        if primary not in INTENTS:
            errors.append(f"{where}: unknown primary_intent {primary!r}")
        if not isinstance(all_intents, list) or not all_intents:
            errors.append(f"{where}: all_intents must be a non-empty list")
            continue
        unknown = [i for i in all_intents if i not in INTENTS]
        if unknown:
            errors.append(f"{where}: unknown intents in all_intents {unknown}")
        if len(set(map(str, all_intents))) != len(all_intents):
            errors.append(f"{where}: duplicate intents in all_intents {all_intents}")
        if all_intents[0] != primary:
            errors.append(f"{where}: all_intents[0] {all_intents[0]!r} != primary_intent {primary!r}")
    assert not errors, report(errors)


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_script_matches_lang(path):
    records, _ = load(path)
    errors = []
    for r in records:
        lang, text = r.get("lang"), r.get("text")
        if not isinstance(text, str) or lang not in LANGUAGES:
            continue  # reported by the format and label tests
        counts = script_counts(text)
        if not counts or r.get("id") in WRONG_LAYOUT:
            continue  # no letters (digits, punctuation, emoji: rule-7 noise) have no script to check
        if lang in SCRIPT_LANGS:
            script = SCRIPT_LANGS[lang]
            if counts[script] == 0:
                errors.append(f"{r['_where']}: lang {lang} but no {script.lower()} letters: {text!r}")
        else:
            foreign = counts["CYRILLIC"] + counts["ARABIC"]
            if counts["LATIN"] == 0 or 2 * foreign > sum(counts.values()):
                errors.append(f"{r['_where']}: lang {lang} but not mostly Latin letters: {text!r}")
    assert not errors, report(errors)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_multi_intent_share(path):
    records, _ = load(path)
    multi = sum(isinstance(r.get("all_intents"), list) and len(r["all_intents"]) > 1 for r in records)
    share = multi / len(records) if records else 0.0
    assert share >= MIN_MULTI_SHARE, f"{path.name}: multi-intent share {share:.1%} < {MIN_MULTI_SHARE:.0%}"


def test_dev_ids_name_their_language():
    records, _ = load(DEV)
    errors = []
    for r in records:
        m = DEV_ID.fullmatch(str(r.get("id")))
        if not m or m.group(1) != r.get("lang"):
            errors.append(f"{r['_where']}: id {r.get('id')!r} is not dev-<lang>-<nnnn> for lang {r.get('lang')!r}")
    assert not errors, report(errors)


def test_ids_unique_across_files():
    seen: dict[str, str] = {}
    errors = []
    for path in CHECKED:
        for r in load(path)[0]:
            rid = str(r.get("id"))
            if rid in seen:
                errors.append(f"{r['_where']}: id {rid!r} already used at {seen[rid]}")
            else:
                seen[rid] = r["_where"]
    assert not errors, report(errors)


def test_texts_unique_after_normalization_across_files():
    seen: dict[str, str] = {}
    errors = []
    for path in CHECKED:
        for r in load(path)[0]:
            text = r.get("text")
            if not isinstance(text, str):
                continue  # reported by the format test
            key = normalize(text)
            if key in seen:
                errors.append(f"{r['_where']}: {text!r} duplicates {seen[key]} after normalization")
            else:
                seen[key] = r["_where"]
    assert not errors, report(errors)
