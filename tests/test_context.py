"""Conversations (issue 14, "Context"): a follow-up takes the intent it continues, a new request and social talk
do not; the same through the chain, the CLI, the server (context and session) and the LLM prompt; the session
store is bounded in sessions, turns and age; bad contexts are refused in words."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import post, running, wait_ready

from mlx_intent.chain import Chain, Tier, build_chain, cache_key
from mlx_intent.cli.main import main
from mlx_intent.context import MAX_CONTEXT_TURNS, context_problem, rule_detector, topic
from mlx_intent.errors import InputError
from mlx_intent.feedback import Store
from mlx_intent.normalize import MAX_TEXT_CHARS
from mlx_intent.serve.app import create_app
from mlx_intent.serve.sessions import Sessions
from mlx_intent.settings import Settings

KEYWORD = Settings(chain=("keyword",))
ANSWERS = {  # a stand-in tier's own reading of each turn (what a tier with no context would say)
    "Will it rain today?": "weather",
    "and tomorrow?": "general",
    "Where can I eat kebab in Kadıköy?": "restaurant",
    "thanks a lot!": "greeting",
    "I want to see the city lights": "general",
}


def reading_tier(seen: list | None = None, contextual: bool = False) -> Tier:
    """Answers each text by ANSWERS; with ``contextual`` it records the earlier turns it was given."""

    def run(texts, contexts=None):
        if seen is not None:
            seen.append(contexts)
        return [{"primary_intent": ANSWERS[t], "confidence": 0.9, "all_intents": [ANSWERS[t]]} for t in texts]

    return Tier("reader", run, model="reader-model", contextual=contextual)


@pytest.fixture
def chain() -> Chain:
    return Chain([reading_tier()], followup=rule_detector)


# ---- the rule -------------------------------------------------------------------------------------------------


def test_a_follow_up_takes_the_intent_it_continues(chain):
    res = chain.classify("and tomorrow?", context=["Will it rain today?"])
    assert (res["primary_intent"], res["all_intents"], res["context_used"]) == ("weather", ["weather"], True)
    assert res["confidence"] <= 0.9


def test_a_new_request_and_social_talk_keep_their_own_answer(chain):
    new = chain.classify("Where can I eat kebab in Kadıköy?", context=["Will it rain today?"])
    social = chain.classify("thanks a lot!", context=["Will it rain today?"])
    assert (new["primary_intent"], new["context_used"]) == ("restaurant", False)
    assert (social["primary_intent"], social["context_used"]) == ("greeting", False)


def test_every_result_says_whether_context_decided(chain):
    assert chain.classify("and tomorrow?")["context_used"] is False  # no context: its own answer
    assert all("context_used" in r for r in chain.classify_batch(list(ANSWERS)))


def test_an_earlier_turn_with_no_need_carries_the_older_topic_on(chain):
    res = chain.classify("and tomorrow?", context=["Will it rain today?", "I want to see the city lights"])
    assert res["primary_intent"] == "weather"
    assert topic([{"primary_intent": "greeting"}]) is None


def test_the_cache_key_holds_the_context(chain):
    alone = chain.classify("and tomorrow?")
    followed = chain.classify("and tomorrow?", context=["Will it rain today?"])
    assert (alone["primary_intent"], followed["primary_intent"]) == ("general", "weather")
    assert cache_key(("Will it rain today?",), "and tomorrow?") in chain.cache and "and tomorrow?" in chain.cache
    again = chain.classify("and tomorrow?", context=["Will it rain today?"])
    assert again["cached"] and again["primary_intent"] == "weather"


def test_a_contextual_tier_gets_the_earlier_turns_and_others_do_not():
    seen: list = []
    Chain([reading_tier(seen, contextual=True)]).classify("and tomorrow?", context=["Will it rain today?"])
    assert seen == [[(), ("Will it rain today?",)]]  # the earlier turn as it stood (none before it), then the text
    plain: list = []
    Chain([reading_tier(plain)]).classify("and tomorrow?", context=["Will it rain today?"])
    assert plain == [None]


def test_the_feedback_store_keeps_the_context_and_the_flag(tmp_path):
    store = Store(tmp_path / "feedback.db")
    chain = Chain([reading_tier()], store=store)
    res = chain.classify("and tomorrow?", context=["Will it rain today?"])
    row = store.read("SELECT context, context_used FROM results WHERE id = ?", [res["id"]])[0]
    assert (json.loads(row["context"]), row["context_used"]) == (["Will it rain today?"], 1)


def test_the_learned_head_on_the_encoder(models_home):
    chain = build_chain(Settings(chain=("e5-small", "keyword")))
    follow = chain.classify("and tomorrow?", context=["Will it rain today?"])
    new = chain.classify("Where can I buy a carpet in the Grand Bazaar?", context=["Will it rain today?"])
    social = chain.classify("thanks a lot, bye!", context=["Will it rain today?"])
    assert (follow["primary_intent"], follow["context_used"]) == ("weather", True)
    assert (new["primary_intent"], new["context_used"]) == ("shopping", False)
    assert social["primary_intent"] == "greeting"


# ---- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "context, problem",
    [
        ("Will it rain?", "must be a list"),
        (["a"] * (MAX_CONTEXT_TURNS + 1), "at most 5"),
        (["ok", 3], "turn 2 is not a text"),
        (["\u200b "], "turn 1: text is empty"),
        (["x" * (MAX_TEXT_CHARS + 1)], "longer than"),
    ],
)
def test_bad_contexts_are_named(context, problem):
    assert problem in context_problem(context)


# ---- sessions -------------------------------------------------------------------------------------------------


def test_sessions_are_bounded_in_turns_count_and_age():
    now = [0.0]
    store = Sessions(max_sessions=2, turns=3, ttl_s=60, clock=lambda: now[0])
    for text in "abcd":
        store.add("s1", text)
    assert store.context("s1") == ("b", "c", "d")  # turns per session
    store.add("s2", "x")
    store.add("s3", "y")
    assert len(store) == 2 and store.context("s1") == ()  # the least recently used session went
    now[0] = 30.0
    store.add("s2", "z")
    now[0] = 70.0  # s2's "x" and s3's "y" are 70 s old; s2's "z" 40 s
    assert store.context("s2") == ("z",) and store.context("s3") == ()
    now[0] = 200.0
    assert len(store) == 0


# ---- the server -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(models_home):
    now = [0.0]
    chain = build_chain(KEYWORD)
    app = create_app(KEYWORD, chain, sessions=Sessions(ttl_s=1200, clock=lambda: now[0]))
    with running(app) as (base, _):
        wait_ready(base)
        yield base, chain, now


def test_the_server_answers_a_context_as_the_chain_does(served):
    base, chain, _ = served
    context = ["What's the weather like in Istanbul today?"]
    want = chain.derive(cache_size=0).classify("and tomorrow?", context=context)
    got = post(base, "/v1/classify", {"text": "and tomorrow?", "context": context}).json()
    batch = post(base, "/v1/classify/batch", {"items": [{"text": "and tomorrow?", "context": context}]}).json()
    for res in (got, batch["results"][0]):
        assert (res["primary_intent"], res["context_used"]) == (want["primary_intent"], want["context_used"])
    assert want["context_used"] and want["primary_intent"] == "weather"


def test_a_session_keeps_the_earlier_turns_for_twenty_minutes(served):
    base, _, now = served
    first = post(base, "/v1/classify", {"text": "What's the weather like in Istanbul today?", "session": "s"}).json()
    second = post(base, "/v1/classify", {"text": "and tomorrow?", "session": "s"}).json()
    assert first["primary_intent"] == "weather" and (second["primary_intent"], second["context_used"]) == (
        "weather",
        True,
    )
    now[0] += 1201
    later = post(base, "/v1/classify", {"text": "and tomorrow?", "session": "s"}).json()
    assert later["context_used"] is False


def test_a_batch_session_sees_its_own_earlier_items(served):
    base, _, _ = served
    items = [
        {"text": "What's the weather like in Istanbul today?", "session": "b"},
        {"text": "and tomorrow?", "session": "b"},
    ]
    results = post(base, "/v1/classify/batch", {"items": items}).json()["results"]
    assert [r["primary_intent"] for r in results] == ["weather", "weather"] and results[1]["context_used"]


@pytest.mark.parametrize(
    "body",
    [
        {"text": "and tomorrow?", "context": ["a"] * 6},
        {"text": "and tomorrow?", "context": ["\u200b"]},
        {"text": "and tomorrow?", "context": "Will it rain?"},
        {"text": "and tomorrow?", "context": ["a"], "session": "s"},
        {"text": "and tomorrow?", "session": ""},
    ],
)
def test_bad_contexts_are_422(served, body):
    assert post(served[0], "/v1/classify", body).status_code == 422
    assert post(served[0], "/v1/classify/batch", {"items": [body]}).status_code == 422


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(context=st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=7))
def test_the_server_refuses_exactly_what_the_rule_refuses(served, context):
    r = post(served[0], "/v1/classify", {"text": "and tomorrow?", "context": context})
    assert (r.status_code == 422) == (context_problem(context) is not None), r.text


# ---- the CLI --------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(clean_settings, tmp_path):
    return tmp_path


def classify(*args: str):
    return CliRunner().invoke(main, ["classify", "--chain", "keyword", *args])


def test_the_cli_answers_as_the_chain_and_the_server(cli_env, served):
    context = ["What's the weather like in Istanbul today?"]
    one = classify("--context", context[0], "and tomorrow?")
    assert one.exit_code == 0, one.output
    shown = json.loads(one.stdout)
    (cli_env / "in.jsonl").write_text(json.dumps({"id": 1, "text": "and tomorrow?", "context": context}) + "\n")
    many = classify("--input", "in.jsonl", "--output", "out.jsonl")
    assert many.exit_code == 0, many.output
    line = json.loads((cli_env / "out.jsonl").read_text())
    api = post(served[0], "/v1/classify", {"text": "and tomorrow?", "context": context}).json()
    assert shown["primary_intent"] == line["primary_intent"] == api["primary_intent"] == "weather"
    assert shown["context_used"] and line["context_used"] and api["context_used"]


def test_cli_context_errors_name_the_line(cli_env):
    (cli_env / "in.jsonl").write_text(
        json.dumps({"text": "hi"}) + "\n" + json.dumps({"text": "and tomorrow?", "context": ["a"] * 6}) + "\n"
    )
    bad = classify("--input", "in.jsonl", "--output", "out.jsonl")
    assert bad.exit_code == 2 and "in.jsonl:2: context holds 6 turns" in bad.output
    empty = classify("--context", " ", "and tomorrow?")
    assert empty.exit_code == 2 and "context turn 1: text is empty" in empty.output
    both = classify("--context", "Will it rain?", "--input", "in.jsonl", "--output", "o.jsonl")
    assert both.exit_code == 2 and "--context goes with TEXT" in both.output


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    context=st.one_of(st.none(), st.text(max_size=5), st.lists(st.one_of(st.text(max_size=5), st.none()), max_size=7))
)
def test_an_input_line_context_is_read_or_refused_naming_the_line(tmp_path, context):
    from mlx_intent.cli.main import _read_jsonl

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "and tomorrow?", "context": context}) + "\n", encoding="utf-8")
    try:
        [(_, _, _, _, read)] = list(_read_jsonl(str(path), set()))
    except InputError as e:
        assert str(e).startswith(f"{path}:1: ") and context_problem(context) is not None
    else:
        assert read == tuple(context or ())


# ---- the LLM prompt -------------------------------------------------------------------------------------------


def test_earlier_turns_are_user_messages_after_the_system_prompt(bundled):
    from mlx_intent.prompts import chat_prompt, render, system_prompt

    _, tokenizer = bundled
    prompt = chat_prompt(tokenizer, "chatml", system_prompt())
    turns = ["Will it rain today?", "Bugün yağmur yağacak mı?"]
    ids = prompt.prefix + prompt.earlier(turns) + prompt.user("and tomorrow?") + prompt.suffix
    messages = [{"role": "system", "content": system_prompt()}]
    messages += [{"role": "user", "content": t} for t in [*turns, "and tomorrow?"]]
    assert ids == list(render(tokenizer, messages, tokenize=True))
