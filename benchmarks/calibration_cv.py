"""Does a temperature per language help? Cross-validated on the calibration split alone.

The shipped e5-small head answers with its blend with the keyword tier, then a temperature per language
(tuner/encoder.py: calibrate_head).  This script splits calib + public-calib in two halves at random, fits
the blend and the temperatures on one half as calibrate_head does, and scores the other half; ten times,
both ways.  Three ways to temper the blend are compared per language: none, one temperature for every
language, and one per language where cross-validation on the fitting half says it helps (shipped).  The
scores are the NLL of the gold intent (the proper score the temperatures are fitted by) and ECE beside the
ECE a perfectly calibrated model shows on as many rows (scores.ece_floor): on ~150 rows a language, ECE
alone cannot tell a calibrated model from a miscalibrated one.  No evaluation set is read.

    python benchmarks/calibration_cv.py      # writes benchmarks/reports/calibration-cv.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import save_report

from mlx_intent.encoder import EncoderClassifier, blend, by_language, fit_blend
from mlx_intent.evaluation import scores
from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.evaluation.report import table
from mlx_intent.keyword import KeywordClassifier
from mlx_intent.langid import detect_language
from mlx_intent.schema import INTENTS, LANGUAGES
from mlx_intent.settings import load_settings
from mlx_intent.tuner.calibrate import fit_temperature
from mlx_intent.tuner.encoder import fit_lang_temperatures

REPEATS = 10
METHODS = ("none", "one temperature", "per language where it helps (shipped)")


def distributions(rows: list[dict], home: Path) -> tuple[np.ndarray, list[dict]]:
    """The head's T = 1 distribution and the keyword tier's reading of each text: what calibrate_head fits on."""
    clf = EncoderClassifier(home=home, combine=False)
    texts = [r["text"] for r in rows]
    raw = np.concatenate([clf.distributions(texts[a : a + 32], temperature=1.0)[0] for a in range(0, len(texts), 32)])
    keyword = KeywordClassifier(home=home)
    return raw, [keyword.classify(t) for t in texts]


def served(method: str, fit: np.ndarray, test: np.ndarray, gold: np.ndarray, texts: list[str], langs: list[str]):
    """The tempered test distributions under ``method``, its temperatures fitted on ``fit``'s blend."""
    if method == "none":
        return test
    if method == "one temperature":
        t = fit_temperature(fit, gold.tolist())
        return by_language(test, texts, dict.fromkeys(LANGUAGES, t))
    return by_language(test, texts, fit_lang_temperatures(fit, gold.tolist(), langs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=Path("benchmarks/reports/calibration-cv.md"))
    args = parser.parse_args()
    home = load_settings().home
    rows = [r for name in ("calib", "public-calib") for r in read_labelled(data_path(name, home))]
    raw, readings = distributions(rows, home)
    gold = np.array([INTENTS.index(r["primary_intent"]) for r in rows])
    texts = [r["text"] for r in rows]
    langs = np.array([detect_language(t) or "?" for t in texts])
    groups = [*LANGUAGES, "all"]
    nll = {m: {g: [] for g in groups} for m in METHODS}
    ece = {m: {g: [] for g in groups} for m in METHODS}
    floor = {g: [] for g in groups}
    rng = np.random.default_rng(0)
    for _ in range(REPEATS):
        perm = rng.permutation(len(rows))
        halves = perm[: len(rows) // 2], perm[len(rows) // 2 :]
        for a, b in (halves, halves[::-1]):
            read_a, read_b = [readings[i] for i in a], [readings[i] for i in b]
            weights = fit_blend(raw[a], read_a, gold[a].tolist())
            fit, test = blend(raw[a], read_a, *weights), blend(raw[b], read_b, *weights)
            right = test.argmax(axis=1) == gold[b]
            for method in METHODS:
                p = served(method, fit, test, gold[a], [texts[i] for i in b], langs[a].tolist())
                conf = p.max(axis=1)
                for g in groups:
                    m = np.ones(len(b), bool) if g == "all" else langs[b] == g
                    nll[method][g].append(scores.nll(p[m], gold[b][m].tolist()))
                    ece[method][g].append(scores.ece(conf[m].tolist(), right[m].tolist()))
                    if method == METHODS[-1]:
                        floor[g].append(scores.ece_floor(conf[m].tolist())[0])
    half = {g: int((langs == g).sum() / 2) if g != "all" else len(rows) // 2 for g in groups}
    out = [
        "# A temperature per language? Cross-validated on the calibration split",
        "",
        "Reproduce: `python benchmarks/calibration_cv.py`",
        "",
        f"calib + public-calib ({len(rows)} rows) split in random halves {REPEATS} times; fitted on one half as "
        "calibrate_head fits (the blend with the keyword tier, then the temperatures), scored on the other; "
        "means over both ways of every split. No evaluation set is read.",
        "",
        "## NLL of the gold intent (lower is better)",
        "",
    ]
    head = ["method", *(f"{g} ({half[g]})" for g in groups)]
    out += table(head, [[m, *(f"{np.mean(nll[m][g]):.3f}" for g in groups)] for m in METHODS])
    out += ["", "## ECE, and the ECE a perfectly calibrated model shows on as many rows", ""]
    out += table(
        head,
        [[m, *(f"{np.mean(ece[m][g]):.3f}" for g in groups)] for m in METHODS]
        + [["perfect calibration (mean)", *(f"{np.mean(floor[g]):.3f}" for g in groups)]],
    )
    out.append("")
    save_report("\n".join(out) + "\n", args.report)


if __name__ == "__main__":
    main()
