"""Pure evaluation scores: accuracy, macro-F1, calibration error, Brier, Jaccard, McNemar's test.

Plain functions over lists and arrays, no model and no I/O, so each can be checked on hand-made cases.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np

from mlx_intent.metrics import percentile_sorted

ECE_BINS = 15
MCNEMAR_EXACT_BELOW = 25  # discordant pairs: below this the chi-square approximation is poor


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float | None:
    """Share of exact matches; None for no rows."""
    if not gold:
        return None
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def macro_f1(gold: Sequence[str], predicted: Sequence[str]) -> float | None:
    """Unweighted mean of per-class F1 over every class seen in gold or predictions.

    A class that is predicted but never gold scores F1 0, so spurious labels cost something."""
    pairs = list(zip(gold, predicted, strict=True))
    classes = sorted(set(gold) | set(predicted))
    if not classes:
        return None
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in pairs)
        fp = sum(g != c and p == c for g, p in pairs)
        fn = sum(g == c and p != c for g, p in pairs)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def jaccard(a: Collection[str], b: Collection[str]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets agree fully."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def bin_index(conf: np.ndarray, bins: int) -> np.ndarray:
    """Each confidence's equal-width bin: bin i holds (i/bins, (i+1)/bins], and 0 goes to the first."""
    return np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)


def reliability(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: edges, count, mean confidence and accuracy (None when empty).

    Bin i holds (i/bins, (i+1)/bins]; a confidence of exactly 0 goes to the first bin."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    index = bin_index(conf, bins)
    rows = []
    for i in range(bins):
        mask = index == i
        n = int(mask.sum())
        rows.append(
            {
                "low": i / bins,
                "high": (i + 1) / bins,
                "count": n,
                "confidence": float(conf[mask].mean()) if n else None,
                "accuracy": float(hit[mask].mean()) if n else None,
            }
        )
    return rows


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    n = len(confidence)
    if not n:
        return None
    table = reliability(confidence, correct, bins)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])


def ece_floor(
    confidence: Sequence[float], bins: int = ECE_BINS, draws: int = 400, seed: int = 0
) -> tuple[float, float] | None:
    """(mean, 95th percentile) of the ECE that a perfectly calibrated model with these confidences shows on
    this many rows: each row right with probability its confidence, ``draws`` times.

    ECE is biased upward on small sets, so a per-language ECE is read against this floor: 0.03 on 200 rows
    can be what perfect calibration looks like, while on 2,000 rows it is a miscalibration."""
    conf = np.asarray(confidence, dtype=np.float64)
    n = len(conf)
    if not n:
        return None
    index = bin_index(conf, bins)
    conf_sum = np.bincount(index, weights=conf, minlength=bins)
    hits = np.random.default_rng(seed).random((draws, n)) < conf
    hit_sum = np.stack([np.bincount(index, weights=h, minlength=bins) for h in hits])
    values = np.abs(hit_sum - conf_sum).sum(axis=1) / n  # sum over bins of count/n * |acc - conf|
    return float(values.mean()), float(np.percentile(values, 95))


def brier_binary(confidence: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Mean (confidence - correct)^2: the Brier score of the primary's confidence alone."""
    if not len(confidence):
        return None
    conf = np.asarray(confidence, dtype=np.float64)
    return float(np.mean((conf - np.asarray(correct, dtype=np.float64)) ** 2))


def brier_multiclass(probs: np.ndarray, gold_index: Sequence[int]) -> float | None:
    """Mean over rows of sum_k (p_k - [k is gold])^2 on full distributions (rows of ``probs``); 0..2."""
    probs = np.asarray(probs, dtype=np.float64)
    if not len(probs):
        return None
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(probs)), np.asarray(gold_index)] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def nll(probs: np.ndarray, gold_index: Sequence[int]) -> float:
    """Mean negative log-probability of the gold class (probabilities floored at 1e-300)."""
    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[np.arange(len(probs)), np.asarray(gold_index)]
    return float(-np.mean(np.log(np.maximum(picked, 1e-300))))


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """McNemar's test of paired correctness: is A's accuracy different from B's on the same rows?

    Only discordant pairs count: b = A right and B wrong, c = A wrong and B right.  Under the null
    each is equally likely, so with fewer than MCNEMAR_EXACT_BELOW discordant pairs the two-sided
    exact binomial p-value is used, else chi-square (1 df) with continuity correction."""
    pairs = list(zip(a_correct, b_correct, strict=True))
    b = sum(x and not y for x, y in pairs)
    c = sum(y and not x for x, y in pairs)
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "method": "exact", "statistic": None, "p": 1.0}
    if n < MCNEMAR_EXACT_BELOW:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
        return {"b": b, "c": c, "method": "exact", "statistic": None, "p": min(1.0, 2 * tail)}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "method": "chi2-cc", "statistic": stat, "p": math.erfc(math.sqrt(stat / 2))}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    return percentile_sorted(sorted(float(v) for v in values), q)
