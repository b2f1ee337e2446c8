"""The default chain as the README's figures run it: the shipped keyword calibration on.

conftest.py turns the shipped calibration off for the whole session (tests see raw keyword confidences);
this test puts it back and checks the chain applies it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_intent import keyword
from mlx_intent.chain import KEYWORD, build_chain, default_chain_names
from mlx_intent.models.registry import BUNDLED
from mlx_intent.settings import Settings

SHIPPED = keyword.LEXICON_DIR / "calibration.json"
DEV = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "dev.jsonl"


@pytest.fixture
def shipped_calibration(monkeypatch):
    assert SHIPPED.is_file()
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", SHIPPED)
    return json.loads(SHIPPED.read_text())


def test_the_default_chain_applies_the_shipped_keyword_calibration(
    models_home, shipped_calibration, monkeypatch, tmp_path
):
    settings = Settings()
    names = default_chain_names(settings)
    chain = build_chain(settings)
    floor = shipped_calibration["accuracy"]
    # the bundled model must beat the keyword tier's calibrated accuracy (the model floor), not min_confidence
    assert floor > settings.min_confidence
    assert chain.tiers[names.index(BUNDLED)].threshold == floor
    rows = [json.loads(line) for line in DEV.read_text().splitlines()[::60]][:9]  # all six languages
    results = chain.classify_batch([r["text"] for r in rows])
    for result in results:
        if result["tier"] == BUNDLED:
            assert result["confidence"] >= floor
    # the floor, and only it, sent some answers of the model down to the keyword tier
    floored = [
        f
        for r in results
        for f in r["fallbacks"]
        if f["tier"] == BUNDLED and f["kind"] == "low_confidence" and f["reason"].endswith(f"< {floor:.2f}")
    ]
    assert floored
    assert any(float(f["reason"].split()[2]) >= settings.min_confidence for f in floored)
    # the keyword tier's answers carry its Platt-scaled confidence, not the raw one
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", tmp_path / "none.json")
    raw = keyword.KeywordClassifier()
    platt = tuple(shipped_calibration["platt"])
    by_keyword = [(row, r) for row, r in zip(rows, results) if r["tier"] == KEYWORD]
    assert by_keyword
    for row, result in by_keyword:
        uncalibrated = raw.classify(row["text"])["confidence"]
        assert result["confidence"] == keyword.calibrate(uncalibrated, platt) != uncalibrated
