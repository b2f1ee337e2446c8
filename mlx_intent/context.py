"""Conversations: a turn that only continues the previous one takes the intent it continues.

"and tomorrow?" after "Will it rain today?" is weather, though it names no weather of its own.  The chain
(mlx_intent/chain.py) classifies every turn on its own first, each earlier turn as the conversation stood
then, and a turn that *reads as a follow-up* takes the topic of the newest earlier turn that was not social
talk (``topic``); a turn with a request of its own, or social talk after a request, keeps its own answer.

Whether a turn reads as a follow-up is learned where the e5-small tier runs: a logistic head on the encoder's
embeddings of the turn and of (earlier turn, turn), trained on the context training set
(``python -m mlx_intent.context``, seconds; weights/followup/).  Without the encoder (the keyword chain) a
frozen rule stands in: the keyword tier found no cue of its own, and the turn is short or opens with one of a
few follow-up words (``MARKERS``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mlx_intent.normalize import MAX_TEXT_CHARS, normalize, text_problem
from mlx_intent.schema import FALLBACK_INTENT, MAX_INTENTS, SOCIAL_INTENT

MAX_CONTEXT_TURNS = 5  # earlier turns a request may carry, and a server session keeps
HEAD_DIR = Path(__file__).resolve().parent / "weights" / "followup"
HEAD_FILE, HEAD_RECORD = "head.npz", "head.json"
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


def features(own: np.ndarray, pair: np.ndarray, raws: list[dict], texts: list[str]) -> np.ndarray:
    """What the head reads: the turn's embedding, the (earlier turn, turn) pair's, and the turn's own answer
    (its confidence, whether it found no cue, social talk, and its length)."""
    extra = np.array(
        [
            [
                float(r.get("confidence", 0.0)),
                float(r.get("primary_intent") == FALLBACK_INTENT),
                float(r.get("primary_intent") == SOCIAL_INTENT),
                min(len(t.split()), 20) / 10,
                1.0,
            ]
            for r, t in zip(raws, texts)
        ]
    )
    return np.concatenate([own, pair, extra], axis=1)


def pair_text(context: Context, text: str) -> str:
    """The (earlier turn, turn) pair as the encoder reads it: the newest earlier turn, a separator, the turn."""
    return f"{context[-1]} </s> {text}"


def encoder_text(row: dict) -> str:
    """What the encoder reads for a labelled row: its (earlier turn, turn) pair where it has earlier turns."""
    return pair_text(tuple(row["context"]), row["text"]) if row.get("context") else row["text"]


def request_pairs(context_rows: list[dict], single_rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` single-turn requests of ``single_rows`` (not social talk), each after the earlier turns of a random
    row of ``context_rows``, labelled as they are: a request of its own stays its own after a conversation."""
    rng = np.random.default_rng(seed)
    requests = [r for r in single_rows if r["primary_intent"] != SOCIAL_INTENT]
    picked = rng.choice(len(requests), size=min(n, len(requests)), replace=False) if context_rows else []
    earlier = [list(r["context"]) for r in context_rows]
    return [{**requests[i], "context": earlier[rng.integers(len(earlier))], "kind": "new_request"} for i in picked]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 50) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method (a few hundred rows: exact and fast)."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / len(y) + l2 * w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


class FollowUpHead:
    """The learned test, on the e5-small tier's encoder (``encoder``: an EncoderClassifier)."""

    def __init__(self, encoder, folder: Path | None = None) -> None:
        from mlx_intent.encoder import head_fingerprint

        folder = Path(folder) if folder is not None else HEAD_DIR
        record = json.loads((folder / HEAD_RECORD).read_text(encoding="utf-8"))
        if record.get("encoder_head") != head_fingerprint(encoder.head_dir):
            raise ValueError(f"{folder}: trained on another e5-small head (retrain: python -m mlx_intent.context)")
        self.w = np.load(folder / HEAD_FILE)["w"]
        self.encoder = encoder

    def __call__(self, items: list[Item]) -> list[float]:
        if not items:
            return []
        texts = [t for _, t, _, _ in items]
        own = self.encoder.embeddings(texts)
        pair = self.encoder.embeddings([pair_text(c, t) for c, t, _, _ in items])
        p = 1 / (1 + np.exp(-(features(own, pair, [r for _, _, r, _ in items], texts) @ self.w)))
        return [float(x) for x in p]


def pair_detector(encoder) -> Detector:
    """The encoder's own reading of the turn in its conversation (trained on pairs, tuner/encoder.py): the turn
    continues the earlier answer when the pair ``earlier turn </s> turn`` reads more as that answer's intent
    than as the turn's own; P = p(continued) / (p(continued) + p(own))."""
    from mlx_intent.schema import INTENTS

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
    """The learned test on the encoder ``load_encoder()`` gives; the rule where it cannot load (warned once)."""
    state: dict = {}

    def detect(items: list[Item]) -> list[float]:
        if "head" not in state:
            try:
                state["head"] = FollowUpHead(load_encoder())
            except Exception as e:  # no encoder, or a head for another encoder: the rule answers
                warnings.warn(f"follow-up head unavailable, using the keyword rule: {e}", stacklevel=2)
                state["head"] = None
        head = state["head"]
        return head(items) if head is not None else rule_detector(items)

    return detect


# ---- training: python -m mlx_intent.context -----------------------------------------------------------------

L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
AUGMENT = 600  # single-turn requests of train.jsonl, each after an earlier turn of the context set: not follow-ups


def calibration_part(text: str) -> bool:
    """The fifth of the context training set (by a hash of the text) that chooses the head's L2 weight."""
    import hashlib

    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 5 == 0


def train_head(context_rows: list[dict], single_rows: list[dict], folder: Path | None = None, seed: int = 0) -> dict:
    """Fit the follow-up head on (earlier turns, turn) rows labelled follow_up or not (new_request, social), plus
    ``AUGMENT`` single-turn requests after a random earlier turn; the L2 weight is chosen on the calibration
    fifth, then the head is refitted on all rows.  Writes head.npz and head.json into ``folder``."""
    from mlx_intent.chain import build_chain
    from mlx_intent.encoder import head_fingerprint
    from mlx_intent.settings import load_settings

    chain = build_chain(load_settings(), names=["e5-small", "keyword", "general"])
    encoder = chain.tiers[0].load()
    augment = request_pairs(context_rows, single_rows, AUGMENT, seed)
    rows = [
        (tuple(r["context"]), r["text"], r["kind"] == "follow_up", calibration_part(r["text"]))
        for r in [*context_rows, *augment]
    ]
    texts = [t for _, t, _, _ in rows]
    raws = [r for a in range(0, len(texts), 64) for r in chain.classify_batch(texts[a : a + 64])]
    own = np.concatenate([encoder.embeddings(texts[a : a + 64]) for a in range(0, len(texts), 64)])
    pairs = [pair_text(c, t) for c, t, _, _ in rows]
    pair = np.concatenate([encoder.embeddings(pairs[a : a + 64]) for a in range(0, len(pairs), 64)])
    x = features(own, pair, raws, texts)
    y = np.array([f for _, _, f, _ in rows], dtype=np.float64)
    cal = np.array([c for *_, c in rows])

    def held_out(l2: float) -> float:
        w = fit_logistic(x[~cal], y[~cal], l2)
        return float(((x[cal] @ w >= 0) == (y[cal] > 0)).mean())

    scores = {l2: held_out(l2) for l2 in L2_GRID}
    l2 = max(L2_GRID, key=lambda v: (scores[v], v))
    w = fit_logistic(x, y, l2)
    folder = Path(folder) if folder is not None else HEAD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / HEAD_FILE, w=w.astype(np.float32))
    record = {
        "encoder_head": head_fingerprint(encoder.head_dir),
        "l2": l2,
        "calibration_accuracy": {str(k): round(v, 4) for k, v in scores.items()},
        "rows": len(rows),
        "follow_ups": int(y.sum()),
        "train_accuracy": round(float(((x @ w >= 0) == (y > 0)).mean()), 4),
        "trained_on": ["benchmarks/data/context-train.jsonl", f"benchmarks/data/train.jsonl ({len(augment)} rows)"],
    }
    (folder / HEAD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


if __name__ == "__main__":
    from mlx_intent.evaluation.data import data_path, read_labelled

    print(
        json.dumps(train_head(read_labelled(data_path("context-train")), read_labelled(data_path("train"))), indent=2)
    )
