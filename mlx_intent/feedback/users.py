"""Per-user thresholds: a user's ``min_confidence`` and ``margin`` overrides in the store's ``users`` table,
set by hand (``set_user``) or learned from that user's judged records (``learn_user_thresholds``); the chain
reads them per request (``user_thresholds``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_intent.errors import InputError
from mlx_intent.feedback.store import Store, open_store
from mlx_intent.results import FeedbackError, check_user
from mlx_intent.settings import number_parser

MIN_USER_RECORDS = 20  # judged records of a user before their thresholds are learned
THRESHOLDS = ("min_confidence", "margin")


def check_thresholds(min_confidence: object = None, margin: object = None) -> dict[str, float | None]:
    """``min_confidence`` in (0, 1] and ``margin`` in [0, 1] (None: unset), parsed as the settings parse them."""
    parsers = {"min_confidence": number_parser(float, 0, 1, low_open=True), "margin": number_parser(float, 0, 1)}
    out: dict[str, float | None] = {}
    for name, value in zip(THRESHOLDS, (min_confidence, margin)):
        try:
            out[name] = None if value is None else parsers[name](value)
        except ValueError as e:
            bound = "in (0, 1]" if name == "min_confidence" else "in [0, 1]"
            raise FeedbackError(f"{name} {value!r}: {e} ({bound})") from None
    return out


def set_user(
    store: Store, user: str, min_confidence: float | None = None, margin: float | None = None, *, learned_from=None
) -> dict[str, Any]:
    """Set a user's thresholds (a None keeps the stored value); the user's row as ``get_user`` gives it."""
    from datetime import datetime, timezone

    check_user(user)
    values = check_thresholds(min_confidence, margin)
    ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    with store.write() as db:
        db.execute(
            "INSERT INTO users (id, min_confidence, margin, learned_from, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET min_confidence = coalesce(excluded.min_confidence, min_confidence), "
            "margin = coalesce(excluded.margin, margin), learned_from = excluded.learned_from, "
            "updated = excluded.updated",
            (user, values["min_confidence"], values["margin"], learned_from, ts),
        )
    return get_user(store, user)  # type: ignore[return-value]


def get_user(store: Store | None, user: str) -> dict[str, Any] | None:
    """The user's row {id, min_confidence, margin, learned_from, updated}, or None for an unknown user."""
    if store is None:
        return None
    rows = store.read("SELECT * FROM users WHERE id = ?", (user,))
    return rows[0] if rows else None


def list_users(store: Store | None) -> list[dict[str, Any]]:
    return [] if store is None else store.read("SELECT * FROM users ORDER BY id")


def delete_user(store: Store, user: str) -> bool:
    """Forget a user's thresholds (their records stay); whether there were any."""
    with store.write() as db:
        return db.execute("DELETE FROM users WHERE id = ?", (user,)).rowcount > 0


def user_records(store: Store, user: str) -> list[dict[str, Any]]:
    """The judged results of ``user``: {confidence, margin, correct}."""
    return store.read(
        "SELECT r.confidence, r.margin, f.correct FROM feedback f JOIN results r ON r.id = f.id WHERE r.user = ?",
        (user,),
    )


def _best_cut(records: list[dict], key: str) -> tuple[float, int]:
    """The cut on ``key`` that maximizes right minus wrong among the records at or above it (a wrong answer
    accepted costs what a right one gains; one below the cut goes to the next tier, in the end ``general``);
    ties go to the lower cut, which keeps more answers.  (cut, score)."""
    cuts = sorted({float(r[key]) for r in records})
    best = (cuts[0], -len(records) - 1)
    for cut in cuts:
        score = sum(1 if r["correct"] else -1 for r in records if float(r[key]) >= cut)
        if score > best[1]:
            best = (cut, score)
    return best


def learn_user_thresholds(store: Store, user: str, minimum: int = MIN_USER_RECORDS) -> dict[str, Any]:
    """Fit ``user``'s min_confidence on their judged records (confirmed or corrected), then the margin on those
    it accepts, each by ``_best_cut``; store them.  An InputError below ``minimum`` records."""
    check_user(user)
    records = user_records(store, user)
    if len(records) < minimum:
        raise InputError(
            f"user {user}: {len(records)} judged records, at least {minimum} needed to learn thresholds "
            "(results are recorded with their user; feedback add judges them)"
        )
    p, _ = _best_cut(records, "confidence")
    accepted = [r for r in records if float(r["confidence"]) >= p]
    margin, _ = _best_cut(accepted, "margin")
    kept = [r for r in accepted if float(r["margin"]) >= margin]
    row = set_user(store, user, max(round(p, 4), 1e-4), round(margin, 4), learned_from=len(records))
    return {
        **row,
        "records": len(records),
        "accuracy_before": sum(r["correct"] for r in records) / len(records),
        "accepted": len(kept),
        "accuracy_accepted": sum(r["correct"] for r in kept) / len(kept) if kept else None,
    }


def user_thresholds(home: Path) -> Callable[[str], dict[str, float] | None]:
    """A lookup for the chain: a user's overrides {min_confidence?, margin?} from the store of ``home``, or None
    for an unknown user (the defaults apply).  The store is opened on first need, once it exists."""
    opened: list[Store] = []
    lock = threading.Lock()

    def lookup(user: str) -> dict[str, float] | None:
        with lock:
            if not opened:
                store = open_store(home, create=False)
                if store is None:
                    return None
                opened.append(store)
        row = get_user(opened[0], user)
        if row is None:
            return None
        return {k: float(row[k]) for k in THRESHOLDS if row[k] is not None} or None

    return lookup
