"""Fit the scoring temperature and the multi-intent threshold on labelled data (``mlx-intent calibrate``).

The classifier turns logits into probabilities at every branch point of the intent-name token trie with
softmax(logits / T).  Since softmax(l / T) is softmax(l) ** (1 / T) renormalised, the distribution at any
T follows exactly from the one at T = 1 and the trie's shape: the model runs once, the fit is cheap, and
one run at the fitted T confirms it.  The result goes to ``calibration.json`` beside the model's
adapter (else in its folder), which IntentClassifier reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from mlx_intent import calibration
from mlx_intent.calibration import T_RANGE
from mlx_intent.evaluation import scores
from mlx_intent.evaluation.report import num, pct, shown
from mlx_intent.schema import INTENTS, MAX_INTENTS

THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 11))  # 0.05 .. 0.5
Tree = list  # nested lists of intent indices: one list per branch point of the trie


def trie_tree(node) -> Tree | int:
    """The branch structure of the sampler's name trie below ``node``: an intent index at a leaf, else the
    list of the children's trees (chains of single children collapse: they branch nowhere)."""
    while node.leaf is None and len(node.children) == 1:
        node = next(iter(node.children.values()))
    if node.leaf is not None:
        return INTENTS.index(node.leaf)
    return [trie_tree(child) for child in node.children.values()]


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def _leaves(tree: Tree | int) -> list[int]:
    return [tree] if isinstance(tree, int) else [i for child in tree for i in _leaves(child)]


def temper(probs: np.ndarray, temperature: float, tree: Tree | None = None) -> np.ndarray:
    """The distributions at ``temperature`` from those at T = 1 (rows of ``probs``).

    At each branch point the children's probabilities q (their subtrees' mass over the node's) become
    q ** (1 / T) renormalised; a flat ``tree`` (the default) is p ** (1 / T) renormalised."""
    logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-300))
    tree = list(range(logp.shape[1])) if tree is None else tree
    out = np.empty_like(logp)

    def walk(node: Tree | int, base: np.ndarray) -> None:
        if isinstance(node, int):
            out[:, node] = base
            return
        mass = np.stack([_logsumexp(logp[:, _leaves(child)]) for child in node], axis=1)
        scaled = (mass - _logsumexp(mass)[:, None]) / temperature
        scaled -= _logsumexp(scaled)[:, None]
        for child, column in zip(node, scaled.T):
            walk(child, base + column)

    walk(tree, np.zeros(len(logp)))
    return np.exp(out)


def fit_temperature(probs: np.ndarray, gold: list[int], tree: Tree | None = None) -> float:
    """T in T_RANGE minimising the NLL of the gold intents; golden-section search over log T.

    The NLL is convex in 1 / T (a log-sum-exp of terms linear in it, per branch point), so it has one
    minimum along log T and the search cannot stop in a false one."""
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])

    def loss(log_t: float) -> float:
        return scores.nll(temper(probs, math.exp(log_t), tree), gold)

    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-4:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def intents_at(row: np.ndarray, threshold: float, max_intents: int) -> set[str]:
    """all_intents as the classifier writes it: the primary, then up to max_intents - 1 more at or above
    ``threshold``, in order of probability."""
    ranked = np.argsort(-row, kind="stable")
    return {INTENTS[ranked[0]], *(INTENTS[i] for i in ranked[1:max_intents] if row[i] >= threshold)}


def set_match(probs: np.ndarray, gold: list[set[str]], threshold: float, max_intents: int) -> float:
    """Share of rows whose all_intents at ``threshold`` equals the gold set."""
    return sum(intents_at(row, threshold, max_intents) == g for row, g in zip(probs, gold)) / len(gold)


def fit_threshold(probs: np.ndarray, gold: list[set[str]], max_intents: int, default: float) -> float:
    """The grid threshold with the best all_intents exact match over all rows.

    All rows, not only the multi-intent ones: on those alone the lowest threshold always wins, paid
    for by extra intents on every single-intent row.  Ties go to the value nearest ``default``."""
    return max(THRESHOLDS, key=lambda t: (set_match(probs, gold, t, max_intents), -abs(t - default)))


def fit_platt(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """(a, b) of sigmoid(a * logit(c) + b) by maximum likelihood (Newton's method; the NLL of a
    logistic regression is convex).  Used for the keyword tier, whose confidence is a score."""
    c = np.clip(np.asarray(confidence, dtype=np.float64), 1e-6, 1 - 1e-6)
    x = np.stack([np.log(c / (1 - c)), np.ones_like(c)], axis=1)
    y = np.asarray(correct, dtype=np.float64)
    w = np.array([1.0, 0.0])
    for _ in range(100):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y)
        hess = x.T @ (x * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def platt(confidence: np.ndarray, a: float, b: float) -> np.ndarray:
    """The keyword tier's Platt scaling (``keyword.platt_scale``) over an array."""
    from mlx_intent.keyword import platt_scale

    return np.array([platt_scale(float(c), a, b) for c in np.asarray(confidence).ravel()])


def cross_validated_ece(confidence: np.ndarray, correct: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """ECE of Platt scaling fitted on the other folds: what the fit does on rows it has not seen."""
    order = np.random.default_rng(seed).permutation(len(confidence))
    out = np.empty(len(confidence))
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        out[test] = platt(confidence[test], *fit_platt(confidence[train], correct[train]))
    return scores.ece(out, correct)


def calibrate_keyword(path, rows: list[dict], home: Path, report: Callable[[str], None]) -> None:
    """Platt scaling of the keyword tier's confidence, saved under the models home (``home``) with the
    fingerprint of the lexicons it was fitted for; the tier prefers it to the packaged fit.  ``report`` says
    the figures (the CLI: click.echo); the library prints nothing itself."""
    from mlx_intent import keyword

    results = [keyword.classify_keywords(r["text"]) for r in rows]
    conf = np.array([r["confidence"] for r in results])
    correct = np.array([res["primary_intent"] == r["primary_intent"] for res, r in zip(results, rows)])
    a, b = fit_platt(conf, correct)
    fitted = platt(conf, a, b)
    record = {
        "platt": [round(a, 6), round(b, 6)],
        "fitted_on": shown(path),
        "n": len(rows),
        "accuracy": round(float(correct.mean()), 4),
        "ece_before": round(scores.ece(conf, correct), 4),
        "ece_after": round(scores.ece(fitted, correct), 4),
        "ece_after_5fold": round(cross_validated_ece(conf, correct), 4),
        "lexicons": keyword.lexicon_fingerprint(),
    }
    written = calibration.write(calibration.home_file(keyword.FIT_NAME, home), record)
    accuracy = pct(float(correct.mean()))
    report(f"keyword tier on {len(rows)} rows: accuracy {accuracy}, Platt a = {a:.4f}, b = {b:.4f}")
    report(f"{'':<24}{'raw':>10}{'fitted':>10}")
    report(f"{'ECE (15 bins)':<24}{num(record['ece_before']):>10}{num(record['ece_after']):>10}")
    before, after = num(scores.brier_binary(conf, correct)), num(scores.brier_binary(fitted, correct))
    report(f"{'Brier (binary)':<24}{before:>10}{after:>10}")
    report(f"{'mean confidence':<24}{num(conf.mean()):>10}{num(fitted.mean()):>10}")
    report(f"ECE of a fit on the other 4 of 5 folds: {num(record['ece_after_5fold'])}")
    report(f"wrote {written}")


@contextmanager
def every_branch() -> Iterator[None]:
    """Let the classifier evaluate every deeper branch point.  One it skips for want of mass is split
    evenly, and tempering keeps an even split even, while classify at the fitted T evaluates it once its
    mass has grown past the skip line: the T = 1 pass must see the real split."""
    from mlx_intent import classifier

    saved = classifier.SKIP_MASS
    classifier.SKIP_MASS = 0.0
    try:
        yield
    finally:
        classifier.SKIP_MASS = saved


def _distributions(clf, texts: list[str], batch_size: int, desc: str) -> np.ndarray:
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(texts), unit="q", desc=desc, disable=None) as bar:
        for i in range(0, len(texts), batch_size):
            batch = texts[i : i + batch_size]
            rows += [[d[name] for name in INTENTS] for d in clf.distributions(batch)]
            bar.update(len(batch))
    return np.array(rows, dtype=np.float64)


def fit_scoring(clf, rows: list[dict], batch_size: int = 8, verify: bool = False) -> dict:
    """An LLM tier's temperature (NLL of the gold primary, from one pass at T = 1 over every branch point)
    and multi-intent threshold (all_intents exact match) on labelled ``rows``; ``clf`` keeps its own.

    Returns the fit with ``raw`` (T = 1) and ``fitted`` distributions, ``gold`` and ``gold_sets``; with
    ``verify`` the model runs again at the fitted T, ``fitted`` is that run and ``gap`` its largest distance
    from the fit."""
    from mlx_intent.classifier import DEFAULT_THRESHOLD

    texts = [r["text"] for r in rows]
    gold = [INTENTS.index(r["primary_intent"]) for r in rows]
    gold_sets = [set(r["all_intents"]) for r in rows]
    saved, gap = clf.temperature, None
    try:
        clf.temperature = 1.0
        with every_branch():
            raw = _distributions(clf, texts, batch_size, "T=1")
        tree = trie_tree(clf._branch)
        temperature = round(fit_temperature(raw, gold, tree), 4)
        fitted = temper(raw, temperature, tree)
        if verify:
            clf.temperature = temperature
            run = _distributions(clf, texts, batch_size, f"T={temperature:.3f}")
            gap, fitted = float(np.abs(run - fitted).max()), run
    finally:
        clf.temperature = saved
    threshold = fit_threshold(fitted, gold_sets, MAX_INTENTS, DEFAULT_THRESHOLD)
    return {
        "temperature": temperature,
        "threshold": threshold,
        "raw": raw,
        "fitted": fitted,
        "gold": gold,
        "gold_sets": gold_sets,
        "gap": gap,
    }


def scoring_figures(probs: np.ndarray, gold: list[int]) -> dict[str, float]:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(gold)
    return {
        "accuracy": float(correct.mean()),
        "nll": scores.nll(probs, gold),
        "ece": scores.ece(conf, correct),
        "brier": scores.brier_multiclass(probs, gold),
        "confidence": float(conf.mean()),
    }


SHOWN_FIGURES = (
    ("accuracy", "accuracy", pct),
    ("NLL", "nll", num),
    ("ECE (15 bins)", "ece", num),
    ("Brier (multi-class)", "brier", num),
    ("mean confidence", "confidence", num),
)


def _chain_figures(chain, texts: list[str], gold: list[int], llm: str, batch_size: int) -> dict[str, float]:
    """A chain's accuracy, ECE, the share of texts its LLM answered or helped answer, and ms a query."""
    results = []
    for i in range(0, len(texts), batch_size):
        results += chain.classify_batch(texts[i : i + batch_size])
    conf = np.array([r["confidence"] for r in results])
    correct = np.array([INTENTS.index(r["primary_intent"]) == g for r, g in zip(results, gold)])
    read = [r["tier"] == llm or any(f["tier"] == llm for f in r["fallbacks"]) for r in results]
    return {
        "accuracy": round(float(correct.mean()), 4),
        "ece": round(scores.ece(conf, correct), 4),
        "llm_read": round(float(np.mean(read)), 4),
        "ms_per_query": round(float(np.mean([r["latency_per_query_ms"] for r in results])), 1),
    }


def measure_places(clf, rows: list[dict], fitted: np.ndarray, settings, report: Callable[[str], None]) -> dict:
    """Where the LLM ``clf`` (at its fitted temperature) should go in the default chain, measured on the
    calibration split ``rows``, each place through the chain itself: (a) first,
    (b) a cascade tier after the blend, for the texts the blend is unsure of, (c) inside the blend, at a weight
    fitted by NLL on ``fitted`` (its distributions at the fitted temperature).  The most accurate place wins;
    a tie goes to the cheaper (cascade, then blend).  Returns the record calibration.read_place reads."""
    from mlx_intent import encoder
    from mlx_intent.chain import ENCODER, GENERAL, KEYWORD, blended_name, build_chain

    model, texts = clf.name, [r["text"] for r in rows]
    gold = [INTENTS.index(r["primary_intent"]) for r in rows]
    e5 = encoder.EncoderClassifier(combine=settings.combine, home=settings.home)
    blend = np.concatenate([e5.answer_distributions(texts[i : i + 64])[0] for i in range(0, len(texts), 64)])
    weight = encoder.fit_llm_weight(blend, fitted, gold)
    chains = {
        "first": [model, ENCODER, KEYWORD, GENERAL],
        "cascade": [ENCODER, model, KEYWORD, GENERAL],
        "blend": [blended_name(model), KEYWORD, GENERAL],
    }
    figures = {}
    for place, names in chains.items():
        # no latency budget: a busy machine would hand a slow tier's batches down and measure its load, not the place
        quiet = replace(settings, chain=tuple(names), cache_size=0, log=None, latency_budget_ms=None)
        chain = build_chain(quiet, llm_weights={model: weight}, recording=False)
        chain.pool.adopt(model, clf)  # the model already in memory: an 8 GB Mac holds one copy of a 3B
        figures[place] = _chain_figures(chain, texts, gold, model, settings.batch_size)
    figures["blend"]["llm_read"] = 1.0 if weight > 0 else 0.0  # inside the blend it reads every text, or none
    best = max(("cascade", "blend", "first"), key=lambda place: figures[place]["accuracy"])  # ties: the first
    report(f"where {model} goes, measured on {len(rows)} rows (blend weight {weight:g}):")
    report(f"{'place':<10}{'accuracy':>10}{'ECE':>8}{'LLM read':>10}{'ms/query':>10}")
    for place, f in figures.items():
        mark = "  <- chosen" if place == best else ""
        shown = f"{pct(f['accuracy']):>10}{num(f['ece']):>8}{pct(f['llm_read']):>10}{f['ms_per_query']:>10}"
        report(f"{place:<10}{shown}{mark}")
    return {"model": model, "place": best, "llm_weight": weight, "n": len(rows), "figures": figures}
