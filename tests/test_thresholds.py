"""Thresholds (issue 14): the ambiguity margin (a tier whose top two intents are too close passes over, the last
tier before general flags its answer) and per-user thresholds in the feedback store (set, learned from the
user's feedback), through the chain, the CLI, the HTTP API and the Python API; the store's migration."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_intent.chain import GENERAL, Chain, Kind, Tier, build_chain
from mlx_intent.cli.main import main
from mlx_intent.errors import EXIT_INPUT, InputError
from mlx_intent.feedback import store as fb_store
from mlx_intent.feedback import users as fb_users
from mlx_intent.results import FeedbackError, Reason, check_user, top_gap
from mlx_intent.settings import Settings, SettingsError, load_settings

KEYWORD = Settings(chain=("keyword",), cache_size=0)
TEXT = "best kebab in Kadikoy"


def fake(name: str, top: list[tuple[str, float]], model: str | None = "fake", **kw) -> Tier:
    """A tier answering every text with the distribution ``top``."""
    answer = {"primary_intent": top[0][0], "confidence": top[0][1], "all_intents": [top[0][0]], "top": top}
    return Tier(name, lambda texts: [dict(answer) for _ in texts], model=model, kind=Kind.LLM, **kw)


CLOSE = [("restaurant", 0.48), ("nearby_locations", 0.42), ("general", 0.1)]  # 0.06 apart
CLEAR = [("transportation", 0.9), ("route_planning", 0.05)]


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


def cli(*args: str, home: Path, input: str | None = None):
    return CliRunner().invoke(main, [*args, "--home", str(home)], input=input)


# ---- the ambiguity margin -----------------------------------------------------------------------


def test_a_tier_within_the_margin_passes_over_as_ambiguous_and_the_next_answers():
    chain = Chain([fake("close", CLOSE, margin=0.1), fake("clear", CLEAR, margin=0.1)], cache_size=0)
    result = chain.classify("x")
    assert result["tier"] == "clear" and result["ambiguous"] is False
    assert [(f["tier"], f["kind"]) for f in result["fallbacks"]] == [("close", Reason.AMBIGUOUS.value)]
    assert "0.06 apart < margin 0.10" in result["fallbacks"][0]["reason"]
    # margin 0 (off) and a margin the gap meets: the first tier answers
    for margin in (0.0, 0.06):
        chain = Chain([fake("close", CLOSE, margin=margin), fake("clear", CLEAR)], cache_size=0)
        assert chain.classify("x")["tier"] == "close"


def test_the_last_tier_before_general_answers_within_the_margin_flagged_ambiguous():
    chain = Chain([fake("one", [("shopping", 0.3)], threshold=0.5), fake("close", CLOSE, margin=0.1)], cache_size=0)
    result = chain.classify("x")
    assert result["tier"] == "close" and result["ambiguous"] is True
    assert [f["kind"] for f in result["fallbacks"]] == [Reason.LOW_CONFIDENCE.value]
    assert chain.tiers[-1].name == GENERAL  # general was there to pass to, and was not used


def test_a_tier_without_a_second_score_is_never_ambiguous():
    one = fake("one", [("restaurant", 0.6)], margin=1.0)
    assert top_gap({"top": [["restaurant", 0.6]]}) is None
    assert Chain([one, fake("clear", CLEAR)], cache_size=0).classify("x")["tier"] == "one"
    # the keyword tier's evidence shares: one scored intent is a gap of 1, two equal ones a gap of 0
    assert top_gap({"scores": {"restaurant": 2.0}}) == 1.0
    assert top_gap({"scores": {"restaurant": 1.0, "shopping": 1.0}}) == 0.0
    assert top_gap({"scores": {}}) is None


def test_the_margin_setting_reaches_every_tier_and_is_checked():
    assert load_settings(environ={}).margin == 0.0
    settings = load_settings({"margin": "0.2", "chain": "keyword"}, environ={})
    assert {t.name: t.margin for t in build_chain(settings).tiers} == {"keyword": 0.2, GENERAL: 0.0}
    for bad in ("-0.1", "1.5", "nan", "x"):
        with pytest.raises(SettingsError, match="--margin"):
            load_settings({"margin": bad}, environ={})


def test_ambiguous_on_every_result_through_the_cli_and_its_input_lines(home, tmp_path):
    out = cli("classify", TEXT, "--chain", "keyword", "-v", home=home)
    assert out.exit_code == 0 and json.loads(out.output)["ambiguous"] is False
    queries, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    queries.write_text(json.dumps({"id": 1, "text": TEXT}) + "\n")
    assert (
        cli("classify", "--input", str(queries), "--output", str(results), "--chain", "keyword", home=home).exit_code
        == 0
    )
    assert json.loads(results.read_text())["ambiguous"] is False


# ---- per-user thresholds ------------------------------------------------------------------------


def test_a_users_min_confidence_and_margin_apply_to_their_requests_only(home):
    store = fb_store.open_store(home)
    fb_users.set_user(store, "strict", min_confidence=0.99)
    fb_users.set_user(store, "wary", margin=1.0)
    chain = build_chain(Settings(chain=("keyword",), home=home))
    default = chain.classify(TEXT)
    assert default["primary_intent"] != "general"
    strict = chain.classify(TEXT, user="strict")
    assert strict["tier"] == GENERAL and strict["fallbacks"][0]["kind"] == Reason.LOW_CONFIDENCE.value
    assert "< 0.99" in strict["fallbacks"][0]["reason"]
    wary = chain.classify(TEXT, user="wary")
    gap = top_gap(chain.tiers[0].run([TEXT])[0])
    assert wary["ambiguous"] is (gap is not None and gap < 1.0) and wary["primary_intent"] == default["primary_intent"]
    # an unknown user, and the default again after them (the cache never hands one user's answer to another)
    assert chain.classify(TEXT, user="nobody")["primary_intent"] == default["primary_intent"]
    assert chain.classify(TEXT)["primary_intent"] == default["primary_intent"]
    with pytest.raises(InputError, match="user"):
        chain.classify(TEXT, user="no spaces")


def test_a_users_min_confidence_never_undercuts_the_tiers_floor():
    tier = fake("llm", [("restaurant", 0.6), ("shopping", 0.1)], floor=0.7, threshold=0.9)
    chain = Chain([tier, fake("clear", CLEAR)], cache_size=0, users=lambda u: {"min_confidence": 0.1})
    assert chain.classify("x", user="lax")["tier"] == "clear"  # 0.6 is under the floor, whatever the user says
    below = fake("llm", [("restaurant", 0.6), ("shopping", 0.1)], floor=0.5, threshold=0.9)
    chain = Chain([below, fake("clear", CLEAR)], cache_size=0, users=lambda u: {"min_confidence": 0.1})
    assert chain.classify("x", user="lax")["tier"] == "llm"  # above the floor, the user's 0.1 replaced the 0.9
    assert chain.classify("x")["tier"] == "clear"


def test_requests_record_their_user_in_the_store(home):
    chain = build_chain(Settings(chain=("keyword",), home=home), store=fb_store.open_store(home))
    rid = chain.classify(TEXT, user="alice")["id"]
    assert chain.store.read("SELECT user FROM results WHERE id = ?", (rid,)) == [{"user": "alice"}]


def test_user_thresholds_through_the_cli(home, tmp_path):
    assert cli("users", "set", "strict", "--min-confidence", "0.99", home=home).exit_code == 0
    shown = cli("users", "show", "strict", home=home)
    assert shown.exit_code == 0 and "min_confidence 0.99" in shown.output and "margin -" in shown.output
    assert "strict" in cli("users", "list", home=home).output
    answer = cli("classify", TEXT, "--chain", "keyword", "--user", "strict", home=home)
    assert json.loads(answer.output)["primary_intent"] == "general"
    assert json.loads(cli("classify", TEXT, "--chain", "keyword", home=home).output)["primary_intent"] != "general"
    queries, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in [{"text": TEXT, "user": "strict"}, {"text": TEXT}]))
    run = cli("classify", "--input", str(queries), "--output", str(results), "--chain", "keyword", home=home)
    assert run.exit_code == 0
    assert [json.loads(line)["primary_intent"] == "general" for line in results.read_text().splitlines()] == [
        True,
        False,
    ]
    queries.write_text(json.dumps({"text": TEXT, "user": "a b"}) + "\n")
    bad = cli("classify", "--input", str(queries), "--output", str(results), "--chain", "keyword", home=home)
    assert bad.exit_code == EXIT_INPUT and "in.jsonl:1: user" in bad.output
    assert cli("users", "delete", "strict", home=home).exit_code == 0
    assert cli("users", "show", "strict", home=home).exit_code == EXIT_INPUT
    again = cli("users", "delete", "strict", home=home)
    assert again.exit_code == EXIT_INPUT and "unknown user 'strict'" in again.output


@pytest.mark.parametrize(
    "args", [["--min-confidence", "0"], ["--min-confidence", "1.5"], ["--margin", "-1"], ["--min-confidence", "x"], []]
)
def test_users_set_refuses_bad_thresholds(home, args):
    out = cli("users", "set", "someone", *args, home=home)
    assert out.exit_code == EXIT_INPUT and "Traceback" not in out.output


def test_users_show_and_learn_of_an_unknown_user_exit_2(home):
    assert cli("users", "show", "ghost", home=home).exit_code == EXIT_INPUT
    assert cli("users", "learn", "ghost", home=home).exit_code == EXIT_INPUT  # no store yet
    fb_store.open_store(home)
    out = cli("users", "learn", "ghost", home=home)
    assert out.exit_code == EXIT_INPUT and "0 judged records, at least 20" in out.output


def test_user_thresholds_through_the_http_api(home):
    from fastapi.testclient import TestClient

    from mlx_intent.serve.app import create_app

    settings = Settings(chain=("keyword",), home=home, cache_size=0)
    fb_users.set_user(fb_store.open_store(home), "strict", min_confidence=0.99)
    with TestClient(create_app(settings, build_chain(settings)), base_url="http://127.0.0.1") as client:
        strict = client.post("/v1/classify", json={"text": TEXT, "user": "strict"}).json()
        plain = client.post("/v1/classify", json={"text": TEXT}).json()
        other = client.post("/v1/classify", json={"text": TEXT, "user": "other"}).json()
        assert strict["primary_intent"] == "general" and strict["ambiguous"] is False
        assert plain["primary_intent"] == other["primary_intent"] != "general"
        batch = client.post("/v1/classify/batch", json={"texts": [TEXT, TEXT], "user": "strict"}).json()["results"]
        assert [r["primary_intent"] for r in batch] == ["general", "general"]
        for bad in ("", "a b", "x" * 65, 7, "-lead", "naïve"):
            assert client.post("/v1/classify", json={"text": TEXT, "user": bad}).status_code == 422
            assert client.post("/v1/classify/batch", json={"texts": [TEXT], "user": bad}).status_code == 422


def test_user_on_the_python_api(home, monkeypatch):
    import mlx_intent

    monkeypatch.setenv("MLX_INTENT_HOME", str(home))
    fb_users.set_user(fb_store.open_store(home), "strict", min_confidence=0.99)
    chain = mlx_intent.build_chain(Settings(chain=("keyword",), home=home))
    assert chain.classify(TEXT, user="strict")["primary_intent"] == "general"
    assert chain.classify_batch([TEXT], users=["someone"])[0]["primary_intent"] != "general"


# ---- learning a user's thresholds ---------------------------------------------------------------


def synthetic(store: fb_store.Store, user: str, confidences: list[float], right_from: float) -> None:
    """Judged records of ``user``: right where the confidence is at least ``right_from``."""
    records = []
    for n, c in enumerate(confidences):
        top = [["restaurant", c], ["shopping", round((1 - c) / 2, 4)]]
        records.append(
            {
                "id": f"{user}-{n}",
                "ts": "t",
                "user": user,
                "text": f"q {n}",
                "primary_intent": "restaurant",
                "confidence": c,
                "all_intents": ["restaurant"],
                "top": top,
            }
        )
    fb_store.record_results(store, records)
    for n, c in enumerate(confidences):
        fb_store.add_feedback(store, f"{user}-{n}", "restaurant" if c >= right_from else "shopping")


def test_learning_fits_a_users_min_confidence_on_their_feedback_only(home):
    store = fb_store.open_store(home)
    confidences = [round(0.3 + 0.6 * n / 29, 4) for n in range(30)]
    synthetic(store, "u1", confidences, right_from=0.62)
    synthetic(store, "u2", confidences, right_from=0.0)  # always right: must not move u1's fit
    fit = fb_users.learn_user_thresholds(store, "u1")
    first_right = min(c for c in confidences if c >= 0.62)
    assert fit["min_confidence"] == first_right and fit["records"] == 30
    assert fit["accuracy_accepted"] == 1.0 and fit["accuracy_before"] < 1.0
    assert fb_users.get_user(store, "u1")["learned_from"] == 30
    assert fb_users.learn_user_thresholds(store, "u2")["min_confidence"] == min(confidences)  # keep everything
    out = cli("users", "learn", "u1", home=home)
    assert out.exit_code == 0 and f"min_confidence {first_right:g}" in out.output
    with pytest.raises(InputError, match="at least 40"):
        fb_users.learn_user_thresholds(store, "u1", minimum=40)


# ---- the store's migration ----------------------------------------------------------------------


def test_a_version_1_store_migrates_and_keeps_its_records(home):
    path = fb_store.db_path(home)
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    for statement in fb_store.MIGRATIONS[0]:
        db.execute(statement)
    db.execute(
        "INSERT INTO results VALUES ('r1', 't', 'bob', 'kebab?', NULL, 'en', 'restaurant', 0.9, '[\"restaurant\"]', "
        "'keyword', NULL, 0.8, 0, 0, '{}')"
    )
    db.execute(
        "INSERT INTO feedback (id, ts, user, source, correct, primary_intent, all_intents) VALUES "
        "('r1', 't', NULL, 'cli', 1, 'restaurant', '[\"restaurant\"]')"
    )
    db.commit()
    db.close()
    store = fb_store.open_store(home)
    assert (
        store.read("SELECT version FROM schema_version") == [{"version": fb_store.SCHEMA_VERSION}]
        and fb_store.SCHEMA_VERSION == 2
    )
    assert [r["id"] for r in fb_store.list_feedback(store)] == ["r1"]
    assert fb_users.user_records(store, "bob") == [{"confidence": 0.9, "margin": 0.8, "correct": 1}]
    assert fb_users.set_user(store, "bob", margin=0.1)["margin"] == 0.1


# ---- parsing ------------------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_user_ids_are_short_plain_strings(user):
    ok = (
        1 <= len(user) <= 64
        and user.isascii()
        and (user[0].isalnum())
        and all(c.isalnum() or c in "._@:+-" for c in user)
    )
    try:
        assert check_user(user) == user and ok
    except FeedbackError:
        assert not ok


@given(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10), st.none()),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none()),
)
def test_thresholds_parse_in_their_ranges(p, m):
    def number(v):
        try:
            return float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            return None

    pv = number(p)
    ok_p = p is None or (pv is not None and 0 < pv <= 1)
    ok_m = m is None or 0 <= m <= 1
    try:
        out = fb_users.check_thresholds(p, m)
        assert ok_p and ok_m and out["min_confidence"] == (None if p is None else pv)
    except FeedbackError:
        assert not (ok_p and ok_m)


def test_min_confidence_holds_on_the_default_chain(models_home):
    """Issue 24, part 6: `--min-confidence 0.999` had no effect on the default chain (the blend took every text);
    set, it holds for the blend and the keyword tier too, so an answer under it ends at general.  Unset, they
    answer at any confidence, as measured best."""
    text = "Where can I eat fish near Galata Tower?"
    usual = CliRunner().invoke(main, ["classify", "-v", text])
    assert usual.exit_code == 0, usual.output
    assert json.loads(usual.stdout)["tier"] == "e5-small"
    strict = CliRunner().invoke(main, ["classify", "-v", "--min-confidence", "0.999", text])
    assert strict.exit_code == 0, strict.output
    answer = json.loads(strict.stdout)
    assert answer["tier"] == "general"
    assert [f["kind"] for f in answer["fallbacks"] if f["tier"] in ("e5-small", "keyword")] == ["low_confidence"] * 2
