"""Run a chain (or one tier) over labelled data and summarize the outcome.

The chain runs exactly as ``classify`` runs it, in batches, with the query cache off so every latency is
a real one.  Scores come from the pure functions in ``scores``; ``report`` renders the summary as Markdown.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from mlx_intent.chain import Chain, Kind, build_chain, default_chain_names
from mlx_intent.errors import ModelError
from mlx_intent.evaluation import scores
from mlx_intent.evaluation.report import shown
from mlx_intent.metrics import is_absent, peak_memory_mb, peak_rss_mb, runtime_fallback
from mlx_intent.models import registry
from mlx_intent.results import ABSENT, PassOver
from mlx_intent.schema import INTENTS, KEYS, validate
from mlx_intent.settings import Settings

# ---- running ------------------------------------------------------------------------------------


def chain_names(spec: str | tuple[str, ...] | None, settings: Settings) -> tuple[str, ...]:
    """Tier names from a comma-separated spec, else the settings' chain, else the default chain."""
    if isinstance(spec, str):
        spec = tuple(n.strip() for n in spec.split(",") if n.strip())
    return tuple(spec or settings.chain or default_chain_names(settings))


def make_chain(names: tuple[str, ...], settings: Settings) -> Chain:
    """The chain of ``names`` with the query cache off, so repeated texts are timed for real."""
    try:
        return build_chain(dataclasses.replace(settings, chain=names, cache_size=0))
    except registry.UnknownModelError as e:
        raise ModelError(str(e)) from None


def use_base_models(chain: Chain) -> None:
    """Load every model tier without its LoRA adapter (the pool would load the adapter automatically)."""
    from mlx_intent.classifier import IntentClassifier

    for tier in chain.tiers:
        if tier.kind is Kind.LLM and chain.pool is not None:  # the encoder has no adapter: it keeps its head
            try:
                base = IntentClassifier(tier.model, mode=chain.pool.mode, use_adapter=False, home=chain.pool.home)
                chain.pool.adopt(tier.model, base)
            except registry.ModelNotAvailableError as e:
                raise ModelError(str(e)) from None


def warm_up(chain: Chain) -> tuple[dict[str, str], dict[str, str]]:
    """Load every tier before timing, so model loading is not counted as query latency.

    Returns ({tier: reason} for tiers that failed to load, {tier: reason} for tiers absent here: not
    installed or too large, a configuration fact).  Both pass over during the run too."""
    skipped, absent = {}, {}
    for tier in chain.tiers:
        try:
            tier.load()
        except PassOver as e:
            (absent if e.kind in ABSENT else skipped)[tier.name] = str(e)
    return skipped, absent


def run(
    chain: Chain, rows: list[dict], batch_size: int, desc: str = "eval", progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Classify every row through ``chain`` in batches; results plus wall time, memory and load.

    ``progress`` is told each batch's size instead of a bar of its own (a distributed run counts every rank's)."""
    from tqdm import tqdm

    load_before = os.getloadavg()
    skipped, absent = warm_up(chain)
    mx = sys.modules.get("mlx.core")
    if mx is not None:  # the peak while classifying, loaded weights included
        mx.reset_peak_memory()
    for tier, reason in absent.items():
        print(f"note: tier {tier} is not installed here and is skipped: {reason}", file=sys.stderr)
    for tier, reason in skipped.items():
        print(f"warning: tier {tier} passes over: {reason}", file=sys.stderr)
    results: list[dict] = []
    start = time.perf_counter()
    with tqdm(total=len(rows), unit="q", desc=desc, disable=None if progress is None else True) as bar:
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            texts, labels = [r["text"] for r in batch], [r["primary_intent"] for r in batch]
            results += chain.classify_batch(texts, labels=labels, contexts=[r.get("context") for r in batch])
            (progress or bar.update)(len(batch))
    wall = time.perf_counter() - start
    return {
        "results": results,
        "wall_s": wall,
        "skipped": skipped,
        "absent": absent,
        "peak_mlx_mb": peak_memory_mb(),
        "max_rss_mb": peak_rss_mb(),
        "load_avg": (load_before, os.getloadavg()),
        "models": _model_settings(chain),
    }


def _model_settings(chain: Chain) -> dict[str, dict]:
    """Temperature and threshold each loaded LLM tier used, and where they came from."""
    out = {}
    for name, clf in chain.pool.loaded.items() if chain.pool else ():
        out[name] = {
            "temperature": clf.temperature,
            "threshold": clf.threshold,
            "calibration_file": clf.calibration.path is not None,
            "calibration_ignored": list(clf.calibration.problems),
            "adapter": shown(clf.adapter) if clf.adapter else None,
        }
    return out


# ---- scoring ------------------------------------------------------------------------------------


def _valid(result: dict) -> bool:
    try:
        validate({k: result[k] for k in KEYS})
    except Exception:
        return False
    return True


def _group(keys: list[str], correct: list[bool]) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for key, hit in zip(keys, correct):
        g = groups.setdefault(key, {"n": 0, "correct": 0})
        g["n"] += 1
        g["correct"] += hit
    for g in groups.values():
        g["accuracy"] = g["correct"] / g["n"]
    return groups


def summarize(rows: list[dict], outcome: dict[str, Any], first_tier: str) -> dict[str, Any]:
    """Every figure of the report from the rows and the results of ``run``."""
    results = outcome["results"]
    gold = [r["primary_intent"] for r in rows]
    pred = [res["primary_intent"] for res in results]
    correct = [g == p for g, p in zip(gold, pred, strict=True)]
    conf = [float(res["confidence"]) for res in results]
    langs = [r.get("lang") or res.get("lang") or "unknown" for r, res in zip(rows, results)]
    tiers = [res["tier"] for res in results]
    same_set = [set(r["all_intents"]) == set(res["all_intents"]) for r, res in zip(rows, results)]
    jac = [scores.jaccard(r["all_intents"], res["all_intents"]) for r, res in zip(rows, results)]
    multi = [i for i, r in enumerate(rows) if len(set(r["all_intents"])) > 1]
    call_latency = [float(res["latency_ms"]) for res in results]
    latency = [float(res.get("latency_per_query_ms", res["latency_ms"])) for res in results]  # the headline
    batch = [int(res.get("batch_texts") or 1) for res in results]

    per_intent = {}
    for intent in INTENTS:
        tp = sum(g == intent and p == intent for g, p in zip(gold, pred))
        support, predicted = gold.count(intent), pred.count(intent)
        per_intent[intent] = {
            "n": support,
            "correct": tp,
            "accuracy": tp / support if support else None,
            "precision": tp / predicted if predicted else None,
            "f1": 2 * tp / (support + predicted) if support + predicted else None,
        }
    fallbacks = [res.get("fallbacks") or () for res in results]
    reasons = Counter(f"{f['tier']}: {f['reason']}" for fs in fallbacks for f in fs if not is_absent(f))
    kinds = Counter(f"{f['tier']} {f.get('kind', '?')}" for fs in fallbacks for f in fs if not is_absent(f))
    absent = dict(outcome.get("absent") or {})
    for f in (f for fs in fallbacks for f in fs if is_absent(f)):
        absent.setdefault(f["tier"], f["reason"])
    greeting = [c for g, c in zip(gold, correct) if g == "greeting"]
    said_greeting = [c for p, c in zip(pred, correct) if p == "greeting"]
    per_lang = _group(langs, correct)
    for lang, g in per_lang.items():
        idx = [i for i, k in enumerate(langs) if k == lang]
        g["ece"] = scores.ece([conf[i] for i in idx], [correct[i] for i in idx])
        g["ece_floor"] = scores.ece_floor([conf[i] for i in idx])
        g["greeting_n"] = sum(gold[i] == "greeting" for i in idx)
        g["greeting_predicted"] = sum(pred[i] == "greeting" for i in idx)
        hits = sum(gold[i] == pred[i] == "greeting" for i in idx)
        g["greeting_recall"] = hits / g["greeting_n"] if g["greeting_n"] else None
        g["greeting_precision"] = hits / g["greeting_predicted"] if g["greeting_predicted"] else None
    return {
        "n": len(rows),
        "correct": sum(correct),
        "accuracy": scores.accuracy(gold, pred),
        "macro_f1": scores.macro_f1(gold, pred),
        "greeting_accuracy": sum(greeting) / len(greeting) if greeting else None,
        "greeting_n": len(greeting),
        # A short command is not social talk: how often a `greeting` answer is one.
        "greeting_precision": sum(said_greeting) / len(said_greeting) if said_greeting else None,
        "greeting_predicted": len(said_greeting),
        "per_intent": per_intent,
        "per_lang": per_lang,
        # A conversation set (context-dev): its kinds of turn (follow_up, new_request, social) per language.
        "per_kind_lang": _group([f"{r['kind']} {lang}" for r, lang in zip(rows, langs)], correct)
        if all("kind" in r for r in rows)
        else {},
        "context_used_rate": sum(bool(res.get("context_used")) for res in results) / len(results),
        "confusion": Counter(zip(gold, pred)),
        "multi_n": len(multi),
        "exact_multi": sum(same_set[i] for i in multi) / len(multi) if multi else None,
        "exact_all": sum(same_set) / len(same_set),
        "jaccard_multi": sum(jac[i] for i in multi) / len(multi) if multi else None,
        "jaccard_all": sum(jac) / len(jac),
        "valid_json_rate": sum(map(_valid, results)) / len(results),
        "ece": scores.ece(conf, correct),
        "ece_floor": scores.ece_floor(conf),
        "brier": scores.brier_binary(conf, correct),
        "reliability": scores.reliability(conf, correct),
        "mean_confidence": sum(conf) / len(conf),
        # Latency per query (each query's share of its batch call: the headline), and per call.
        "latency": {q: scores.percentile(latency, q) for q in (50, 95, 99)} | {"max": max(latency)},
        "latency_per_call": {q: scores.percentile(call_latency, q) for q in (50, 95, 99)} | {"max": max(call_latency)},
        "batch_texts": {"mean": sum(batch) / len(batch), "max": max(batch)},
        "latencies": latency,
        "per_query_ms": outcome["wall_s"] * 1000 / len(rows),
        "wall_s": outcome["wall_s"],
        # Run-time fallbacks: a tier passed the query over while running.  A tier absent here (not installed,
        # too large) is a configuration fact, listed once in absent_tiers.
        "fallback_rate": sum(map(runtime_fallback, fallbacks)) / len(results),
        "not_first_rate": sum(t != first_tier for t in tiers) / len(tiers),
        "absent_tiers": absent,
        "per_tier": _group(tiers, correct),
        "reasons": reasons,
        "runtime_kinds": kinds,
        "correct_flags": correct,
        **{k: outcome[k] for k in ("peak_mlx_mb", "max_rss_mb", "load_avg", "models", "skipped")},
    }


def prediction_rows(rows: list[dict], results: list[dict]) -> list[dict]:
    """One line per row for --predictions: gold, answer, tier and timing."""
    return [
        {
            "id": r["id"],
            "text": r["text"],
            "lang": r.get("lang"),
            "gold_primary": r["primary_intent"],
            "gold_all": r["all_intents"],
            **{k: res[k] for k in KEYS},
            "correct": r["primary_intent"] == res["primary_intent"],
            "tier": res["tier"],
            "model": res.get("model"),
            "top": res.get("top"),
            "latency_ms": res["latency_ms"],
            "latency_per_query_ms": res.get("latency_per_query_ms"),
        }
        for r, res in zip(rows, results)
    ]
