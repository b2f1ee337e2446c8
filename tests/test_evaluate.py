"""Scores on hand-made cases, and the eval / compare commands on a small labelled file with rule-based tiers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_intent.cli.main import main
from mlx_intent.evaluation import scores
from mlx_intent.settings import settings_home

# ---- scores -------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    assert scores.accuracy(gold, pred) == pytest.approx(4 / 6)
    # a: tp 2 fp 0 fn 1 -> 4/5; b: tp 1 fp 1 fn 1 -> 1/2; c: tp 1 fp 1 fn 0 -> 2/3
    assert scores.macro_f1(gold, pred) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    # a class only ever predicted scores 0 and counts in the mean
    assert scores.macro_f1(["a", "a"], ["a", "z"]) == pytest.approx((2 / 3 + 0) / 2)
    assert scores.accuracy([], []) is None and scores.macro_f1([], []) is None
    with pytest.raises(ValueError):
        scores.accuracy(["a"], ["a", "b"])


def test_jaccard():
    assert scores.jaccard(["a", "b"], ["b", "a"]) == 1.0
    assert scores.jaccard(["a", "b"], ["a"]) == 0.5
    assert scores.jaccard(["a"], ["b"]) == 0.0
    assert scores.jaccard(["a", "b", "c"], ["b", "c", "d"]) == pytest.approx(2 / 4)


def test_ece_of_calibrated_data_is_near_zero_and_of_overconfident_is_the_gap():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(0, 1, conf.size) < conf  # right exactly as often as it claims
    assert scores.ece(conf, correct) < 0.005
    # every answer 0.9 sure, right 60% of the time: ECE is the 0.3 gap
    assert scores.ece([0.9] * 10, [True] * 6 + [False] * 4) == pytest.approx(0.3)
    # two bins, each off by 0.1 in opposite directions: gaps do not cancel
    assert scores.ece([0.2] * 10 + [0.8] * 10, [True] * 3 + [False] * 7 + [True] * 7 + [False] * 3) == pytest.approx(
        0.1
    )
    assert scores.ece([], []) is None


def test_ece_floor_is_what_a_calibrated_model_shows_and_shrinks_with_more_rows():
    """The floor matches scores.ece on simulated calibrated answers, is 0 for certain ones, and a small
    set's floor is higher than a large one's at the same confidences."""
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.6, 1.0, 200)
    mean, p95 = scores.ece_floor(conf)
    simulated = [scores.ece(conf, rng.uniform(0, 1, conf.size) < conf) for _ in range(300)]
    assert mean == pytest.approx(np.mean(simulated), rel=0.1)
    assert mean < p95 == pytest.approx(np.percentile(simulated, 95), rel=0.15)
    assert scores.ece_floor(np.tile(conf, 20))[0] < mean / 3  # ~ 1 / sqrt(n)
    assert scores.ece_floor([1.0] * 50) == (0.0, 0.0)
    assert scores.ece_floor([]) is None


def test_reliability_bins_are_right_closed():
    table = scores.reliability([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0], [True, False, True, True])
    assert len(table) == 15
    assert table[0]["count"] == 2 and table[1]["count"] == 1 and table[14]["count"] == 1
    assert table[0]["accuracy"] == 0.5 and table[5]["confidence"] is None


def test_brier_known_values():
    assert scores.brier_binary([1.0, 0.0], [True, False]) == 0.0
    assert scores.brier_binary([0.8, 0.6], [True, False]) == pytest.approx((0.04 + 0.36) / 2)
    probs = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    # (0.09 + 0.04 + 0.01) and (4/9 + 1/9 + 1/9)
    assert scores.brier_multiclass(probs, [0, 2]) == pytest.approx((0.14 + 6 / 9) / 2)
    assert scores.brier_multiclass(np.eye(3), [0, 1, 2]) == 0.0
    assert scores.brier_multiclass(np.eye(3), [1, 2, 0]) == pytest.approx(2.0)


def test_nll():
    assert scores.nll(np.array([[0.5, 0.5], [0.25, 0.75]]), [0, 1]) == pytest.approx(
        -(math.log(0.5) + math.log(0.75)) / 2
    )


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),
        (5, 0, 0.0625),  # 2 * 0.5^5
        (1, 1, 1.0),
        (7, 2, 2 * (1 + 9 + 36) / 512),  # 2 * P(X <= 2), X ~ Bin(9, 1/2) = 0.1796875
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.0385742...
    ],
)
def test_mcnemar_exact_known_tables(b, c, p):
    a_right = [True] * b + [False] * c + [True] * 20 + [False] * 5
    b_right = [False] * b + [True] * c + [True] * 20 + [False] * 5
    test = scores.mcnemar(a_right, b_right)
    assert (test["b"], test["c"], test["method"]) == (b, c, "exact")
    assert test["p"] == pytest.approx(p)
    assert scores.mcnemar(b_right, a_right)["p"] == pytest.approx(p)  # symmetric


def test_mcnemar_chi_square_with_continuity_correction():
    a_right = [True] * 30 + [False] * 10
    b_right = [False] * 30 + [True] * 10
    test = scores.mcnemar(a_right, b_right)
    assert test["method"] == "chi2-cc"
    assert test["statistic"] == pytest.approx((20 - 1) ** 2 / 40)  # 9.025
    assert test["p"] == pytest.approx(0.002663, rel=1e-3)  # chi2.sf(9.025, 1)


def test_percentile_interpolates():
    assert scores.percentile([1, 2, 3, 4], 50) == 2.5
    assert scores.percentile([], 50) is None


# ---- the commands -------------------------------------------------------------------------------

ROWS = [
    ("hello there!", "en", "greeting", ["greeting"]),
    ("where can I eat fish in Kadıköy?", "en", "restaurant", ["restaurant"]),
    ("how do I get from Sabiha Gökçen airport to Taksim?", "en", "airport_transport", ["airport_transport"]),
    ("will it rain tomorrow in Istanbul?", "en", "weather", ["weather"]),
    ("Hagia Sophia opening hours", "en", "attraction", ["attraction"]),
    ("Kapalıçarşı'da pazarlık nasıl yapılır?", "tr", "shopping", ["shopping"]),
    ("merhaba, yakınımda eczane var mı?", "tr", "nearby_locations", ["nearby_locations", "greeting"]),
    ("what concerts are on this weekend?", "en", "events", ["events"]),
    ("plan my day: Topkapi, Grand Bazaar, then dinner", "en", "route_planning", ["route_planning", "restaurant"]),
    ("do I need a visa for Turkey?", "en", "general", ["general"]),
]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.jsonl"
    lines = [
        {"id": f"t{i}", "text": t, "lang": lang, "primary_intent": p, "all_intents": a}
        for i, (t, lang, p, a) in enumerate(ROWS)
    ]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def test_eval_writes_report_figures_predictions_and_checks_min_accuracy(tiny, tmp_path):
    report = tmp_path / "out" / "tiny.md"
    predictions = tmp_path / "pred.jsonl"
    args = ["eval", str(tiny), "--chain", "keyword", "--report", str(report), "--predictions", str(predictions)]
    result = CliRunner().invoke(main, [*args, "--min-accuracy", "0.5"])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert text.startswith("# Evaluation: keyword on tiny")
    assert f"Reproduce: `mlx-intent eval {tiny} --chain keyword --mode score" in text
    for name in ("confusion", "reliability", "languages", "latency"):
        png = report.parent / f"tiny-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in text
    lines = [json.loads(x) for x in predictions.read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"t{i}" for i in range(10)]
    assert all(x["tier"] == "keyword" for x in lines)
    correct = sum(x["correct"] for x in lines)
    assert f"({correct}/10)" in text and correct >= 5
    assert "| valid JSON (schema.validate) | 100.0% |" in text
    assert "| fallback rate at run time (a tier passed the query over) | 0.0% |" in text
    assert "| tiers not installed here (not counted as fallbacks) | none |" in text
    assert "latency per query p50" in result.output
    plots = "plots beside it: tiny-*.png (confusion, languages, latency, reliability)"
    assert f"report: {report}; {plots}" in result.output

    # the same run (replacing its report: --force) against an accuracy it cannot reach
    failed = CliRunner().invoke(main, [*args, "--force", "--min-accuracy", "1.01"])
    assert failed.exit_code == 2  # out of range: a usage error
    failed = CliRunner().invoke(main, [*args, "--force", "--min-accuracy", f"{(correct + 0.5) / 10}"])
    assert failed.exit_code == 1
    assert "below --min-accuracy" in failed.output


def test_eval_general_tier_and_fallback_rate(tiny, tmp_path):
    report = tmp_path / "g.md"
    result = CliRunner().invoke(main, ["eval", str(tiny), "--chain", "general", "--report", str(report)])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "**10.0%** (1/10)" in text  # only the visa question is "general"
    assert (
        "| greeting accuracy (recall) | 0.0% (of 1) |" in text
        and "| greeting precision (answers `greeting` that are) | - (of 0) |" in text
    )


def test_eval_latency_is_per_query_with_the_call_beside_it(tiny, monkeypatch):
    """A tier that takes 500 ms per call of 5 queries: 100 ms per query is the headline, 500 ms per call.
    A tier above it, always unsure, makes every query a run-time fallback."""
    from types import SimpleNamespace

    from mlx_intent import chain as chain_module
    from mlx_intent.chain import Chain, Kind, Tier
    from mlx_intent.evaluation.data import read_labelled
    from mlx_intent.evaluation.report import footer, headline
    from mlx_intent.evaluation.run import run, summarize

    now = [0.0]
    monkeypatch.setattr(chain_module, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=lambda: now[0]))

    def slow(texts):
        now[0] += 0.5
        return [{"primary_intent": "general", "confidence": 0.9, "all_intents": ["general"]} for _ in texts]

    def unsure(texts):
        return [{"primary_intent": "general", "confidence": 0.1, "all_intents": ["general"]} for _ in texts]

    rows = read_labelled(tiny)
    chain = Chain([Tier("unsure", unsure, threshold=0.5), Tier("slow", slow, model="m", kind=Kind.LLM)], cache_size=0)
    summary = summarize(rows, run(chain, rows, 5), "unsure")
    assert summary["latency"][95] == pytest.approx(100.0) and summary["latency_per_call"][95] == pytest.approx(500.0)
    assert summary["batch_texts"] == {"mean": 5, "max": 5}
    assert "latency per query p50 100.0 ms  p95 100.0 ms  fallback at run time 100.0%" in headline(summary)
    lines = footer(summary, tiny.with_suffix(".md"), {})
    assert lines[0] == "answered by: slow 100.0%"
    assert lines[1] == (
        "latency per query: p50 100.0 ms, p95 100.0 ms (per call of up to 5 queries: p50 500.0 ms, p95 500.0 ms)"
    )
    assert lines[2] == "fallback at run time: 100.0% of queries (unsure low_confidence 10)"
    assert lines[3] == f"report: {tiny.with_suffix('.md')}"


def test_eval_tiers_not_installed_are_not_fallbacks(tiny, tmp_path, models_home):
    """The 3B and TinyLlama are not downloaded here: every query passes them over, yet the run-time
    fallback rate is 0; they are listed once, with the next step."""
    report = tmp_path / "absent.md"
    args = ["eval", str(tiny), "--chain", "llama-3.2-3b,tinyllama,keyword", "--report", str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fallback at run time 0.0%" in result.output
    assert "fallback at run time: 0.0% of queries; not installed here, not counted: llama-3.2-3b, tinyllama" in (
        result.output
    )
    assert "next step on a Mac: mlx-intent models pull llama-3.2-3b" in result.output
    text = report.read_text()
    assert "| fallback rate at run time (a tier passed the query over) | 0.0% |" in text
    assert "| tiers not installed here (not counted as fallbacks) | llama-3.2-3b, tinyllama |" in text
    assert "| answer not from the first tier | 100.0% |" in text
    assert "Top run-time pass-over reasons" not in text


def test_eval_no_adapter_keeps_the_encoder_tier(tiny, tmp_path):
    """--no-adapter loads the LLM tiers without their adapters; the e5-small tier is no LLM (Tier.kind) and
    answers with its head as always (it once raised UnknownModelError, being taken for an LLM by its model)."""
    predictions = tmp_path / "pred.jsonl"
    args = ["eval", str(tiny), "--no-adapter", "--chain", "e5-small,keyword", "--report", str(tmp_path / "e5.md")]
    result = CliRunner().invoke(main, [*args, "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    lines = [json.loads(x) for x in predictions.read_text().splitlines()]
    assert len(lines) == 10 and any(x["tier"] == "e5-small" for x in lines)


def test_eval_bad_data_and_unknown_model(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "primary_intent": "greeting"}\n{"text": "x", "primary_intent": "nope"}\n')
    result = CliRunner().invoke(main, ["eval", str(bad), "--chain", "keyword", "--report", str(tmp_path / "r.md")])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "missing"), "--chain", "keyword"])
    assert result.exit_code == 2 and "no such file" in result.output
    result = CliRunner().invoke(
        main, ["eval", str(tiny), "--chain", "no-such-model", "--report", str(tmp_path / "r.md")]
    )
    assert result.exit_code == 3 and "unknown model" in result.output


def test_eval_resolves_data_names():
    from mlx_intent.evaluation.data import DATA_DIR, data_path

    assert data_path("dev", home=settings_home()) == DATA_DIR / "dev.jsonl"


def test_compare_keyword_vs_general(tiny, tmp_path):
    report = tmp_path / "ab.md"
    result = CliRunner().invoke(main, ["compare", "keyword", "general", str(tiny), "--report", str(report)])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert text.startswith("# A/B: keyword vs general on tiny")
    assert f"Reproduce: `mlx-intent compare keyword general {tiny} --mode score" in text
    # Written by hand from ROWS: the keyword tier is right on all but the day plan (9 of 10), `general` only on
    # the visa question, which both get right; so 8 rows only A gets right, none only B, one neither, and the
    # exact two-sided binomial p on the 8 discordant pairs is 2 * (1/2)**8 = 0.0078125.
    assert "| accuracy | 90.0% | 10.0% | -80.0 pp |" in text
    assert "| A right | 1 | 8 |" in text and "| A wrong | 0 | 1 |" in text
    assert "8 rows only A gets right, 0 only B gets right" in text
    assert "**p = 0.00781** (significant at 0.05)" in text
    assert "| general | 1 | " in text  # per-intent row of the gold "general" queries
    assert "| tr | 2 | " in text


def test_greeting_precision_and_calibration_per_language(tiny):
    """A short command called `greeting` counts against greeting precision in its language, not recall."""
    from mlx_intent.chain import Chain, Kind, Tier
    from mlx_intent.evaluation.data import read_labelled
    from mlx_intent.evaluation.run import run, summarize

    def greets_everything_short(texts):
        names = ["greeting" if len(t) < 40 else "general" for t in texts]
        return [{"primary_intent": n, "confidence": 0.9, "all_intents": [n]} for n in names]

    rows = read_labelled(tiny)
    chain = Chain([Tier("greeter", greets_everything_short, model="m", kind=Kind.LLM)], cache_size=0)
    s = summarize(rows, run(chain, rows, 5), "greeter")
    short = [r for r in rows if len(r["text"]) < 40]
    assert s["greeting_predicted"] == len(short) and s["greeting_precision"] == pytest.approx(1 / len(short))
    en, tr = s["per_lang"]["en"], s["per_lang"]["tr"]
    assert en["greeting_recall"] == 1.0 and en["greeting_precision"] == pytest.approx(1 / en["greeting_predicted"])
    assert tr["greeting_n"] == 0 and tr["greeting_recall"] is None
    assert en["ece"] == pytest.approx(abs(0.9 - en["correct"] / en["n"]))
