"""Issue 17, nothing lost and nothing wrong: a log that cannot be written costs no answer, the result cache
never hands one text another's answer, and no calibration file is trusted blindly."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import warnings

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_intent import calibration, encoder, keyword, metrics
from mlx_intent.chain import Chain, build_chain, keyword_tier
from mlx_intent.cli.main import main
from mlx_intent.metrics import ClassificationLog, read_log
from mlx_intent.schema import INTENTS
from mlx_intent.settings import Settings, settings_home

SURROGATE = json.loads('"where is \\ud800 Taksim?"')  # valid JSON, and a str that UTF-8 cannot encode
ANSWER = ("primary_intent", "confidence", "all_intents", "tier")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def answers(results: list[dict]) -> list[tuple]:
    return [tuple(json.dumps(r[k]) for k in ANSWER) for r in results]


@pytest.fixture
def full_disk(monkeypatch):
    """A disk with ``full_disk.room`` bytes left for the descriptors of ``full_disk.fds`` (the logs under test):
    os.write writes what fits (a short write), then fails with ENOSPC, as a disk filling up mid-line does."""
    real = os.write

    class Disk:
        fds: set[int] = set()
        room = 0

    def write(fd, data):
        if fd not in Disk.fds:
            return real(fd, data)
        if not Disk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data[: Disk.room]))
        Disk.room -= n
        return n

    monkeypatch.setattr(metrics.os, "write", write)
    return Disk


def runtime_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# ---- 5. a failed log write never costs the answer -------------------------------------------------------


def test_a_lone_surrogate_is_answered_and_logged_as_its_json_escape(tmp_path):
    path = tmp_path / "log.jsonl"
    with ClassificationLog(path) as log:
        chain = Chain([keyword_tier(home=settings_home())], log=log)
        result = chain.classify(SURROGATE)
        assert result["primary_intent"] in INTENTS
        assert log.failures == 0 and chain.metrics.log_write_failures == 0
    assert "\\ud800" in path.read_text(encoding="utf-8")  # valid UTF-8: the escape it was read from
    (record,) = read_log(path)
    assert record["text"] == SURROGATE


def test_classify_input_with_a_surrogate_and_a_log_answers_every_line(tmp_path):
    data, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    data.write_text('{"id": "a\\udc80", "text": "hello where is taksim"}\n{"id": 2, "text": "thanks"}\n')
    env = {"MLX_INTENT_LOG": str(log), "MLX_INTENT_CHAIN": "keyword"}
    result = CliRunner().invoke(main, ["classify", "--input", str(data), "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [json.loads('"a\\udc80"'), 2]
    assert [r["text"] for r in read_log(log)] == ["hello where is taksim", "thanks"]


def test_classify_input_refuses_a_surrogate_text_as_the_server_does(tmp_path):
    """One text rule for CLI and server (normalize.text_problem): a lone surrogate is refused, naming the line,
    before anything is answered or logged."""
    data, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    data.write_text('{"id": 1, "text": "thanks"}\n{"id": 2, "text": "hello \\ud800 where is taksim"}\n')
    env = {"MLX_INTENT_LOG": str(log), "MLX_INTENT_CHAIN": "keyword"}
    result = CliRunner().invoke(main, ["classify", "--input", str(data), "--output", str(out)], env=env)
    assert result.exit_code == 2 and "in.jsonl:2" in result.output and "surrogate" in result.output


def test_a_full_disk_is_counted_warned_once_and_leaves_whole_lines(tmp_path, full_disk):
    path = tmp_path / "log.jsonl"
    texts = ["hello", "where can I eat fish?", "will it rain?"]
    with ClassificationLog(path) as log:
        chain = Chain([keyword_tier(home=settings_home())], cache_size=0, log=log)
        chain.classify_batch(texts)  # written
        full_disk.fds.add(log._fd)
        full_disk.room = 7  # the disk fills up mid-line
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lost = [chain.classify_batch(texts) for _ in range(3)]
        assert answers(lost[0]) == answers(
            Chain([keyword_tier(home=settings_home())], cache_size=0).classify_batch(texts)
        )
        assert all(answers(batch) == answers(lost[0]) for batch in lost)
        assert log.failures == 9 and chain.metrics.log_write_failures == 9
        assert chain.metrics.snapshot()["log_write_failures"] == 9
        (warning,) = runtime_warnings(caught)  # once, not once per line or per batch
        assert str(path) in warning and "No space left" in warning
        full_disk.fds.clear()  # space again: the next records follow whole lines, not a torn fragment
        chain.classify_batch(texts[:1])
    records = read_log(path)
    assert records.skipped == 0 and [r["text"] for r in records] == [*texts, texts[0]]


def test_classify_reports_the_answers_it_could_not_log(tmp_path, full_disk, monkeypatch):
    data, out, log_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "log.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["hi", "rain?", "taxi"])))
    real_open = ClassificationLog.__init__

    def opened(self, path):
        real_open(self, path)
        full_disk.fds.add(self._fd)

    monkeypatch.setattr(ClassificationLog, "__init__", opened)
    env = {"MLX_INTENT_LOG": str(log_path), "MLX_INTENT_CHAIN": "keyword", "MLX_INTENT_BATCH_SIZE": "2"}
    result = CliRunner().invoke(main, ["classify", "--input", str(data), "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3
    assert re.search(r"3 answers could not be logged to .*log\.jsonl \(No space left on device\)", result.stderr)


def test_the_server_answers_through_a_full_disk_and_counts_it(tmp_path, full_disk):
    from fastapi.testclient import TestClient

    from mlx_intent.serve.app import create_app

    with ClassificationLog(tmp_path / "log.jsonl") as log:
        full_disk.fds.add(log._fd)
        chain = Chain([keyword_tier(home=settings_home())], cache_size=0, log=log)
        with TestClient(create_app(Settings(chain=("keyword",)), chain), base_url="http://127.0.0.1") as client:
            for text in ("hello", "will it rain?"):
                response = client.post("/v1/classify", json={"text": text})
                assert response.status_code == 200, response.text
                assert response.json()["primary_intent"] in INTENTS
            scraped = client.get("/metrics").text
    count = re.search(r"^mlx_intent_log_write_failures (\S+)$", scraped, re.M)
    assert count and float(count[1]) == log.failures == 2  # the two requests' (the warm-up is never logged)


# ---- 6. the result cache never returns another text's answer ---------------------------------------------

# Pairs that normalize() folds together, though the keyword tier reads them apart (emoji, uppercase IST).
PAIRS = [("🙂🙂", "☔☔☔"), ("Wie komme ich zum ist?", "Wie komme ich zum IST?"), ("kadikoy", "Kadıköy?")]


@pytest.mark.parametrize("pair", PAIRS)
def test_a_cached_answer_is_the_answer_to_that_text(pair):
    uncached = Chain([keyword_tier(home=settings_home())], cache_size=0)
    expected = answers(uncached.classify_batch(list(pair)))
    if pair != PAIRS[-1]:
        assert expected[0] != expected[1]  # so a shared cache entry would show
    for order in (pair, pair[::-1]):
        chain = Chain([keyword_tier(home=settings_home())])
        got = {text: answers([chain.classify(text)])[0] for text in order}
        assert [got[t] for t in pair] == expected


def test_the_blend_caches_per_text_too():
    chain = build_chain(Settings(chain=("e5-small", "keyword")))
    fresh = build_chain(Settings(chain=("e5-small", "keyword"), cache_size=0))
    for a, b in PAIRS[:2]:
        chain.classify(a)
        assert answers([chain.classify(b)]) == answers([fresh.classify(b)])


# Pieces that fold alike to normalize() but that the tiers tell apart, and plain text.
TEXTS = st.lists(
    st.sampled_from(["IST", "ist", "☔", "🙂", "?", "!", ",", " ", "\n", "Hello", "hello", "rain", "food", "where"]),
    max_size=8,
).map("".join) | st.text(max_size=20)


@given(TEXTS, TEXTS)
@settings(max_examples=200, deadline=None)
def test_any_text_cached_after_any_other_answers_as_uncached(first, second):
    chain, uncached = (
        Chain([keyword_tier(home=settings_home())]),
        Chain([keyword_tier(home=settings_home())], cache_size=0),
    )
    chain.classify(first)
    assert answers([chain.classify(second)]) == answers([uncached.classify(second)])


# ---- 7. calibration files are checked, and a bad one costs only the calibration --------------------------


def write_json(path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")


@pytest.mark.parametrize(
    "record",
    [
        {"platt": [float("nan"), 1.0], "accuracy": 0.9},
        {"platt": [-1.0, 0.5], "accuracy": 0.9},  # a negative slope would turn the ranking of answers over
        {"platt": [1.0, 0.5], "accuracy": 5},
        {"platt": [1.0], "accuracy": 0.9},
        '{"platt": [1.0, 0.5], "accuracy": 0.9',  # torn
        [1.0, 0.5],
    ],
)
def test_a_bad_keyword_calibration_is_ignored_warned_and_named(tmp_path, monkeypatch, record):
    bad = tmp_path / "calibration.json"
    write_json(bad, record)
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", bad)
    with pytest.warns(RuntimeWarning, match="keyword tier: ignoring the calibration"):
        clf = keyword.KeywordClassifier()
    assert clf.platt is None and keyword.calibrated_accuracy(home=settings_home()) is None
    assert clf.calibration.problems[0].startswith(str(bad))
    raw = keyword.classify_keywords("where can I eat fish?")
    assert clf.classify("where can I eat fish?")["confidence"] == raw["confidence"]


def test_classify_serve_and_eval_start_with_a_corrupt_keyword_calibration(tmp_path, monkeypatch):
    bad = tmp_path / "calibration.json"
    bad.write_text('{"platt": "no"}')
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", bad)
    env = {"MLX_INTENT_CHAIN": "keyword"}
    result = CliRunner().invoke(main, ["classify", "Wie komme ich zum IST?"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["primary_intent"] == "airport_transport"
    data = tmp_path / "labelled.jsonl"
    data.write_text(json.dumps({"id": "1", "text": "hello!", "primary_intent": "greeting"}) + "\n")
    report = tmp_path / "report.md"
    result = CliRunner().invoke(main, ["eval", str(data), "--report", str(report)], env=env)
    assert result.exit_code == 0, result.output
    chain = build_chain(Settings(chain=("keyword",)))  # what `serve` builds before it listens
    assert chain.classify("hello!")["primary_intent"] == "greeting"


@given(JSON_VALUES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_keyword_calibration_file_crashes_the_loader(tmp_path, value):
    path = tmp_path / "calibration.json"
    write_json(path, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = keyword.load_fit(path, home=settings_home())
    if loaded.fit is not None:
        a, b = loaded.fit["platt"]
        assert 0 < a <= 100 and math.isfinite(b)
        assert loaded.fit["accuracy"] is None or 0 <= loaded.fit["accuracy"] <= 1
    else:
        assert loaded.problems  # a file there that is not used is always named


def test_the_homes_keyword_fit_is_preferred_while_it_belongs_to_these_lexicons(tmp_path, monkeypatch):
    packaged = tmp_path / "package.json"
    write_json(packaged, {"platt": [1.0, 0.0], "accuracy": 0.8})
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", packaged)
    home = tmp_path / "home"
    mine = calibration.home_file(keyword.FIT_NAME, home)
    write_json(mine, {"platt": [2.0, 0.5], "accuracy": 0.9, "lexicons": keyword.lexicon_fingerprint()})
    assert keyword.KeywordClassifier(home=home).platt == (2.0, 0.5)
    assert keyword.calibrated_accuracy(home=home) == 0.9
    write_json(mine, {"platt": [2.0, 0.5], "accuracy": 0.9, "lexicons": "0123456789abcdef"})
    with pytest.warns(RuntimeWarning, match="other lexicons"):
        stale = keyword.KeywordClassifier(home=home)
    assert stale.platt == (1.0, 0.0) and stale.calibration.path == packaged


def test_an_llm_calibration_out_of_range_is_ignored(tmp_path):
    from mlx_intent.classifier import CALIBRATION, load_calibration

    for record, why in [
        ({"temperature": 0, "threshold": 0.2}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1.5, "threshold": -1}, "threshold"),
        ({"threshold": 0.2}, "temperature"),
        ("{not json", "not JSON"),
    ]:
        write_json(tmp_path / CALIBRATION, record)
        with pytest.warns(RuntimeWarning, match="answering with raw confidences"):
            loaded = load_calibration(tmp_path, "m")
        assert loaded.fit is None and why in loaded.problems[0]
    write_json(tmp_path / CALIBRATION, {"temperature": 1.5})
    assert load_calibration(tmp_path).fit == {"temperature": 1.5, "threshold": 0.2}


@given(JSON_VALUES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_llm_calibration_file_crashes_the_loader(tmp_path, value):
    from mlx_intent.classifier import CALIBRATION, load_calibration

    write_json(tmp_path / CALIBRATION, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_calibration(tmp_path)
    if loaded.fit is not None:
        assert calibration.T_RANGE[0] <= loaded.fit["temperature"] <= calibration.T_RANGE[1]
        assert 0 < loaded.fit["threshold"] <= 1


def test_a_temperature_of_zero_no_longer_makes_every_confidence_one(models_home, bundled):
    from mlx_intent.classifier import CALIBRATION, IntentClassifier
    from mlx_intent.models import registry

    path = registry.resolve_dir("smollm2-135m", home=settings_home()) / CALIBRATION
    before = path.read_bytes() if path.exists() else None
    try:
        path.write_text(json.dumps({"temperature": 0, "threshold": 0.2}))
        model, tokenizer = bundled
        with pytest.warns(RuntimeWarning, match="temperature"):
            clf = IntentClassifier("smollm2-135m", model=model, tokenizer=tokenizer, use_adapter=False)
        assert clf.temperature == 1.0 and clf.calibration.problems
        confidences = [r["confidence"] for r in clf.classify_batch(["hello", "where can I eat?", "rain?"])]
        assert all(c < 1.0 for c in confidences)
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


def head_record(**calibration_fields) -> dict:
    record = json.loads((encoder.HEAD_DIR / encoder.HEAD_CONFIG).read_text())
    record["calibration"].update(calibration_fields)
    return record


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"temperature": 0}, "temperature"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": 1}, "threshold"),
        ({"temperature": "1.2"}, "temperature"),
    ],
)
def test_a_bad_head_calibration_costs_only_the_calibration(tmp_path, change, why):
    write_json(tmp_path / encoder.HEAD_CONFIG, head_record(**change))
    with pytest.warns(RuntimeWarning, match="e5-small: ignoring the calibration"):
        config, _ = encoder.HeadConfig.read(tmp_path, home=tmp_path / "home")
    assert (config.temperature, config.threshold, config.combination) == (1.0, 0.5, None)  # raw: no blend
    assert config.tuned_layers == 4 and why in config.source.problems[0]


@given(st.dictionaries(st.sampled_from(["temperature", "threshold", "fitted_on"]), JSON_VALUES), JSON_VALUES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_head_calibration_crashes_the_loader(tmp_path, cal, combination):
    record = head_record()
    record["calibration"], record["combination"] = cal, combination
    write_json(tmp_path / encoder.HEAD_CONFIG, record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, _ = encoder.HeadConfig.read(tmp_path, home=tmp_path / "home")
    assert calibration.T_RANGE[0] <= config.temperature <= calibration.T_RANGE[1] and 0 < config.threshold < 1
    assert config.combination is None or (config.combination[0] > 0 and all(0 <= w <= 5 for w in config.combination))


def test_a_home_head_fit_for_another_head_is_not_used(tmp_path):
    head = tmp_path / encoder.NAME
    head.mkdir()
    write_json(head / encoder.HEAD_CONFIG, head_record(temperature=1.5))
    (head / encoder.HEAD_WEIGHTS).write_bytes(b"these weights")
    home = tmp_path / "home"
    fit = {"calibration": {"temperature": 2.5, "threshold": 0.4}, "combination": None}
    write_json(calibration.home_file(encoder.FIT_NAME, home), {**fit, "head": encoder.head_fingerprint(head)})
    assert encoder.HeadConfig.read(head, home)[0].temperature == 2.5  # the home's fit, preferred
    (head / encoder.HEAD_WEIGHTS).write_bytes(b"a retrained head")
    with pytest.warns(RuntimeWarning, match="another head"):
        config, _ = encoder.HeadConfig.read(head, home)
    assert config.temperature == 1.5 and config.source.path == head / encoder.HEAD_CONFIG


LABELLED = [
    {"id": str(i), "text": t, "primary_intent": p}
    for i, (t, p) in enumerate(
        [("hello!", "greeting"), ("where can I eat kebab?", "restaurant"), ("will it rain?", "weather")] * 5
    )
]


def test_calibrate_refuses_too_few_rows_and_writes_under_the_home_only(tmp_path):
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in LABELLED))
    home = tmp_path / "home"
    args = ["calibrate", "keyword", "--data", str(data), "--home", str(home)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and f"at least {calibration.MIN_ROWS}" in refused.output
    assert not calibration.home_file(keyword.FIT_NAME, home).exists()
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert not keyword.CALIBRATION_PATH.exists()  # the packaged fit's place (the package) is never written
    written = json.loads(calibration.home_file(keyword.FIT_NAME, home).read_text())
    assert written["n"] == len(LABELLED) and written["lexicons"] == keyword.lexicon_fingerprint()
    assert keyword.KeywordClassifier(home=home).platt == tuple(written["platt"])


def test_a_calibration_write_that_fails_keeps_the_old_fit(tmp_path, monkeypatch):
    path = tmp_path / "fit.json"
    calibration.write(path, {"platt": [1.0, 0.0]})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(calibration.os, "fsync", full)
    with pytest.raises(OSError):
        calibration.write(path, {"platt": [2.0, 0.0]})
    assert json.loads(path.read_text()) == {"platt": [1.0, 0.0]} and os.listdir(tmp_path) == ["fit.json"]


def test_models_list_names_an_ignored_calibration(tmp_path, monkeypatch):
    bad = tmp_path / "calibration.json"
    bad.write_text('{"platt": [1.0, NaN]}')
    monkeypatch.setattr(keyword, "CALIBRATION_PATH", bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, ["models", "list", "--home", str(tmp_path / "home")])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.strip().startswith("keyword:")]
    assert "none (raw confidences)" in line and f"IGNORED {bad}" in line and "platt b" in line
