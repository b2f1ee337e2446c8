"""The fallback chain: every pass-over reason ends in an answer from a lower tier, never an exception.

Fake tiers cover the reasons one by one; the bundled model covers them through ModelPool and build_chain
(not downloaded, does not fit, corrupt weights, a raising loader, a raising classify_batch, low confidence).
Also: chain order from settings, LLM_MODEL / LLM_FALLBACK_MODEL, the LRU of loaded models, the query cache,
metrics, the log, and the peak memory a loaded model leaves in its stamp for ``mlx-intent models list``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from mlx_intent import chain as chain_module
from mlx_intent.chain import (
    ENCODER,
    GENERAL,
    GENERAL_CONFIDENCE,
    KEYWORD,
    Chain,
    Kind,
    ModelPool,
    Tier,
    build_chain,
    default_chain_names,
    encoder_tier,
    keyword_tier,
    llm_tier,
)
from mlx_intent.cli.main import main
from mlx_intent.cli.models import human_size
from mlx_intent.metrics import ClassificationLog, read_log
from mlx_intent.models import loading, registry
from mlx_intent.models.registry import BUNDLED, FALLBACK, GB, PRIMARY
from mlx_intent.results import PassOver, Reason
from mlx_intent.settings import ENV_VARS, Settings, load_settings, settings_home

ANSWER_KEYS = {"primary_intent", "confidence", "all_intents"}
RESULT_KEYS = ANSWER_KEYS | {"tier", "model", "fallbacks", "cached", "latency_ms", "lang"}
FISH = "Where can I eat fish in Kadıköy?"
MB = 1024 * 1024


def answer(intent: str = "restaurant", confidence: float = 0.9) -> dict:
    return {"primary_intent": intent, "confidence": confidence, "all_intents": [intent]}


def const_tier(name: str = "backup", intent: str = "restaurant", confidence: float = 0.9, **kw) -> Tier:
    """A tier that always gives the same answer and counts the texts it was asked (``tier.asked``)."""
    asked: list[str] = []

    def run(texts: list[str]) -> list[dict]:
        asked.extend(texts)
        return [answer(intent, confidence) for _ in texts]

    tier = Tier(name, run, model=f"{name}-model", kind=Kind.LLM, **kw)
    tier.asked = asked  # type: ignore[attr-defined]
    return tier


def rain_tier(name: str = "picky") -> Tier:
    """Sure about rain (weather, 0.9), unsure about anything else (0.2), against a 0.5 threshold."""
    return Tier(name, lambda texts: [answer("weather", 0.9 if "rain" in t else 0.2) for t in texts], threshold=0.5)


def raise_(exc: BaseException):
    raise exc


def sleep_then(seconds: float, result: list[dict]) -> list[dict]:
    time.sleep(seconds)
    return result


# (tier that fails, start of the reason it must record)
FAULTS = {
    "inference raises": (Tier("faulty", lambda t: raise_(RuntimeError("boom"))), "error: RuntimeError: boom"),
    "over budget": (Tier("faulty", lambda t: sleep_then(0.2, [answer()]), budget_ms=50), "timeout: "),
    "low confidence": (const_tier("faulty", confidence=0.3, threshold=0.5), "low confidence: 0.30 < 0.50"),
    "unknown intent": (const_tier("faulty", intent="pizza"), "invalid answer: unknown primary_intent 'pizza'"),
    "confidence out of range": (const_tier("faulty", confidence=1.5), "invalid answer: confidence 1.5 outside"),
    "missing keys": (
        Tier("faulty", lambda t: [{"primary_intent": "weather"}]),
        "invalid answer: missing keys: ['confidence'",
    ),
    "too few answers": (Tier("faulty", lambda t: []), "invalid answer: 0 answers for 1 texts"),
    "not a list": (Tier("faulty", lambda t: None), "error: TypeError"),
    "load passes over": (
        Tier("faulty", lambda t: [answer()], lambda: raise_(PassOver(Reason.NOT_INSTALLED, "not here"))),
        "not here",
    ),
    "load raises": (Tier("faulty", lambda t: [answer()], lambda: raise_(OSError("disk"))), "error: OSError: disk"),
}

FAULT_KINDS = {
    "inference raises": Reason.ERROR,
    "over budget": Reason.TIMEOUT,
    "low confidence": Reason.LOW_CONFIDENCE,
    "unknown intent": Reason.INVALID,
    "confidence out of range": Reason.INVALID,
    "missing keys": Reason.INVALID,
    "too few answers": Reason.INVALID,
    "not a list": Reason.ERROR,
    "load passes over": Reason.NOT_INSTALLED,
    "load raises": Reason.ERROR,
}


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The chain module's monotonic clock, set by hand: ``clock[0] += 61`` passes a 60 s back-off."""
    now = [1000.0]
    monkeypatch.setattr(chain_module, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))
    return now


# ---- pass-over reasons, fake tiers ----------------------------------------------------------------


def test_first_tier_that_answers_wins():
    first, second = const_tier("first", "weather"), const_tier("second")
    result = Chain([first, second]).classify("Will it rain tomorrow?")
    assert set(result) >= RESULT_KEYS
    assert (result["primary_intent"], result["tier"], result["model"]) == ("weather", "first", "first-model")
    assert result["fallbacks"] == [] and result["cached"] is False and result["lang"] == "en"
    assert isinstance(result["latency_ms"], float)
    assert second.asked == []


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_each_fault_falls_to_the_next_tier(fault):
    faulty, reason = FAULTS[fault]
    backup = const_tier("backup", "shopping")
    result = Chain([faulty, backup]).classify("Where is the Grand Bazaar?")
    assert set(result) >= RESULT_KEYS
    assert (result["tier"], result["model"], result["primary_intent"]) == ("backup", "backup-model", "shopping")
    assert len(result["fallbacks"]) == 1
    assert result["fallbacks"][0]["tier"] == "faulty"
    assert result["fallbacks"][0]["reason"].startswith(reason), result["fallbacks"][0]["reason"]
    assert result["fallbacks"][0]["kind"] == FAULT_KINDS[fault].value


def test_every_tier_failing_ends_in_general():
    tiers = [tier for tier, _ in FAULTS.values()]
    tiers = [dataclasses.replace(t, name=f"t{i}") for i, t in enumerate(tiers)]
    result = Chain(tiers).classify("Merhaba, nasılsın?")
    assert (result["tier"], result["primary_intent"], result["confidence"]) == (GENERAL, "general", GENERAL_CONFIDENCE)
    assert [f["tier"] for f in result["fallbacks"]] == [t.name for t in tiers]
    assert result["lang"] == "tr"


def test_chain_always_ends_with_general():
    assert Chain([const_tier("a")]).names == ("a", GENERAL)
    assert Chain([]).names == (GENERAL,)


def test_confidence_at_the_threshold_is_enough():
    result = Chain([const_tier("first", confidence=0.5, threshold=0.5)]).classify("a table for two")
    assert result["tier"] == "first"


def test_a_batch_moves_on_only_the_texts_a_tier_passed_over():
    backup = const_tier("backup", "events")
    results = Chain([rain_tier(), backup]).classify_batch(["rain today?", "concerts?", "rain?"])
    assert [r["tier"] for r in results] == ["picky", "backup", "picky"]
    assert backup.asked == ["concerts?"]
    assert [len(r["fallbacks"]) for r in results] == [0, 1, 0]


# ---- query cache ----------------------------------------------------------------------------------


def test_cache_hits_the_same_text_only():
    """Not a folded one: "kadikoy" may read otherwise to a tier than "Kadıköy?" (see test_faults_core.py)."""
    tier = const_tier("first")
    chain = Chain([tier])
    miss = chain.classify("Kadıköy?")
    hit = chain.classify("Kadıköy?")
    chain.classify("kadikoy")
    assert tier.asked == ["Kadıköy?", "kadikoy"]
    assert (miss["cached"], hit["cached"]) == (False, True)
    assert {k: hit[k] for k in RESULT_KEYS - {"cached", "latency_ms"}} == {
        k: miss[k] for k in RESULT_KEYS - {"cached", "latency_ms"}
    }
    assert chain.cache_hits == 1
    assert chain.metrics.snapshot()["cache"]["hits"] == 1


def test_cache_is_lru_and_bounded():
    tier = const_tier("first")
    chain = Chain([tier], cache_size=2)
    for text in ("a", "b", "a", "c", "b", "a"):  # "c" evicts "b" (least recent); "b" then evicts "a"
        chain.classify(text)
    assert tier.asked == ["a", "b", "c", "b", "a"]
    assert len(chain.cache) == 2 and chain.cache_hits == 1


def test_cache_size_zero_disables_the_cache():
    tier = const_tier("first")
    chain = Chain([tier], cache_size=0)
    results = [chain.classify("metro to Taksim") for _ in range(3)]
    assert len(tier.asked) == 3 and not chain.cache and chain.cache_hits == 0
    assert [r["cached"] for r in results] == [False] * 3


def test_answers_given_because_of_a_fault_are_not_cached():
    calls = []

    def flaky(texts: list[str]) -> list[dict]:
        calls.append(texts)
        if len(calls) == 1:
            raise RuntimeError("transient")
        return [answer("weather") for _ in texts]

    chain = Chain([Tier("flaky", flaky), const_tier("backup")])
    assert chain.classify("rain?")["tier"] == "backup"
    second = chain.classify("rain?")
    assert (second["tier"], second["cached"]) == ("flaky", False)
    assert chain.classify("rain?")["cached"] is True


@pytest.mark.parametrize(
    ("kind", "words", "cached"),
    [
        (Reason.TIMEOUT, "slow today", False),  # transient, whatever the words say
        (Reason.LOAD_FAILED, "weights damaged", False),
        (Reason.NOT_INSTALLED, "error: words that look transient", True),  # will not change: cached
        (Reason.LOW_CONFIDENCE, "timeout: words that look transient", True),
    ],
)
def test_caching_decides_on_the_reason_kind_not_its_words(kind, words, cached):
    chain = Chain([Tier("declines", lambda texts: raise_(PassOver(kind, words))), const_tier("backup")])
    first = chain.classify("rain?")
    assert first["fallbacks"] == [{"tier": "declines", "reason": words, "kind": kind.value}]
    assert chain.classify("rain?")["cached"] is cached


def test_answers_after_low_confidence_are_cached():
    backup = const_tier("backup")
    chain = Chain([const_tier("first", confidence=0.1, threshold=0.5), backup])
    chain.classify("rain?")
    hit = chain.classify("rain?")
    assert (hit["tier"], hit["cached"], backup.asked) == ("backup", True, ["rain?"])
    assert hit["fallbacks"][0]["reason"].startswith("low confidence")


# ---- metrics and log ------------------------------------------------------------------------------


def test_metrics_count_by_tier_and_intent():
    chain = Chain([rain_tier("first"), const_tier("backup", "events")])
    chain.classify_batch(["rain?", "concerts?", "rain tomorrow?"])
    chain.classify("rain?")  # a cache hit is counted too
    snap = chain.metrics.snapshot()
    assert snap["count"] == 4
    assert snap["by_tier"] == {"first": 3, "backup": 1}
    assert snap["by_intent"] == {"weather": 3, "events": 1}
    assert snap["by_tier_intent"] == {"first": {"weather": 3}, "backup": {"events": 1}}
    assert snap["fallback"]["count"] == 1 and snap["cache"]["hits"] == 1


def test_log_gets_one_line_per_classification(tmp_path):
    path = tmp_path / "chain.log"
    with ClassificationLog(path) as log:
        chain = Chain([const_tier("first")], log=log)
        chain.classify_batch(["Kadıköy fish", "kadikoy fish?"])  # one batch: neither is cached yet
        chain.classify("Kadıköy fish")
    records = read_log(path)
    assert [r["text"] for r in records] == ["Kadıköy fish", "kadikoy fish?", "Kadıköy fish"]
    assert [r["cached"] for r in records] == [False, False, True]
    assert all(set(r) >= RESULT_KEYS | {"ts"} for r in records)


# ---- settings: chain order, LLM_MODEL, LLM_FALLBACK_MODEL ----------------------------------------------


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No setting from the process environment or a stray ./.env."""
    for variable in ENV_VARS.values():
        if variable != "MLX_INTENT_HOME":
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


def test_default_chain_names(no_env):
    """No LLM has a measured place here, so each is a cascade tier after the encoder's blend (issue 24, part 5)."""
    assert default_chain_names(load_settings(environ={})) == [ENCODER, PRIMARY, FALLBACK, KEYWORD, GENERAL]
    settings = load_settings(environ={"LLM_MODEL": "tinyllama", "LLM_FALLBACK_MODEL": "llama-3.1-8b"})
    assert default_chain_names(settings) == [ENCODER, "tinyllama", "llama-3.1-8b", KEYWORD, GENERAL]
    settings = load_settings(environ={"LLM_MODEL": BUNDLED, "LLM_FALLBACK_MODEL": PRIMARY})
    assert default_chain_names(settings) == [ENCODER, BUNDLED, PRIMARY, KEYWORD, GENERAL]
    settings = load_settings(environ={"LLM_MODEL": FALLBACK})  # a repeated tier is listed once, first place
    assert default_chain_names(settings) == [ENCODER, FALLBACK, KEYWORD, GENERAL]


def test_chain_setting_and_flag_set_the_order(no_env, models_home):
    settings = load_settings(environ={"MLX_INTENT_CHAIN": f"{KEYWORD},{BUNDLED}"})
    chain = build_chain(settings)
    assert chain.names == (KEYWORD, BUNDLED, GENERAL)
    result = chain.classify(FISH)
    assert (result["tier"], result["fallbacks"]) == (KEYWORD, [])
    assert not chain.pool.loaded  # the model after the keyword tier was never needed
    assert build_chain(settings, names=[BUNDLED, KEYWORD]).names == (BUNDLED, KEYWORD, GENERAL)  # --chain wins
    assert build_chain(load_settings(environ={"LLM_MODEL": "tinyllama"})).names[:2] == (ENCODER, "tinyllama")


def test_unknown_tier_fails_when_the_chain_is_built():
    with pytest.raises(registry.UnknownModelError):
        build_chain(Settings(chain=("gpt-9", KEYWORD)))


# ---- ModelPool: not downloaded, does not fit, load failures and back-off, LRU ----------------------------


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Names passed to loading.load, which still runs."""
    calls: list[str] = []
    real = loading.load

    def counting(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load", counting)
    return calls


def test_model_not_downloaded_names_the_pull_command(models_home, loads):
    result = build_chain(Settings(chain=(FALLBACK, KEYWORD))).classify(FISH)
    assert result["tier"] == KEYWORD
    assert result["fallbacks"] == [
        {
            "tier": FALLBACK,
            "reason": "not downloaded (get it with: mlx-intent models pull tinyllama)",
            "kind": "not_installed",
        }
    ]
    assert loads == []


def test_model_that_does_not_fit_is_not_loaded(models_home, loads):
    chain = build_chain(Settings(chain=(BUNDLED, KEYWORD)), memory=100 * MB)
    result = chain.classify(FISH)
    assert result["tier"] == KEYWORD
    # measured once converted by an earlier test, else the registry's estimate
    need = loading.budget(BUNDLED, home=settings_home())
    assert result["fallbacks"] == [
        {
            "tier": BUNDLED,
            "reason": f"does not fit in memory (needs {need.bytes / GB:.1f} GB: {need.source})",
            "kind": "too_large",
        }
    ]
    with pytest.raises(PassOver, match="does not fit"):
        ModelPool(memory=GB // 2, home=settings_home()).get(BUNDLED)
    assert loads == []


class FakeClassifier:
    """Stands in for IntentClassifier in the pool: ``made`` lists every construction."""

    made: list[str] = []
    fail: list[BaseException] = []  # raised, in order, by the next constructions
    confidence = 0.9

    def __init__(self, name: str, mode: str = "score", home=None, sample=False):
        FakeClassifier.made.append(name)
        if FakeClassifier.fail:
            raise FakeClassifier.fail.pop(0)
        self.name = name

    def classify_batch(self, texts: list[str]) -> list[dict]:
        return [answer("attraction", FakeClassifier.confidence) for _ in texts]


@pytest.fixture
def fake_models(monkeypatch, models_home) -> type[FakeClassifier]:
    """Every registry model is on disk and fits; loading one builds a FakeClassifier."""
    monkeypatch.setattr(FakeClassifier, "made", [])
    monkeypatch.setattr(FakeClassifier, "fail", [])
    monkeypatch.setattr("mlx_intent.classifier.IntentClassifier", FakeClassifier)
    monkeypatch.setattr(loading, "is_available", lambda name, home=None: True)
    monkeypatch.setattr(loading, "fits", lambda name, memory=None, home=None: True)
    return FakeClassifier


def test_failed_load_backs_off_then_retries(fake_models, clock):
    fake_models.fail = [MemoryError("no room"), MemoryError("no room")]
    pool = ModelPool(retry_after_s=60, home=settings_home())
    chain = Chain([llm_tier(PRIMARY, pool, 0.0, None), const_tier("backup")], pool=pool)

    first = chain.classify("Blue Mosque hours?")
    assert first["tier"] == "backup"
    assert first["fallbacks"] == [
        {"tier": PRIMARY, "reason": "load failed: MemoryError: no room", "kind": "load_failed"}
    ]
    clock[0] += 59
    second = chain.classify("Topkapı tickets?")
    assert second["fallbacks"][0]["reason"] == "load failed, backing off for 60s (MemoryError: no room)"
    assert fake_models.made == [PRIMARY]  # not retried within retry_after_s
    clock[0] += 2
    assert chain.classify("Galata Tower?")["tier"] == "backup"
    assert fake_models.made == [PRIMARY, PRIMARY]  # retried after the back-off, failed again
    clock[0] += 61
    recovered = chain.classify("Basilica Cistern?")
    assert (recovered["tier"], recovered["model"], recovered["fallbacks"]) == (PRIMARY, PRIMARY, [])
    assert fake_models.made == [PRIMARY] * 3 and not pool.failed


def test_no_back_off_retries_every_query(fake_models):
    fake_models.fail = [RuntimeError("bad")] * 3
    chain = build_chain(Settings(chain=(PRIMARY, KEYWORD), retry_after_s=0))
    for text in ("a museum", "a mosque", "a palace"):
        assert chain.classify(text)["tier"] == KEYWORD
    assert fake_models.made == [PRIMARY] * 3


def test_at_most_max_loaded_models_stay_loaded(fake_models):
    pool = ModelPool(max_loaded=2, home=settings_home())
    for name in (PRIMARY, FALLBACK, PRIMARY, "llama-3.1-8b"):  # the third load evicts the least recent
        pool.get(name)
    assert list(pool.loaded) == [PRIMARY, "llama-3.1-8b"]
    pool.get(FALLBACK)
    assert list(pool.loaded) == ["llama-3.1-8b", FALLBACK]
    assert fake_models.made == [PRIMARY, FALLBACK, "llama-3.1-8b", FALLBACK]


def test_chain_keeps_max_loaded_models(fake_models):
    fake_models.confidence = 0.3  # every model passes over on low confidence, so each one is loaded
    chain = build_chain(Settings(chain=(PRIMARY, FALLBACK, KEYWORD), max_loaded_models=1))
    for text in ("a museum", "a mosque"):
        result = chain.classify(text)
        assert result["tier"] == KEYWORD and len(chain.pool.loaded) == 1
    assert fake_models.made == [PRIMARY, FALLBACK] * 2


def test_a_raising_classify_batch_falls_to_the_next_tier(fake_models, monkeypatch):
    monkeypatch.setattr(FakeClassifier, "classify_batch", lambda self, texts: raise_(ValueError("nan logits")))
    result = build_chain(Settings(chain=(PRIMARY, KEYWORD))).classify(FISH)
    assert result["tier"] == KEYWORD
    assert result["fallbacks"] == [{"tier": PRIMARY, "reason": "error: ValueError: nan logits", "kind": "error"}]


# ---- the bundled model through build_chain ------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(models_home):
    """A chain whose first tier is the bundled model, loaded once through its pool, and its first answer."""
    chain = build_chain(Settings(chain=(BUNDLED, KEYWORD), min_confidence=0.0, latency_budget_ms=600_000))
    return chain, chain.classify(FISH)


def test_bundled_model_answers_through_the_pool(smol):
    chain, first = smol
    assert set(first) >= RESULT_KEYS
    assert (first["tier"], first["model"], first["fallbacks"]) == (BUNDLED, BUNDLED, [])
    assert list(chain.pool.loaded) == [BUNDLED]


def test_peak_memory_is_stamped_and_listed(smol):
    chain, _ = smol
    path = registry.resolve_dir(BUNDLED, home=settings_home())
    peak = registry.read_stamp(path, home=settings_home()).get("peak_memory")
    assert isinstance(peak, int) and peak > 0
    assert not chain.pool.unstamped  # written once, after the first run
    out = CliRunner().invoke(main, ["models", "list"]).output
    row = next(line for line in out.splitlines() if f" {BUNDLED} " in line)
    assert f"  {human_size(peak)}  " in row


def test_bundled_model_below_the_threshold_falls_to_keyword(smol):
    chain, _ = smol
    strict = Chain([llm_tier(BUNDLED, chain.pool, 1.0, None), keyword_tier(home=settings_home())], pool=chain.pool)
    result = strict.classify("Is the Hagia Sophia open on Mondays?")
    assert result["tier"] == KEYWORD
    (fallback,) = result["fallbacks"]
    assert fallback["tier"] == BUNDLED
    assert fallback["reason"].startswith("low confidence: ") and fallback["reason"].endswith(" < 1.00")


def test_bundled_classify_batch_raising_falls_to_keyword(smol, monkeypatch):
    chain, _ = smol
    oom = lambda texts, **kw: raise_(RuntimeError("Metal OOM"))  # noqa: E731
    monkeypatch.setattr(chain.pool.loaded[BUNDLED], "classify_batch", oom)
    result = Chain(chain.tiers, cache_size=0, pool=chain.pool).classify("ferry to Üsküdar")
    assert result["tier"] == KEYWORD
    assert result["fallbacks"] == [{"tier": BUNDLED, "reason": "error: RuntimeError: Metal OOM", "kind": "error"}]


def corrupt_home(tmp_path: Path, how: str) -> Path:
    """A models folder holding a damaged copy of the converted bundled model."""
    good, bad = registry.resolve_dir(BUNDLED, home=settings_home()), tmp_path / BUNDLED
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(good / name, bad / name)
    weights = (good / "model.safetensors").read_bytes()
    if how == "truncated weights":
        (bad / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    else:  # a torn config.json (a deleted one would only make the bundled GGUF convert again)
        (bad / "model.safetensors").write_bytes(weights)
        (bad / "config.json").write_text('{"model_type": "llama", ')
    return tmp_path


@pytest.mark.parametrize("how", ["truncated weights", "torn config.json"])
def test_corrupt_bundled_model_is_passed_over_and_not_retried(smol, how, tmp_path, monkeypatch, loads, clock):
    monkeypatch.setenv("MLX_INTENT_HOME", str(corrupt_home(tmp_path, how)))
    chain = build_chain(Settings(chain=(BUNDLED, KEYWORD), retry_after_s=60))
    first = chain.classify(FISH)
    assert first["tier"] == KEYWORD
    assert first["fallbacks"][0]["tier"] == BUNDLED
    assert first["fallbacks"][0]["reason"].startswith("load failed: ")
    second = chain.classify("How do I get to Sabiha Gökçen?")
    assert "backing off" in second["fallbacks"][0]["reason"]
    assert loads == [BUNDLED]
    clock[0] += 60
    assert chain.classify("Is it cold in January?")["fallbacks"][0]["reason"].startswith("load failed: ")
    assert loads == [BUNDLED, BUNDLED]


def test_a_model_before_the_keyword_tier_must_beat_its_calibrated_accuracy(tmp_path, monkeypatch):
    """Calibrated confidences compare: a model tier answers over the keyword tier only at or above the
    keyword tier's accuracy from its calibration; after it, or with the floor off, min_confidence rules."""
    from mlx_intent import keyword

    fit = tmp_path / "calibration.json"
    fit.write_text(json.dumps({"platt": [1.0, 0.0], "accuracy": 0.93}))
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", fit)
    thresholds = lambda chain: {t.name: t.threshold for t in chain.tiers if t.model}  # noqa: E731
    settings = Settings(chain=(BUNDLED, KEYWORD), min_confidence=0.5)
    assert thresholds(build_chain(settings)) == {BUNDLED: 0.93}
    assert thresholds(build_chain(dataclasses.replace(settings, min_confidence=0.97))) == {BUNDLED: 0.97}
    assert thresholds(build_chain(dataclasses.replace(settings, keyword_floor=False))) == {BUNDLED: 0.5}
    assert thresholds(build_chain(dataclasses.replace(settings, chain=(KEYWORD, BUNDLED)))) == {BUNDLED: 0.5}
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", tmp_path / "absent.json")
    assert thresholds(build_chain(settings)) == {BUNDLED: 0.5}


def test_model_loading_is_not_counted_in_latency(monkeypatch):
    """A tier's load() (a model read from disk once) is left out of latency_ms, whether it loads or fails."""
    now = [0.0]
    monkeypatch.setattr(chain_module, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=lambda: now[0]))

    def load(seconds: float, fail: bool = False):
        def run():
            now[0] += seconds
            if fail:
                raise PassOver(Reason.LOAD_FAILED, "broken")

        return run

    def slow_answer(texts):
        now[0] += 0.25
        return [answer("weather") for _ in texts]

    broken = Tier("broken", lambda t: [answer()], load(7.0, fail=True))
    model = Tier("model", slow_answer, load(30.0), model="m", kind=Kind.LLM)
    result = Chain([broken, model]).classify("rain?")
    assert result["tier"] == "model"
    assert result["latency_ms"] == pytest.approx(250.0)


def test_latency_per_query_is_the_calls_time_over_its_texts(monkeypatch):
    """A slow tier answers a batch of 8 in one call of 800 ms: each query's share is 100 ms, labelled apart
    from the call's 800 ms; a call of one text is its own query."""
    now = [0.0]
    monkeypatch.setattr(chain_module, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=lambda: now[0]))

    def slow(texts):
        now[0] += 0.8
        return [answer("weather") for _ in texts]

    chain = Chain([Tier("slow", slow, model="m", kind=Kind.LLM)], cache_size=0)
    results = chain.classify_batch([f"rain {i}?" for i in range(8)])
    for result in results:
        assert result["latency_ms"] == pytest.approx(800.0)
        assert result["latency_per_query_ms"] == pytest.approx(800.0 / 8)
        assert result["batch_texts"] == 8
    single = chain.classify("rain?")
    assert single["latency_ms"] == pytest.approx(800.0) and single["latency_per_query_ms"] == pytest.approx(800.0)
    snap = chain.metrics.snapshot()
    assert snap["latency_ms"]["per"] == "query"
    assert snap["latency_ms"]["p50"] == pytest.approx(100.0) and snap["latency_ms"]["max"] == pytest.approx(800.0)
    assert snap["latency_per_call_ms"]["p50"] == pytest.approx(800.0)
    assert snap["batch_texts"] == {"mean": pytest.approx(65 / 9), "max": 8}


def test_absent_tiers_are_not_runtime_fallbacks(models_home):
    """A tier not downloaded here is a configuration fact: listed once, apart; only tiers passed over while
    running (here one unsure) count as fallbacks."""
    unsure = const_tier("unsure", confidence=0.2, threshold=0.5)
    chain = Chain([llm_tier(FALLBACK, ModelPool(home=settings_home()), 0.5, 1e9), unsure, const_tier()], cache_size=0)
    first = chain.classify("fish?")
    assert [f["kind"] for f in first["fallbacks"]] == ["not_installed", "low_confidence"]
    assert first["runtime_fallback"] is True
    absent_only = Chain([llm_tier(FALLBACK, ModelPool(home=settings_home()), 0.5, 1e9), const_tier()], cache_size=0)
    absent_only.metrics = chain.metrics
    second = absent_only.classify_batch(["fish?", "more fish?"])
    assert all(r["runtime_fallback"] is False and r["fallbacks"][0]["kind"] == "not_installed" for r in second)
    fb = chain.metrics.snapshot()["fallback"]
    assert fb["count"] == 1 and fb["rate"] == pytest.approx(1 / 3)
    assert fb["reasons"] == {"unsure: low confidence: 0.20 < 0.50": 1}
    assert fb["absent_tiers"] == {
        FALLBACK: {
            "kind": "not_installed",
            "reason": "not downloaded (get it with: mlx-intent models pull tinyllama)",
            "count": 3,
        }
    }
    assert fb["passed_over"] == {"count": 3, "rate": 1.0}


def opinion(primary: str, extra: list[str]):
    """A stand-in keyword tier that reads every text as ``primary`` plus ``extra``."""
    reading = {"primary_intent": primary, "confidence": 0.5, "all_intents": [primary, *extra]}
    return lambda texts: [dict(reading) for _ in texts]


def test_the_keyword_tier_adds_further_intents_where_it_names_the_models_primary():
    """A model answer gains the keyword tier's other intents when the keyword tier names the model's
    primary anywhere in its list; a failing second opinion leaves the model's answer as it was."""
    model = const_tier("model", "restaurant")

    agree = Chain([model], secondaries=opinion("restaurant", ["nearby_locations", "greeting", "weather"]))
    assert agree.classify("hi, food near me?")["all_intents"] == ["restaurant", "nearby_locations", "greeting"]
    second = Chain([model], secondaries=opinion("events", ["restaurant"]))  # the model's primary is kept
    result = second.classify("a concert, and dinner before?")
    assert (result["primary_intent"], result["all_intents"]) == ("restaurant", ["restaurant", "events"])
    differ = Chain([model], secondaries=opinion("shopping", ["nearby_locations"]))
    assert differ.classify("food near me?")["all_intents"] == ["restaurant"]
    broken = Chain([model], secondaries=lambda texts: raise_(RuntimeError("lexicon gone")))
    assert broken.classify("food near me?")["all_intents"] == ["restaurant"]
    words = dataclasses.replace(const_tier("words", "restaurant"), kind=Kind.RULE)  # loads no model: never extended
    keyword_only = Chain([words, model], secondaries=opinion("restaurant", ["weather"]))
    assert keyword_only.classify("food?")["all_intents"] == ["restaurant"]


@pytest.mark.parametrize(
    ("keyword", "tier"),
    [
        (("weather", ["greeting"]), "backup"),  # social words and a request: the request decides
        (("greeting", []), "model"),  # the keyword tier reads social talk too
        (("general", ["greeting"]), "model"),  # social words, no request the keyword tier knows
        (("weather", []), "model"),  # no social words seen: nothing to say about rule 1
    ],
)
def test_a_model_calling_a_request_social_talk_is_passed_over(keyword, tier):
    model, backup = const_tier("model", "greeting"), const_tier("backup", "weather")
    chain = Chain([model, backup], secondaries=opinion(*keyword))
    result = chain.classify("merhaba, yarın yağmur yağacak mı?")
    assert result["tier"] == tier
    if tier == "backup":
        reason = "rule 1: social words with a request (weather, keyword tier)"
        assert result["fallbacks"] == [{"tier": "model", "reason": reason, "kind": "rule1"}]
        assert backup.asked == ["merhaba, yarın yağmur yağacak mı?"]
    else:
        assert result["fallbacks"] == [] and result["primary_intent"] == "greeting"


def test_build_chain_asks_the_keyword_tier_for_secondaries():
    assert build_chain(Settings(chain=(BUNDLED, KEYWORD))).secondaries is not None
    assert build_chain(Settings(chain=(BUNDLED,))).secondaries is None


def test_the_encoders_first_run_counts_as_its_load_not_a_query(monkeypatch):
    """Issue 24, part 3: on a fresh machine MLX compiles its kernels on a model's first run (5.6 s for e5-small on
    a first `classify`), which passed the encoder over as a timeout; the tier now runs once as it loads."""
    from mlx_intent import encoder

    now = [0.0]
    monkeypatch.setattr(chain_module, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=lambda: now[0]))

    class FirstRunSlow:
        runs = 0

        def __init__(self, **kwargs):
            pass

        def classify_batch(self, texts, with_llm=True):
            now[0] += 5.6 if FirstRunSlow.runs == 0 else 0.01
            FirstRunSlow.runs += 1
            return [answer("restaurant") for _ in texts]

    monkeypatch.setattr(encoder, "EncoderClassifier", FirstRunSlow)
    monkeypatch.setattr(encoder, "available", lambda home=None: None)
    tier = encoder_tier(threshold=0.0, budget_ms=800.0, home=settings_home())
    result = Chain([tier, keyword_tier(home=settings_home())]).classify("Where can I eat fish near Galata?")
    assert result["tier"] == "e5-small" and result["fallbacks"] == []
    assert result["latency_ms"] == pytest.approx(10.0)


def test_each_tier_says_its_kind_and_model_tiers_share_one_call():
    """The chain, server and evaluation ask ``Tier.kind``; both model classifiers take ``classify_batch(texts,
    contexts=)`` (``chain.Classifier``), so a tier hands either one the same way."""
    import inspect

    from mlx_intent.classifier import IntentClassifier
    from mlx_intent.encoder import EncoderClassifier
    from mlx_intent.settings import Settings

    chain = build_chain(Settings(chain=("smollm2-135m", "e5-small", "keyword", "general")))
    assert [t.kind for t in chain.tiers] == [Kind.LLM, Kind.ENCODER, Kind.KEYWORD, Kind.GENERAL]
    assert [t.loads_model for t in chain.tiers] == [True, True, False, False]
    with pytest.raises(TypeError, match="keyword"):
        chain.tiers[2].classifier()
    for cls in (IntentClassifier, EncoderClassifier):
        contexts = inspect.signature(cls.classify_batch).parameters["contexts"]
        assert contexts.default is None and contexts.kind is not inspect.Parameter.POSITIONAL_ONLY


def test_build_chain_returns_a_finished_chain(tmp_path):
    """What callers once set afterwards (the store, sampling, recording, the mode, the server's load hook) is
    given to build_chain; the pool adopts a model loaded already instead of being written into."""
    from mlx_intent.feedback.store import open_store
    from mlx_intent.settings import Settings

    wrapped = []

    def wrap(load):
        wrapped.append(load)
        return load

    store = open_store(tmp_path)
    settings = Settings(chain=("smollm2-135m", "e5-small", "keyword"))
    chain = build_chain(settings, store=store, sample=True, recording=False, mode="generate", wrap_load=wrap)
    assert chain.store is store and not chain.recording and chain.users is not None
    assert (chain.pool.sample, chain.pool.mode) == (True, "generate")
    assert len(wrapped) == 2  # the two model tiers' loads, not the keyword's
    sentinel = object()
    chain.pool.adopt("smollm2-135m", sentinel)
    assert chain.pool.get("smollm2-135m") is sentinel


def counting(monkeypatch, owner, name: str, calls: collections.Counter) -> None:
    """Count the calls of ``owner.name`` in ``calls[name]``, calling through."""
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def test_an_llm_query_is_tokenized_validated_and_written_once(smol, monkeypatch):
    """Each query's work once: tokenized once (query_ids), validated once (by the chain), its JSON never
    written out and parsed back (no json.loads in the classifier); the keyword tier read once (second opinion)."""
    import mlx_intent.chain as chain_module
    import mlx_intent.classifier as classifier_module
    from mlx_intent.keyword import KeywordClassifier

    chain, _ = smol
    calls: collections.Counter = collections.Counter()
    counting(monkeypatch, classifier_module.IntentClassifier, "query_ids", calls)
    counting(monkeypatch, KeywordClassifier, "classify", calls)
    counting(monkeypatch, chain_module, "validate", calls)
    counting(monkeypatch, classifier_module.json, "loads", calls)
    texts = ["ferry to Kadıköy?", "is it going to rain tomorrow", "best baklava near Karaköy"]
    results = Chain(chain.tiers, cache_size=0, pool=chain.pool, secondaries=chain.secondaries).classify_batch(texts)
    assert [r["tier"] for r in results] == [BUNDLED] * 3
    assert calls == {"query_ids": 3, "classify": 3, "validate": 3}
    for mode in ("score", "generate"):  # the text it would write is still given, and says the same answer
        own = chain.pool.loaded[BUNDLED].classify(texts[0], mode=mode)
        assert json.loads(own["json"]) == {k: own[k] for k in ANSWER_KEYS}


def test_the_blend_hands_the_second_opinion_its_keyword_reading(monkeypatch):
    """e5-small blended with the keyword tier reads each text with the keyword tier once: the chain's second
    opinion takes the reading the blend used instead of running the keyword tier again."""
    from mlx_intent.keyword import KeywordClassifier

    chain = build_chain(Settings(chain=("e5-small", KEYWORD), min_confidence=0.0, latency_budget_ms=600_000))
    chain.tiers[0].load()
    calls: collections.Counter = collections.Counter()
    counting(monkeypatch, KeywordClassifier, "classify", calls)
    texts = ["hi! where can I eat fish near Galata?", "tram from Sultanahmet to Kabataş", "merhaba"]
    results = Chain(chain.tiers, cache_size=0, secondaries=chain.secondaries).classify_batch(texts)
    assert [r["tier"] for r in results] == ["e5-small"] * 3
    assert calls == {"classify": 3}
    assert all("keyword" not in r for r in results)  # the reading stays inside the chain
