"""Temperature, threshold and Platt fitting on synthetic data, and `mlx-intent calibrate` on the
bundled model and the keyword tier."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from mlx_intent.calibration import PLACES, place_file, read_place
from mlx_intent.chain import ENCODER, default_chain_names
from mlx_intent.schema import INTENTS
from mlx_intent.settings import Settings, settings_home
from mlx_intent.tuner.calibrate import (
    every_branch,
    fit_platt,
    fit_temperature,
    fit_threshold,
    intents_at,
    platt,
    temper,
    trie_tree,
)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def synthetic(scale: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Labels drawn from softmax(z) (calibrated at T = 1), probabilities reported as softmax(scale * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 15))
    truth = softmax(z)
    gold = [int(rng.choice(15, p=p)) for p in truth]
    return softmax(scale * z), gold


@pytest.mark.parametrize(("scale", "low", "high"), [(3.0, 2.6, 3.4), (0.5, 0.43, 0.57), (1.0, 0.9, 1.1)])
def test_fit_recovers_the_temperature(scale, low, high):
    probs, gold = synthetic(scale)
    t = fit_temperature(probs, gold)
    assert low < t < high  # over-confident (scale 3) needs T ~ 3 > 1, under-confident T ~ 0.5 < 1
    before = np.mean([-np.log(p[g]) for p, g in zip(probs, gold)])
    after = np.mean([-np.log(p[g]) for p, g in zip(temper(probs, t), gold)])
    assert after <= before + 1e-9


def test_temper_flat_is_power_renormalised():
    p = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    q = p**0.5 / (p**0.5).sum(axis=1, keepdims=True)
    assert np.allclose(temper(p, 2.0), q)
    assert np.allclose(temper(p, 1.0), p)


def test_temper_follows_the_branch_points():
    """Leaves 0 and 1 share a first token: softmax at each branch point, as the classifier does."""
    rng = np.random.default_rng(1)
    top, inner = rng.normal(0, 2, (5, 3)), rng.normal(0, 2, (5, 2))

    def leaves(t: float) -> np.ndarray:
        a, b = softmax(top / t), softmax(inner / t)
        return np.column_stack([a[:, 0] * b[:, 0], a[:, 0] * b[:, 1], a[:, 1], a[:, 2]])

    tree = [[0, 1], 2, 3]
    for t in (0.3, 2.5):
        assert np.allclose(temper(leaves(1.0), t, tree), leaves(t))
    assert not np.allclose(temper(leaves(1.0), 2.5), leaves(2.5))  # a flat power is not the same


def test_trie_tree_collapses_single_child_chains():
    from mlx_intent.sampler import build_trie

    root = build_trie({"greeting": [1, 2], "general": [1, 3, 4], "weather": [5]})
    assert trie_tree(root) == [[INTENTS.index("greeting"), INTENTS.index("general")], INTENTS.index("weather")]


def test_fit_threshold_picks_the_gap_between_noise_and_real_second_intents():
    rows, gold = [], []
    for second, is_real in [(0.32, True), (0.28, True), (0.14, False), (0.12, False)] * 5:
        p = np.full(15, (1 - 0.5 - second) / 13)
        p[1], p[2] = 0.5, second
        rows.append(p)
        gold.append({INTENTS[1], INTENTS[2]} if is_real else {INTENTS[1]})
    probs = np.array(rows)
    # 0.15, 0.2 and 0.25 all separate them; the tie goes to the value nearest the default
    assert fit_threshold(probs, gold, max_intents=3, default=0.2) == 0.2
    assert fit_threshold(probs, gold, max_intents=3, default=0.5) == 0.25
    assert intents_at(probs[0], 0.01, 3) == {INTENTS[1], INTENTS[2], INTENTS[0]}
    assert intents_at(probs[0], 0.01, 2) == {INTENTS[1], INTENTS[2]}


def test_intents_at_matches_the_classifier():
    from mlx_intent.classifier import IntentClassifier

    clf = object.__new__(IntentClassifier)  # _answer needs only the threshold
    rng = np.random.default_rng(2)
    for t in (0.05, 0.2, 0.35):
        clf.threshold = t
        for p in softmax(rng.normal(0, 1.2, (50, 15))):
            assert set(clf._answer(dict(zip(INTENTS, p)))[2]) == intents_at(p, t, 3)


def test_every_branch_lifts_the_skip_and_restores_it():
    from mlx_intent import classifier

    before = classifier.SKIP_MASS
    with every_branch():
        assert classifier.SKIP_MASS == 0
    assert classifier.SKIP_MASS == before > 0


LABELLED = [
    ("hello, how are you?", "greeting", ["greeting"]),
    ("where can I eat good kebab?", "restaurant", ["restaurant"]),
    ("is the Blue Mosque open on Friday?", "attraction", ["attraction"]),
    ("which tram goes to Sultanahmet?", "transportation", ["transportation"]),
    ("will it rain tomorrow?", "weather", ["weather"]),
    ("any jazz concerts tonight?", "events", ["events"]),
    ("is Moda a nice area to stay?", "neighborhood", ["neighborhood"]),
    ("best place to buy a carpet", "shopping", ["shopping"]),
    ("bus from IST airport to Taksim", "airport_transport", ["airport_transport"]),
    ("navigate me to Galata Tower from here", "gps_route_planning", ["gps_route_planning"]),
    ("hi! where can I eat near the hotel?", "restaurant", ["restaurant", "greeting"]),
    ("do I need a visa?", "general", ["general"]),
]


@pytest.fixture
def restored_calibration(models_home, bundled):
    """The bundled model's calibration.json as it was before the test, whatever the test does or raises:
    other tests expect the raw model."""
    from mlx_intent.classifier import CALIBRATION
    from mlx_intent.models import registry

    path = registry.resolve_dir("smollm2-135m", home=settings_home()) / CALIBRATION
    before = path.read_bytes() if path.exists() else None
    try:
        yield path
    finally:
        place_file("smollm2-135m", home=settings_home()).unlink(missing_ok=True)
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


def test_calibrate_writes_calibration_json_that_the_classifier_reads(
    models_home, bundled, tmp_path, restored_calibration
):
    from mlx_intent.classifier import CALIBRATION, IntentClassifier
    from mlx_intent.cli.main import main
    from mlx_intent.models import registry

    data = tmp_path / "labelled.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"id": str(i), "text": t, "primary_intent": p, "all_intents": a})
            for i, (t, p, a) in enumerate(LABELLED)
        )
        + "\n"
    )
    args = ["calibrate", "smollm2-135m", "--data", str(data), "--batch-size", "6", "--force"]  # 12 rows < 50
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    written = json.loads((registry.resolve_dir("smollm2-135m", home=settings_home()) / CALIBRATION).read_text())
    assert set(written) >= {"temperature", "threshold", "fitted_on", "n", "ece_before", "ece_after"}
    assert written["n"] == 12 and written["fitted_on"].endswith("labelled.jsonl")
    assert 0.05 <= written["temperature"] <= 20 and written["temperature"] != 1.0
    assert 0.05 <= written["threshold"] <= 0.5
    # the fit from the T = 1 run matches the real run at the fitted T (the trie has a deeper branch point)
    gap = float(re.search(r"largest \|p\(run\) - p\(fit\)\| = (\S+)", result.output)[1])
    assert gap < 1e-4

    model, tokenizer = bundled
    clf = IntentClassifier("smollm2-135m", model=model, tokenizer=tokenizer)
    assert clf.temperature == written["temperature"] and clf.threshold == written["threshold"]
    # where it goes in the chain: the three places measured through the chain on the same rows, the best kept
    place = json.loads(place_file("smollm2-135m", home=settings_home()).read_text())
    assert set(place["figures"]) == set(PLACES) and place["n"] == 12
    best = max(f["accuracy"] for f in place["figures"].values())
    assert place["figures"][place["place"]]["accuracy"] == best
    assert place["figures"]["first"]["llm_read"] == 1.0  # first, it reads every text
    assert place["figures"]["cascade"]["llm_read"] <= 1.0
    assert 0 <= place["llm_weight"] <= 2 and read_place("smollm2-135m", home=settings_home()).name == place["place"]
    assert "where smollm2-135m goes" in result.output
    names = default_chain_names(Settings(model="smollm2-135m", fallback_model="smollm2-135m"))
    expected = {"first": ["smollm2-135m", ENCODER], "cascade": [ENCODER, "smollm2-135m"]}
    assert names[:2] == expected.get(place["place"], [f"{ENCODER}+smollm2-135m", "keyword"])


def test_the_calibration_is_restored_after_the_calibrate_test(restored_calibration):
    """Runs after the test above (file order): however it ended, no calibration.json of its is left."""
    assert not restored_calibration.exists()


# ---- the keyword tier: Platt scaling ------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(1.0, 0.0), (2.0, -1.0), (0.5, 1.5)])
def test_fit_platt_recovers_its_parameters(a, b):
    """Correctness drawn with probability platt(c; a, b): the fit finds a and b again."""
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.05, 0.95, 20000)
    correct = rng.uniform(size=conf.size) < platt(conf, a, b)
    fa, fb = fit_platt(conf, correct)
    assert fa == pytest.approx(a, abs=0.1) and fb == pytest.approx(b, abs=0.1)


@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=50), st.floats(0.1, 3.0), st.floats(-3.0, 3.0))
def test_keyword_calibration_is_monotone_and_a_probability(confidences, a, b):
    from mlx_intent.keyword import calibrate

    out = [calibrate(c, (a, b)) for c in sorted(confidences)]
    assert all(0.0 <= p <= 1.0 for p in out)
    assert out == sorted(out)  # a > 0: the ranking of answers never changes
    assert [calibrate(c, None) for c in confidences] == confidences


def test_calibrate_keyword_writes_the_fit_the_tier_reads(tmp_path, monkeypatch):
    """Under the models home, not beside the lexicons (the installed package); the tier prefers it."""
    from mlx_intent import calibration, keyword
    from mlx_intent.chain import keyword_tier
    from mlx_intent.cli.main import main

    packaged = tmp_path / "package" / "calibration.json"
    packaged.parent.mkdir()
    packaged.write_text(json.dumps({"platt": [1.0, 0.0], "accuracy": 0.5}))
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", packaged)
    data = tmp_path / "labelled.jsonl"
    lines = (json.dumps({"id": str(i), "text": t, "primary_intent": p}) for i, (t, p, _) in enumerate(LABELLED))
    data.write_text("".join(line + "\n" for line in lines))
    home = tmp_path / "home"
    args = ["calibrate", "keyword", "--data", str(data), "--home", str(home), "--force"]  # 12 rows < 50
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(packaged.read_text()) == {"platt": [1.0, 0.0], "accuracy": 0.5}
    written = json.loads(calibration.home_file(keyword.FIT_NAME, home).read_text())
    assert written["n"] == len(LABELLED) and written["fitted_on"].endswith("labelled.jsonl")
    assert written["ece_after"] <= written["ece_before"] + 1e-9
    a, b = written["platt"]
    text = LABELLED[1][0]
    raw = keyword.classify_keywords(text)
    tiered = keyword_tier(home).run([text])[0]
    assert tiered["primary_intent"] == raw["primary_intent"]
    assert tiered["confidence"] == pytest.approx(float(platt(np.array([raw["confidence"]]), a, b)[0]), abs=1e-4)
    assert keyword.KeywordClassifier(platt=None).classify(text)["confidence"] == raw["confidence"]


def test_a_broken_keyword_calibration_is_named_and_costs_only_the_calibration(tmp_path, monkeypatch):
    from mlx_intent import keyword

    bad = tmp_path / "calibration.json"
    bad.write_text('{"platt": "no"}')
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", bad)
    with pytest.warns(RuntimeWarning, match="calibration.json"):
        clf = keyword.KeywordClassifier()
    assert clf.platt is None and clf.calibration.path is None
    assert "platt" in clf.calibration.problems[0] and str(bad) in clf.calibration.problems[0]
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", tmp_path / "absent.json")
    assert keyword.KeywordClassifier().platt is None


def test_calibrate_never_writes_into_the_shipped_adapter(models_home, bundled, tmp_path, monkeypatch):
    """The bundled model's adapter ships in the package: its new fit goes under the models home, naming the
    adapter's weights, and is read from there while those weights are installed (issue 17, item 7)."""
    import shutil

    from mlx_intent import calibration
    from mlx_intent.classifier import CALIBRATION, IntentClassifier
    from mlx_intent.cli.main import main
    from mlx_intent.models import registry

    shipped = Path(registry.__file__).resolve().parents[1] / "weights" / "adapters" / "smollm2-135m"
    packaged = tmp_path / "package-adapters"
    shutil.copytree(shipped, packaged / "smollm2-135m")
    monkeypatch.setattr(registry, "PACKAGED_ADAPTERS", packaged)
    before = {p.name: p.read_bytes() for p in (packaged / "smollm2-135m").iterdir()}
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "text": t, "primary_intent": p, "all_intents": a}) + "\n"
                            for i, (t, p, a) in enumerate(LABELLED)))
    args = ["calibrate", "smollm2-135m", "--data", str(data), "--batch-size", "6", "--force", "--no-verify"]
    args.append("--no-place")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in (packaged / "smollm2-135m").iterdir()} == before  # untouched
    home_fit = calibration.home_file("smollm2-135m", Path(models_home))
    written = json.loads(home_fit.read_text())
    assert written["n"] == 12 and written["weights"]
    model, tokenizer = bundled
    clf = IntentClassifier("smollm2-135m", model=model, tokenizer=tokenizer, home=Path(models_home))
    assert clf.calibration.path == home_fit and clf.temperature == written["temperature"]
    # other adapter weights: the home fit is stale, named, and the adapter's own calibration answers
    config = packaged / "smollm2-135m" / "adapter_config.json"
    config.write_text(config.read_text() + " ")
    clf = IntentClassifier("smollm2-135m", model=model, tokenizer=tokenizer, home=Path(models_home))
    assert clf.calibration.path == packaged / "smollm2-135m" / CALIBRATION
    assert any("other weights" in p for p in clf.calibration.problems)
    home_fit.unlink()
