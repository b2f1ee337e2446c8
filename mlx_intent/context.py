"""Conversations: a turn that only continues the previous one takes the intent it continues.

"and tomorrow?" after "Will it rain today?" is weather, though it names no weather of its own.  The chain
(mlx_intent/chain.py) classifies every turn on its own first, each earlier turn as the conversation stood
then, and a turn that *reads as a follow-up* takes the topic of the newest earlier turn that was not social
talk (``topic``); a turn with a request of its own, or social talk after a request, keeps its own answer.

Whether a turn reads as a follow-up is learned where the e5-small tier runs: the encoder is trained on turns
read in their conversation (``pair_text``: the earlier turns, a separator, the turn) as well as alone
(tuner/encoder.py), and a turn continues the earlier answer when its pair reads more as that answer's intent
than as its own (``pair_detector``).  Without the encoder (the keyword chain) a frozen rule stands in: the
keyword tier found no cue of its own, and the turn is short or opens with one of a few follow-up words
(``MARKERS``).  The training rows of conversations (the pairs, their augmentation) are tuner/augment.py's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from mlx_intent.normalize import MAX_TEXT_CHARS, SEPARATOR, normalize, text_problem
from mlx_intent.schema import FALLBACK_INTENT, INTENTS, MAX_INTENTS, SOCIAL_INTENT

MAX_CONTEXT_TURNS = 5  # earlier turns a request may carry, and a server session keeps
CONTEXT_CHARS = 240  # of the earlier turns the encoder reads before a turn (pair_text)
SHORT_WORDS = 3  # the rule: a turn this short with no cue of its own is elliptical

# The rule's openers, folded (normalize): how a traveller continues a question in each language.
MARKERS = {
    "en": ("and", "what about", "how about", "also", "same for"),
    "tr": ("ya", "peki", "bir de", "ayrica", "ve"),
    "ar": ("و", "وماذا", "ماذا عن", "وهل", "وكم"),
    "fr": ("et", "et pour", "quid", "pareil"),
    "de": ("und", "was ist mit", "wie ist es mit", "auch"),
    "ru": ("а", "и", "а как", "а если", "тоже"),
}
_OPENERS = tuple(sorted({m for ms in MARKERS.values() for m in ms}, key=len, reverse=True))

Context = tuple[str, ...]
# (earlier turns, turn, the turn's own answer, the answer it would continue: ``topic``)
Item = tuple[Context, str, dict, dict]
Detector = Callable[[list[Item]], list[float]]  # -> P(the turn continues that answer)


def context_problem(context: object) -> str | None:
    """Why ``context`` cannot be a request's earlier turns, or None: a list of at most MAX_CONTEXT_TURNS texts,
    each by the rule of a query's text (normalize.text_problem, at most MAX_TEXT_CHARS)."""
    if not isinstance(context, (list, tuple)):
        return "context must be a list of earlier turns (texts, oldest first)"
    if len(context) > MAX_CONTEXT_TURNS:
        return f"context holds {len(context)} turns, at most {MAX_CONTEXT_TURNS}"
    for i, turn in enumerate(context):
        if not isinstance(turn, str):
            return f"context turn {i + 1} is not a text"
        if len(turn) > MAX_TEXT_CHARS:
            return f"context turn {i + 1} is longer than {MAX_TEXT_CHARS} characters"
        if (problem := text_problem(turn)) is not None:
            return f"context turn {i + 1}: {problem}"
    return None


def opens_as_follow_up(text: str) -> bool:
    """The turn opens with a follow-up word ("and", "ya", "و", "et", "und", "а"), or is SHORT_WORDS or fewer."""
    folded = normalize(text)
    words = folded.split()
    if len(words) <= SHORT_WORDS:
        return True
    if folded.startswith("و") and not folded.startswith("وين"):  # Arabic joins "and" to the word it opens
        return True
    return any(folded == m or folded.startswith(m + " ") for m in _OPENERS)


def rule_detector(items: list[Item]) -> list[float]:
    """The keyword chain's test: no cue of its own (its answer is ``general``) and it opens as a follow-up."""
    return [float(raw.get("primary_intent") == FALLBACK_INTENT and opens_as_follow_up(t)) for _, t, raw, _ in items]


def topic(earlier: Sequence[dict]) -> dict | None:
    """The answer a follow-up continues: the newest earlier turn's that named a need (not social talk, not
    ``general``: a turn with no cue of its own, "I want to see the city lights", carries no topic on), else
    the newest that was not social talk ("How do I pay?" then "cards everywhere?" continue ``general``)."""
    talk = [r for r in earlier if r.get("primary_intent") != SOCIAL_INTENT]
    return next((r for r in reversed(talk) if r.get("primary_intent") != FALLBACK_INTENT), talk[-1] if talk else None)


def inherit(raw: dict, continued: dict, p: float) -> dict:
    """The turn's answer as the continuation of ``continued``: its intents, its confidence times ``p``."""
    names = [n for n in continued.get("all_intents", []) if n != SOCIAL_INTENT] or [continued["primary_intent"]]
    kept = {k: v for k, v in raw.items() if k != "top"}  # the turn's own top-5 is not what decided it
    return {
        **kept,
        "primary_intent": continued["primary_intent"],
        "confidence": round(float(continued["confidence"]) * p, 4),
        "all_intents": names[:MAX_INTENTS],
        "context_used": True,
    }


def pair_text(context: Context, text: str) -> str:
    """The turn in its conversation as the encoder reads it: the earlier turns (their last CONTEXT_CHARS; the
    encoder cuts more of the oldest where they still take too many tokens, encoder.encode_ids), each followed
    by a separator, then the turn.  All of them, since the newest earlier turn is often only a detail ("Asian
    side if possible") of the request a follow-up continues."""
    return f"{SEPARATOR.join(context)[-CONTEXT_CHARS:]}{SEPARATOR}{text}"


def pair_detector(encoder) -> Detector:
    """The encoder's own reading of the turn in its conversation (trained on pairs, tuner/encoder.py): the turn
    continues the earlier answer when ``earlier turns </s> turn`` reads more as that answer's intent than as
    the turn's own: P = p(continued) / (p(continued) + p(own)) >= 0.5.  The decision does not depend on the
    temperature; P, which scales the continued answer's confidence, is read at the calibrated one."""

    def detect(items: list[Item]) -> list[float]:
        out = [0.0] * len(items)  # a turn that says the topic itself keeps its own answer
        ask = [i for i, (_, _, raw, cont) in enumerate(items) if raw["primary_intent"] != cont["primary_intent"]]
        if ask:
            probs, _ = encoder.distributions([pair_text(items[i][0], items[i][1]) for i in ask])
            for i, p in zip(ask, probs):
                a = p[INTENTS.index(items[i][3]["primary_intent"])]
                b = p[INTENTS.index(items[i][2]["primary_intent"])]
                out[i] = float(a / (a + b))
        return out

    return detect


def learned_detector(load_encoder: Callable[[], object]) -> Detector:
    """The pair test on the encoder ``load_encoder()`` gives, once it loads with a head trained on conversations
    (its head.json counts pairs); until then the rule, warned once.  A failed load is tried again on the next
    call: ``load_encoder`` has its own back-off, and a transient failure must not cost the test for good."""
    state: dict = {}

    def detect(items: list[Item]) -> list[float]:
        if "test" not in state:
            try:
                encoder = load_encoder()
            except Exception as e:  # no encoder now: the rule answers this time
                return _rule_instead(state, e, items)
            if not encoder.record.get("training", {}).get("pairs"):  # a head that never read a conversation
                state["test"] = rule_detector
                return _rule_instead(state, f"{encoder.head_dir} was trained on no conversation", items)
            state["test"] = pair_detector(encoder)
        return state["test"](items)

    return detect


def _rule_instead(state: dict, why: object, items: list[Item]) -> list[float]:
    if not state.get("warned"):
        warnings.warn(f"e5-small cannot read conversations, using the keyword rule: {why}", stacklevel=3)
        state["warned"] = True
    return rule_detector(items)
