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

from mlx_intent.chain import Chain, Kind, Tier, build_chain, cache_key
from mlx_intent.cli.main import main
from mlx_intent.context import (
    MAX_CONTEXT_TURNS,
    context_problem,
    learned_detector,
    pair_detector,
    rule_detector,
    topic,
)
from mlx_intent.errors import InputError
from mlx_intent.feedback.store import Store
from mlx_intent.normalize import MAX_TEXT_CHARS
from mlx_intent.serve.app import create_app
from mlx_intent.serve.sessions import Sessions
from mlx_intent.settings import Settings, settings_home
from mlx_intent.tuner.augment import encoder_text, request_pairs

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

    return Tier("reader", run, model="reader-model", kind=Kind.LLM, contextual=contextual)


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
    assert all(r["context_used"] is False for r in chain.classify_batch(list(ANSWERS)))


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


def test_the_pair_test_on_the_shipped_encoder(models_home):
    chain = build_chain(Settings(chain=("e5-small", "keyword")))
    alone = chain.classify("what about Balat?")
    follow = chain.classify("what about Balat?", context=["Where can I eat kebab in Kadıköy?"])
    new = chain.classify("Where can I buy a carpet in the Grand Bazaar?", context=["Will it rain today?"])
    social = chain.classify("thanks a lot, bye!", context=["Will it rain today?"])
    assert alone["primary_intent"] != "restaurant"  # read alone it names no food: the context decides
    assert (follow["primary_intent"], follow["context_used"]) == ("restaurant", True)
    assert (new["primary_intent"], new["context_used"]) == ("shopping", False)
    assert social["primary_intent"] == "greeting"


def test_the_detector_is_asked_about_the_answer_the_turn_would_continue():
    asked: list = []

    def detector(items):
        asked.extend(
            (ctx, text, raw["primary_intent"], continued["primary_intent"]) for ctx, text, raw, continued in items
        )
        return [1.0] * len(items)

    chain = Chain([reading_tier()], followup=detector)
    res = chain.classify("and tomorrow?", context=["Will it rain today?", "I want to see the city lights"])
    # each earlier turn is asked about first (shortest conversation first), then the turn, with the older topic
    assert asked == [
        (("Will it rain today?",), "I want to see the city lights", "general", "weather"),
        (("Will it rain today?", "I want to see the city lights"), "and tomorrow?", "general", "weather"),
    ]
    assert res["primary_intent"] == "weather" and res["context_used"]


def test_an_earlier_turn_that_continued_passes_its_inherited_topic_on():
    asked: list = []

    def always(items):
        asked.extend((text, continued["primary_intent"]) for _, text, _, continued in items)
        return [1.0] * len(items)

    chain = Chain([reading_tier()], followup=always)
    res = chain.classify("and tomorrow?", context=["Where can I eat kebab in Kadıköy?", "Will it rain today?"])
    # the second turn took restaurant first, so the third continues restaurant, not the second turn's own weather
    assert asked == [("Will it rain today?", "restaurant"), ("and tomorrow?", "restaurant")]
    assert res["primary_intent"] == "restaurant"


def test_no_topic_to_continue_asks_nothing():
    asked: list = []
    chain = Chain([reading_tier()], followup=lambda items: asked.extend(items) or [1.0] * len(items))
    res = chain.classify("and tomorrow?", context=["thanks a lot!"])  # social talk carries no topic
    assert asked == [] and (res["primary_intent"], res["context_used"]) == ("general", False)


class PairReader:
    """An encoder stand-in whose reading of a pair is given: DISTRIBUTION[pair text]."""

    def __init__(self, readings: dict[str, dict[str, float]]) -> None:
        self.readings, self.read = readings, []

    def distributions(self, texts):
        import numpy as np

        from mlx_intent.schema import INTENTS

        self.read += texts
        p = np.full((len(texts), len(INTENTS)), 1e-3)
        for row, text in zip(p, texts):
            for name, v in self.readings[text].items():
                row[INTENTS.index(name)] = v
        return p, np.zeros_like(p)


def test_the_pair_detector_weighs_the_continued_intent_against_the_own():
    reader = PairReader(
        {
            "Will it rain today? </s> and tomorrow?": {"weather": 0.6, "general": 0.2},
            "Will it rain today? </s> Where can I eat kebab in Kadıköy?": {"restaurant": 0.9, "weather": 0.05},
        }
    )
    chain = Chain([reading_tier()], followup=pair_detector(reader))
    follow = chain.classify("and tomorrow?", context=["Will it rain today?"])
    new = chain.classify("Where can I eat kebab in Kadıköy?", context=["Will it rain today?"])
    assert (follow["primary_intent"], follow["context_used"]) == ("weather", True)
    assert follow["confidence"] == pytest.approx(0.9 * 0.6 / 0.8, abs=1e-4)  # the topic's, times P(continues)
    assert (new["primary_intent"], new["context_used"]) == ("restaurant", False)
    same = Chain([reading_tier()], followup=pair_detector(reader)).classify(
        "Will it rain today?", context=["Will it rain today?"]
    )
    assert same["context_used"] is False  # a turn that says the topic itself keeps its own answer
    assert "Will it rain today? </s> Will it rain today?" not in reader.read


def test_an_encoder_that_never_read_a_conversation_leaves_it_to_the_rule():
    reader = PairReader({"Will it rain today? </s> and tomorrow?": {"general": 0.9, "weather": 0.05}})
    item = (("Will it rain today?",), "and tomorrow?", {"primary_intent": "general"}, {"primary_intent": "weather"})
    reader.record, reader.head_dir = {"training": {"pairs": 0}}, "old-head"
    with pytest.warns(UserWarning, match="old-head was trained on no conversation"):
        assert learned_detector(lambda: reader)([item]) == [1.0]  # the rule: no cue, and short
    reader.record = {"training": {"pairs": 12}}
    assert learned_detector(lambda: reader)([item]) == [pytest.approx(0.05 / 0.95)]  # the pair reads general


def test_a_failed_encoder_load_is_tried_again():
    reader = PairReader({"Will it rain today? </s> and tomorrow?": {"general": 0.9, "weather": 0.05}})
    reader.record, reader.head_dir = {"training": {"pairs": 12}}, "head"
    loads = [RuntimeError("encoder busy"), reader]

    def load():
        got = loads.pop(0) if len(loads) > 1 else loads[0]
        if isinstance(got, Exception):
            raise got
        return got

    detect = learned_detector(load)
    item = (("Will it rain today?",), "and tomorrow?", {"primary_intent": "general"}, {"primary_intent": "weather"})
    with pytest.warns(UserWarning, match="encoder busy"):
        assert detect([item]) == [1.0]  # the rule, this once
    assert detect([item]) == [pytest.approx(0.05 / 0.95)]  # the encoder, once it loads


def test_a_conversation_row_is_read_as_its_pair_and_requests_are_paired_as_they_are():
    follow = {"context": ["Will it rain today?", "ok"], "text": "and tomorrow?", "primary_intent": "weather"}
    assert encoder_text(follow) == "Will it rain today? </s> ok </s> and tomorrow?"
    assert encoder_text({"text": "and tomorrow?", "context": []}) == "and tomorrow?"
    long = encoder_text({"text": "and tomorrow?", "context": ["x" * 1000, "Will it rain today?"]})
    assert long.endswith("Will it rain today? </s> and tomorrow?") and len(long) < 300  # the turn always fits
    single = [
        {"text": f"request {i}", "primary_intent": "restaurant", "all_intents": ["restaurant"]} for i in range(5)
    ] + [{"text": "hi", "primary_intent": "greeting", "all_intents": ["greeting"]}]
    pairs = request_pairs([follow], single, n=10)
    assert sorted(r["text"] for r in pairs) == ["hi", *(f"request {i}" for i in range(5))]  # each once
    assert all(r["context"] == follow["context"] for r in pairs)
    assert {(r["text"], r["primary_intent"], r["kind"]) for r in pairs if r["text"] in ("hi", "request 0")} == {
        ("hi", "greeting", "social"),
        ("request 0", "restaurant", "new_request"),
    }
    assert request_pairs([], single, n=10) == []


def test_train_e5_reads_a_conversation_set_as_pairs(monkeypatch, clean_settings, tmp_path):
    import mlx_intent.tuner.encoder as tuner_encoder

    seen = {}

    def stop(tokenizer, texts):
        seen["texts"] = texts
        raise ValueError("stop here")

    monkeypatch.setattr(tuner_encoder, "encode_ids", stop)
    monkeypatch.setattr(tuner_encoder, "install", lambda *a: pytest.fail("nothing is installed"))
    import mlx_intent.encoder as encoder

    monkeypatch.setattr(encoder, "HEAD_DIR", tmp_path / "no-head")
    out = CliRunner().invoke(
        main, ["train", "e5-small", "--data", "train", "--data", "context-train", "--calib", "calib"]
    )
    assert "stop here" in out.output
    from mlx_intent.evaluation.data import data_path, read_labelled

    conversation = read_labelled(data_path("context-train", home=settings_home()))
    assert {encoder_text(r) for r in conversation} <= set(seen["texts"])
    assert sum(" </s> " in t for t in seen["texts"]) >= len(conversation) + 100  # and requests after a context


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
    from mlx_intent.batch_io import read_lines

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "and tomorrow?", "context": context}) + "\n", encoding="utf-8")
    try:
        [(_, _, _, _, read)] = list(read_lines(str(path), set()))
    except InputError as e:
        assert str(e).startswith(f"{path}:1: ") and context_problem(context) is not None
    else:  # read only what the rule accepts (no context at all reads as none)
        assert context is None or context_problem(context) is None
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
