"""What every result carries, for every layer: its ``id``, why tiers were passed over (``Reason``, ``PassOver``,
``fallbacks`` entries), the gap between its top two intents, and the user it was asked for.

A leaf (it imports only ``errors``), so the chain that writes these, the store that keeps them and the metrics
that count them share one definition instead of copies.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Any

from mlx_intent.errors import InputError


class Reason(str, Enum):
    """Why a tier was passed over: the ``kind`` of a ``fallbacks`` entry (its ``reason`` is the words).
    Caching, readiness and metric labels decide on the kind, never on the words."""

    NOT_INSTALLED = "not_installed"  # the model is not on disk
    TOO_LARGE = "too_large"  # the model does not fit in memory
    LOAD_FAILED = "load_failed"  # loading raised (or failed recently: backing off)
    ERROR = "error"  # the tier raised while answering
    TIMEOUT = "timeout"  # over its latency budget, or the request's time ran out
    INVALID = "invalid"  # an answer that does not follow the schema
    LOW_CONFIDENCE = "low_confidence"  # below the tier's threshold
    RULE1 = "rule1"  # the keyword tier read social words with a request (rule 1 of the guide)
    AMBIGUOUS = "ambiguous"  # its top two intents closer than the margin
    LOADING = "loading"  # still loading while the server warms up: not a run-time fallback (WARMUP)

    def __str__(self) -> str:
        return self.value


# Reasons that may not recur (a timeout under load, a crash, a load that may succeed after the back-off):
# answers given because of them are not cached, or one bad moment would pin a worse answer.
TRANSIENT = frozenset({Reason.ERROR, Reason.TIMEOUT, Reason.LOAD_FAILED, Reason.LOADING})
# Reasons that will not change while the process runs: such a tier is not the one to wait for.  Being absent
# here is a configuration fact, not a fallback: fallback rates and alerts count only the other reasons.
ABSENT = frozenset({Reason.NOT_INSTALLED, Reason.TOO_LARGE})
# Passed over because the server was still loading it: a one-time cost of starting, counted apart
# (fallback.warming), never as a run-time fallback.
WARMUP = frozenset({Reason.LOADING})
# A tier above the one that answered gave an answer that was overruled: the tiers disagreed.
DISAGREEING = frozenset({Reason.LOW_CONFIDENCE, Reason.RULE1})

MAX_REASON_CHARS = 500  # a load failure's words (mlx-lm's "Missing 8730 parameters: ..." ran to 371 KB) ride
# in every answer, log line and feedback row: cut to this


def bounded(reason: str) -> str:
    """``reason`` cut to MAX_REASON_CHARS, with an ellipsis where it was cut."""
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


class PassOver(Exception):
    """A tier declines to answer: ``kind`` (a Reason) and ``detail``, the words recorded in ``fallbacks``
    (bounded)."""

    def __init__(self, kind: Reason, detail: str):
        detail = bounded(detail)
        super().__init__(detail)
        self.kind = Reason(kind)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


def fallback(tier: str, kind: Reason, reason: str) -> dict:
    """One ``fallbacks`` entry: the tier, the reason in words (bounded), and its kind."""
    return {"tier": tier, "reason": bounded(reason), "kind": Reason(kind).value}


def new_id() -> str:
    """A result id: 128 random bits as 32 hex digits, unique and not guessable."""
    return uuid.uuid4().hex


def top_gap(raw: Mapping[str, Any]) -> float | None:
    """The gap between the two most likely intents of a tier's answer: from its distribution (``top``: the LLM
    tiers in score mode, the encoder's softmax), else from the shares of its evidence (the keyword tier's
    ``scores``); None where the tier gives no second score (generate mode, ``general``)."""
    probs = sorted((float(p) for _, p in raw.get("top") or ()), reverse=True)
    if len(probs) < 2:
        scores = [float(v) for v in (raw.get("scores") or {}).values() if float(v) > 0]
        total = sum(scores)
        if not total:
            return None
        probs = sorted((v / total for v in scores), reverse=True) + [0.0]
    return probs[0] - probs[1]


class FeedbackError(InputError):
    """A feedback request that cannot be stored (exit 2); ``status`` is its HTTP code."""

    status = 422


USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}")


def check_user(user: object) -> str:
    """A user id: 1 to 64 characters, letters, digits and ``._@:+-``, starting with a letter or digit."""
    if not isinstance(user, str) or not USER_ID.fullmatch(user):
        raise FeedbackError(
            f"user {str(user)[:80]!r}: expected 1 to 64 letters, digits or ._@:+- (starting with a letter or digit)"
        )
    return user
