"""Learning from the feedback records: training and calibration rows, the active-learning queue, accuracy.

``fold_feedback`` adds the records to training rows (each one ``FEEDBACK_WEIGHT`` times, replacing written rows
of the same text); ``calibration_rows`` gives calibration; the two never share a record (a stable hash of the
text assigns each to one part, as the public corpora are split), so a tier is never calibrated on what it was
trained on.  ``tuner.recalibrate.Recalibrator`` refits a serving tier's calibration from that part after every
N new records and swaps it in without a restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_intent.errors import InputError
from mlx_intent.feedback.store import Store, db_path, list_feedback, open_store

FEEDBACK_WEIGHT = 3  # a correction counts this many written rows in training
CALIB_SHARE = 0.25  # of the records (by a hash of the text): calibration; the rest: training
MIN_CALIBRATION_RECORDS = 30  # fewer and a refit would follow noise
# The active-learning queue ranks by margin between the top two intents, less these for the other signals.
DISAGREEMENT_BONUS, CONTEXT_BONUS = 0.5, 0.25


# ---- training and calibration rows --------------------------------------------------------------


def part_of(text: str) -> str:
    """``calib`` or ``train``: a stable hash of the normalized text, so a record never changes part and two
    records of one text share it."""
    from mlx_intent.corpora.build import hash_fraction, text_key

    return "calib" if hash_fraction(text_key(text)) < CALIB_SHARE else "train"


def export_rows(store: Store) -> list[dict[str, Any]]:
    """Every feedback record as a labelled row (what ``read_labelled``, ``train --data`` and ``eval`` read),
    with its part, the answer it judged, its context and user; oldest first."""
    out = []
    for r in reversed(list_feedback(store)):
        out.append(
            {
                "id": r["id"],
                "text": r["text"],
                "lang": r["lang"],
                "primary_intent": r["primary_intent"],
                "all_intents": r["all_intents"],
                "context": r["context"],
                "user": r["user"],
                "part": part_of(r["text"]),
                "correct": r["correct"],
                "answer": {
                    "primary_intent": r["answer"],
                    "confidence": r["confidence"],
                    "all_intents": r["answer_all"],
                },
                "tier": r["tier"],
                "ts": r["ts"],
            }
        )
    return out


def feedback_rows(store: Store | None, part: str | None = None) -> list[dict[str, Any]]:
    """Labelled rows of the records (of ``part``, ``train`` or ``calib``; None: all), ``_source`` feedback."""
    if store is None:
        return []
    keep = ("id", "text", "lang", "primary_intent", "all_intents", "context")
    return [
        {**{k: r[k] for k in keep}, "_source": "feedback"}
        for r in export_rows(store)
        if part is None or r["part"] == part
    ]


def training_rows(home: Path) -> list[dict[str, Any]]:
    """The training part of the records, for ``train --with-feedback``; an InputError when there is none."""
    path = db_path(home)
    rows = feedback_rows(open_store(home, create=False), "train")
    if not rows:
        raise InputError(
            f"--with-feedback: no feedback records to train on in {path} (the training part: "
            f"{1 - CALIB_SHARE:.0%} of them by a hash of the text)"
        )
    return rows


def calibration_part(store: Store | None) -> list[dict[str, Any]]:
    """The calibration part's records of turns without earlier turns.  A tier's confidence is calibrated for a
    turn read on its own, and a follow-up's label is the intent it continues, which the turn alone does not say
    (so it would teach the tier that its right answers are wrong)."""
    return [r for r in feedback_rows(store, "calib") if not r.get("context")]


def calibration_rows(home: Path, minimum: int | None = None) -> list[dict[str, Any]]:
    """The calibration part of the records (``calibration_part``), for ``calibrate --from-feedback``; an
    InputError below ``minimum`` (default MIN_CALIBRATION_RECORDS)."""
    minimum = MIN_CALIBRATION_RECORDS if minimum is None else minimum
    rows = calibration_part(open_store(home, create=False))
    if len(rows) < minimum:
        raise InputError(
            f"--from-feedback: {len(rows)} records in the calibration part of {db_path(home)}, at least {minimum} "
            f"needed (that part is {CALIB_SHARE:.0%} of the records, by a hash of the text; the rest trains; "
            "turns with earlier turns do not count)"
        )
    return rows


def fold_feedback(rows: list[dict], feedback: list[dict], weight: int = FEEDBACK_WEIGHT) -> list[dict]:
    """Training rows with the feedback records folded in: a written row whose text, after the same earlier
    turns, a record judged is dropped (the correction says what it means there; "and on Sunday?" means one
    thing after each conversation), and each record counts ``weight`` times."""
    from mlx_intent.normalize import normalize

    def key(r: dict) -> tuple:
        return tuple(normalize(t) for t in r.get("context") or ()), normalize(r["text"])

    judged = {key(r) for r in feedback}
    kept = [r for r in rows if key(r) not in judged]
    return kept + [dict(r) for r in feedback for _ in range(weight)]


# ---- active learning ----------------------------------------------------------------------------


def queue(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """Recorded results without feedback, the most worth a label first: the smallest margin between the top
    two intents, less DISAGREEMENT_BONUS where tiers disagreed and CONTEXT_BONUS where context decided."""
    rows = store.read(
        f"""SELECT r.id, r.ts, r.text, r.primary_intent, r.confidence, r.all_intents, r.tier, r.margin,
            r.disagreement, r.context_used,
            r.margin - {DISAGREEMENT_BONUS} * (r.disagreement > 0) - {CONTEXT_BONUS} * r.context_used AS score
        FROM results r LEFT JOIN feedback f ON f.id = r.id WHERE f.id IS NULL
        ORDER BY score ASC, r.ts DESC LIMIT ?""",
        (limit,),
    )
    return [{**r, "all_intents": json.loads(r["all_intents"]), "context_used": bool(r["context_used"])} for r in rows]


# ---- monitoring ---------------------------------------------------------------------------------


def accuracy(store: Store | None) -> dict[str, Any]:
    """{"count", "confirmed", "corrected", "rate"}: the share of judged answers whose primary was right."""
    if store is None:
        return {"count": 0, "confirmed": 0, "corrected": 0, "rate": None}
    row = store.read("SELECT count(*) AS n, coalesce(sum(correct), 0) AS right FROM feedback")[0]
    n, right = row["n"], row["right"]
    return {"count": n, "confirmed": right, "corrected": n - right, "rate": right / n if n else None}
