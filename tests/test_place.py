"""Where an LLM goes in the default chain: measured by `mlx-intent calibrate MODEL` (first, cascade, blend), stored
beside its fits, read by the default chain; never measured, or a file that cannot be used, the cascade place."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server import WAIT_S, post, running, until

from mlx_intent import calibration, encoder
from mlx_intent.chain import (
    ENCODER,
    GENERAL,
    KEYWORD,
    Chain,
    blended_name,
    build_chain,
    default_chain_names,
    encoder_tier,
    general_tier,
    keyword_tier,
)
from mlx_intent.models.registry import FALLBACK, PRIMARY
from mlx_intent.schema import INTENTS
from mlx_intent.serve.app import create_app
from mlx_intent.settings import Settings, settings_home


def store(home, model: str, place: str, weight: float = 0.7, **extra) -> None:
    figures = {p: {"accuracy": 0.9} for p in calibration.PLACES}
    record = {"model": model, "place": place, "llm_weight": weight, "figures": figures, **extra}
    calibration.write(calibration.place_file(model, home), record)


def test_without_a_measured_place_no_llm_goes_first(tmp_path):
    assert default_chain_names(Settings(home=tmp_path)) == [ENCODER, PRIMARY, FALLBACK, KEYWORD, GENERAL]
    assert calibration.read_place(PRIMARY, tmp_path).why().startswith("cascade (not measured")


def test_the_default_chain_puts_each_llm_at_its_stored_place(tmp_path):
    store(tmp_path, PRIMARY, "first")
    store(tmp_path, FALLBACK, "blend")
    assert default_chain_names(Settings(home=tmp_path)) == [PRIMARY, blended_name(FALLBACK), KEYWORD, GENERAL]
    store(tmp_path, PRIMARY, "blend")
    names = default_chain_names(Settings(home=tmp_path))  # one LLM blends; the other goes to the cascade
    assert names == [blended_name(PRIMARY), FALLBACK, KEYWORD, GENERAL]


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"model": PRIMARY, "place": "sideways", "figures": {}}),
        json.dumps({"model": FALLBACK, "place": "first", "figures": {"first": {"accuracy": 0.9}}}),  # another's
        json.dumps({"model": PRIMARY, "place": "first", "llm_weight": -1, "figures": {"first": {"accuracy": 1}}}),
    ],
)
def test_a_corrupt_place_is_ignored_with_a_warning(tmp_path, text):
    path = calibration.place_file(PRIMARY, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.warns(RuntimeWarning, match="place"):
        place = calibration.read_place(PRIMARY, tmp_path)
    assert place.name == "cascade" and str(path) in place.source.problems[0]
    assert default_chain_names(Settings(home=tmp_path))[:2] == [ENCODER, PRIMARY]
    assert "IGNORED" in place.why()


def test_a_stored_blend_makes_the_encoder_blend_the_llm_in(tmp_path, models_home):
    store(tmp_path, FALLBACK, "blend", weight=0.7)
    chain = build_chain(Settings(home=tmp_path, cache_size=0))
    assert chain.names == (ENCODER, PRIMARY, KEYWORD, GENERAL)  # the 3B unmeasured: the cascade tier
    clf = chain.tiers[0].load()  # the LLM's load fails (not installed) without a word: its first use says so
    assert clf.llm_weight == 0.7 and clf.keyword is not None  # still the blend with the keyword tier
    texts = ["where can I eat fish near Galata?", "Taksim'e nasıl giderim?"]
    with pytest.warns(RuntimeWarning, match=f"without {FALLBACK}"):  # not installed, so the blend answers alone
        alone = chain.classify_batch(texts)
    assert clf.llm(texts) is None
    fake = np.full((len(texts), len(INTENTS)), 0.01)
    fake[:, INTENTS.index("weather")] = 1 - 0.01 * (len(INTENTS) - 1)
    clf.llm = lambda batch: fake[: len(batch)]
    mixed = chain.classify_batch(texts)
    expected = encoder.mix(clf.answer_distributions(texts)[0], fake, 0.7).max(axis=1)
    assert np.allclose([r["confidence"] for r in mixed], expected, atol=1e-4)
    assert [r["confidence"] for r in mixed] != [r["confidence"] for r in alone]
    assert {r["tier"] for r in mixed} == {ENCODER}


def test_the_cascade_encoder_is_the_blend_and_hands_down_only_what_it_is_unsure_of(tmp_path, models_home):
    chain = build_chain(Settings(home=tmp_path, cache_size=0, min_confidence=0.99))
    clf, llm = chain.tiers[0].load(), chain.tiers[1]
    assert clf.keyword is not None and chain.tiers[0].threshold == 0.99 and llm.name == PRIMARY
    results = chain.classify_batch(["where can I eat fish near Galata?", "hmm"])
    unsure = [r for r in results if r["tier"] != ENCODER]
    assert all(f["tier"] == ENCODER and f["kind"] == "low_confidence" for r in unsure for f in r["fallbacks"][:1])


def test_fit_llm_weight_ignores_noise_and_follows_a_sharp_llm():
    rng = np.random.default_rng(0)
    gold = list(rng.integers(0, len(INTENTS), 200))
    p = rng.dirichlet(np.ones(len(INTENTS)), 200)  # a blend that knows nothing
    sharp = np.full((200, len(INTENTS)), 0.02)
    sharp[np.arange(200), gold] = 1 - 0.02 * (len(INTENTS) - 1)
    assert encoder.fit_llm_weight(p, sharp, gold) > 1
    assert encoder.fit_llm_weight(p, rng.dirichlet(np.ones(len(INTENTS)), 200), gold) <= 0.2


def test_with_no_cascade_llm_on_disk_the_blend_keeps_every_text(tmp_path, models_home):
    chain = build_chain(Settings(home=tmp_path, cache_size=0))
    assert chain.names == (ENCODER, PRIMARY, FALLBACK, KEYWORD, GENERAL) and chain.tiers[0].threshold == 0.0


def test_config_and_models_list_say_which_place_is_in_force_and_why(tmp_path, clean_settings):
    from click.testing import CliRunner

    from mlx_intent.cli.main import main

    store(tmp_path, FALLBACK, "blend")
    for args in (["config"], ["models", "list"]):
        result = CliRunner().invoke(main, [*args, "--home", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert f"chain: {ENCODER}+{FALLBACK} -> {PRIMARY} -> {KEYWORD} -> {GENERAL} (the default)" in result.output
        assert f"{FALLBACK} place: blend (accuracy on the calibration split: first 90.0%" in result.output
        assert f"{PRIMARY} place: cascade (not measured, so never first)" in result.output


def test_a_pulled_llm_once_calibrated_goes_where_it_measured_best(standin_home, tmp_path, clean_settings):
    """The README's steps after `models pull`, with Llama 3.2 3B's stand-in: calibrate measures the three places
    through the chain (the blend's with the model in the pool), stores the best, and the default chain and
    `models list` follow it."""
    import shutil

    from click.testing import CliRunner

    from mlx_intent.cli.main import main

    home = tmp_path / "models"
    # the session's stand-in home stays uncalibrated for the other tests (the pulls themselves are in the Hub cache)
    shutil.copytree(standin_home, home) if standin_home.exists() else home.mkdir(parents=True)
    rows = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "calib.jsonl").read_text().splitlines()
    data = tmp_path / "calib-slice.jsonl"
    data.write_text("\n".join(rows[::47]) + "\n")  # 13 rows
    args = ["calibrate", PRIMARY, "--data", str(data), "--force", "--no-verify", "--home", str(home)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(calibration.place_file(PRIMARY, home).read_text())
    assert record["place"] in calibration.PLACES and set(record["figures"]) == set(calibration.PLACES)
    assert record["n"] == 13 and record["fitted_on"].endswith("calib-slice.jsonl")
    names = default_chain_names(Settings(home=home))
    where = {"first": 0, "cascade": 1}.get(record["place"])
    assert names.index(PRIMARY) == where if where is not None else names[0] == blended_name(PRIMARY)
    listed = CliRunner().invoke(main, ["models", "list", "--home", str(home)])
    assert f"{PRIMARY} place: {record['place']} (accuracy on the calibration split" in listed.output


def weather_llm(calls: list):
    """A stand-in LLM for the blend, sure of weather whatever it reads; ``calls`` hears each batch's size."""

    def distributions(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        rows = np.full((len(texts), len(INTENTS)), 0.001)
        rows[:, INTENTS.index("weather")] = 1 - 0.001 * (len(INTENTS) - 1)
        return rows

    return distributions


def test_the_blended_llms_load_counts_as_load_not_as_the_first_querys_time(models_home):
    """Issue 24, part 3: the blend tier's load loads its LLM too, so a slow LLM load never passes the first
    query over as a timeout (the encoder answers, blended)."""
    calls, loads = [], []
    tier = encoder_tier(
        0.0,
        200.0,
        combine=True,
        llm=weather_llm(calls),
        llm_weight=5.0,
        llm_load=lambda: (loads.append(1), time.sleep(0.5)),
        home=settings_home(),
    )
    chain = Chain([tier, keyword_tier(home=settings_home()), general_tier()], cache_size=0)
    result = chain.classify("where can I eat fish near Galata?")
    assert loads == [1] and calls and result["tier"] == ENCODER and result["fallbacks"] == []
    assert result["primary_intent"] == "weather"  # the LLM's say, weighted 5: it was blended in


def test_while_a_blended_llm_loads_the_encoder_answers_alone(models_home):
    """Issue 24, part 3, with the LLM in the blend place: the server's warm-up readies the encoder without the
    LLM; while the LLM loads, requests get the encoder's own answer (not the keyword tier's, nor a wait on the
    load); once loaded, the blend answers with it."""
    gate, calls = threading.Event(), []
    tier = encoder_tier(
        0.0,
        800.0,
        combine=True,
        llm=weather_llm(calls),
        llm_weight=5.0,
        llm_load=lambda: gate.wait(WAIT_S),
        home=settings_home(),
    )
    chain = Chain([tier, keyword_tier(home=settings_home()), general_tier()], cache_size=0)
    app = create_app(Settings(latency_budget_ms=800.0, cache_size=0, batch_size=8), chain, request_timeout_ms=600_000)
    text = {"text": "where can I eat fish near Galata?"}
    try:
        with running(app) as (base, _):
            until(lambda: post(base, "/v1/classify", text).json()["tier"] == ENCODER, "the encoder answers alone")
            during = post(base, "/v1/classify", text).json()
            assert httpx.get(f"{base}/healthz").status_code == 503  # the LLM is still loading
            gate.set()
            until(lambda: httpx.get(f"{base}/healthz").status_code == 200, "warm")
            after = post(base, "/v1/classify", text).json()
    finally:
        gate.set()
    assert (
        during["tier"] == ENCODER and during["primary_intent"] == "restaurant" and during["runtime_fallback"] is False
    )
    assert after["tier"] == ENCODER and after["primary_intent"] == "weather" and calls
