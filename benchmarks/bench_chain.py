"""Overhead of the fallback chain over a bare tier, and the latency of a cache hit.

Run:  python benchmarks/bench_chain.py [--data benchmarks/data/dev.jsonl] [--repeats 5] [--model-queries 60]

Each query is timed twice, back to back and in alternating order: the tier's ``run([text])`` called
directly, and ``Chain([tier], cache_size=0).classify(text)``.  The overhead is the per-query difference
(paired, so a load spike on this shared machine tends to hit both halves).  What the chain adds: the cache
key (normalize), answer validation, language detection and the metrics record.  The log is off except in
one row, which shows its cost (one write and fsync per query).  Two rows add the keyword tier's second opinion
(``secondaries``), as the default chain runs it: behind the bundled model, and behind e5-small blended with the
keyword tier (which hands the chain the keyword reading it blended, so the keyword tier is not run twice).
MLX is imported first, as in any chain with an LLM tier, so the metrics read MLX's peak memory on every record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import percentile, save_report

from mlx_intent.chain import Chain, ModelPool, Tier, encoder_tier, keyword_tier, llm_tier
from mlx_intent.metrics import ClassificationLog
from mlx_intent.models import backend
from mlx_intent.models.registry import BUNDLED
from mlx_intent.settings import load_settings

backend.use_openblas()
import mlx.core  # noqa: E402, F401  (see the docstring: the metrics' per-record MLX read is part of the cost)

ROOT = Path(__file__).resolve().parent.parent
TARGET_US = 1000.0
CONSTANT = {"primary_intent": "general", "confidence": 0.9, "all_intents": ["general"]}


def timed(call: Callable[[str], object], text: str) -> float:
    start = time.perf_counter_ns()
    call(text)
    return (time.perf_counter_ns() - start) / 1e3


def paired(
    tier: Tier, texts: list[str], repeats: int, log: ClassificationLog | None = None, secondaries=None
) -> dict[str, list[float]]:
    """µs per query for the bare tier, the chain around it (with the keyword tier's second opinion when
    ``secondaries`` is given, as build_chain sets it), and their per-query difference."""
    chain = Chain([tier], cache_size=0, log=log, secondaries=secondaries)

    def bare(text: str) -> list[dict]:
        return tier.run([text])

    out: dict[str, list[float]] = {"direct": [], "chain": [], "overhead": []}
    for r in range(repeats):
        for i, text in enumerate(texts):
            if (i + r) % 2:  # alternate who goes first, so neither gets the warmer caches every time
                through, direct = timed(chain.classify, text), timed(bare, text)
            else:
                direct, through = timed(bare, text), timed(chain.classify, text)
            out["direct"].append(direct)
            out["chain"].append(through)
            out["overhead"].append(through - direct)
    return {k: sorted(v) for k, v in out.items()}


def cache_hits(texts: list[str], repeats: int) -> list[float]:
    """µs per classify() that the cache answers (every text was classified once before)."""
    chain = Chain([keyword_tier(load_settings().home)], cache_size=len(texts) + 1)
    chain.classify_batch(texts)
    timings = []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter_ns()
            result = chain.classify(text)
            timings.append((time.perf_counter_ns() - start) / 1e3)
            assert result["cached"], text
    return sorted(timings)


def row(label: str, n: int, t: dict[str, list[float]]) -> str:
    cells = [f"{percentile(t[k], q):,.1f}" for k in ("direct", "chain", "overhead") for q in (50, 95)]
    return f"| {label} | {n} | " + " | ".join(cells) + " |"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks/data/dev.jsonl")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/chain.md")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the data (fast tiers)")
    parser.add_argument("--model-queries", type=int, default=60, help="queries for the bundled model, one pass")
    args = parser.parse_args(argv)

    with args.data.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    load_before = loadavg()

    home = load_settings().home
    keyword = keyword_tier(home)
    constant = Tier("constant", lambda batch: [dict(CONSTANT) for _ in batch])
    paired(keyword, texts[:50], 1)  # warm-up: lexicon, langid tables, first-call costs
    fast = {"keyword": paired(keyword, texts, args.repeats), "constant (fake)": paired(constant, texts, args.repeats)}
    rows = [row(label, len(texts) * args.repeats, t) for label, t in fast.items()]
    with tempfile.TemporaryDirectory() as tmp, ClassificationLog(Path(tmp) / "bench.log") as log:
        rows.append(row("constant, log on", len(texts), paired(constant, texts, 1, log=log)))

    pool = ModelPool(max_loaded=1, home=home)
    model = llm_tier(BUNDLED, pool, threshold=0.0, budget_ms=None)
    model.load()
    sample = texts[:: max(1, len(texts) // args.model_queries)][: args.model_queries]
    paired(model, sample[:3], 1)  # warm-up
    rows.append(row(f"{BUNDLED} (model)", len(sample), paired(model, sample, 1)))
    second = {"secondaries": keyword.run}  # the keyword tier's second opinion, as in the default chain
    rows.append(row(f"{BUNDLED}, second opinion", len(sample), paired(model, sample, 1, **second)))
    encoder = encoder_tier(0.0, None, combine=True)  # e5-small blended with the keyword tier (the default chain)
    encoder.load()
    paired(encoder, sample[:3], 1, **second)  # warm-up
    rows.append(row("e5-small blend, second opinion", len(sample), paired(encoder, sample, 1, **second)))

    hits = cache_hits(texts, args.repeats)
    load_after = loadavg()

    data_name = args.data.resolve().relative_to(ROOT) if args.data.resolve().is_relative_to(ROOT) else args.data
    command = (
        f"python benchmarks/bench_chain.py --data {data_name} --repeats {args.repeats} "
        f"--model-queries {args.model_queries}"
    )
    lines = [
        "# Fallback chain overhead benchmark",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()} ({platform.machine()}), "
        f"{os.cpu_count()} CPUs, MLX device {backend.device_name()}; load average (1/5/15 min) "
        f"{load_before} before, {load_after} after (the machine is shared: other jobs inflate p95).",
        "",
        f"Data: `{data_name}`, {len(texts)} queries. Times in µs per query. *direct* is the tier's "
        "`run([text])`; *chain* is `Chain([tier], cache_size=0).classify(text)`; *overhead* is the "
        "per-query difference of the two, timed back to back (its percentiles are not the difference of "
        "the other columns' percentiles).",
        "",
        "| tier | queries | direct p50 | direct p95 | chain p50 | chain p95 | overhead p50 | overhead p95 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Target, chain overhead under {TARGET_US:,.0f} µs at p50 (keyword and constant tiers, log off): "
        + ("**met**" if all(percentile(t["overhead"], 50) < TARGET_US for t in fast.values()) else "**missed**")
        + ".",
        "",
        f"Cache hit (`classify` of a text already answered, keyword chain), {len(hits)} calls: "
        f"p50 {percentile(hits, 50):,.1f} µs, p95 {percentile(hits, 95):,.1f} µs.",
        "",
        "The overhead is the chain's own work: the cache key (normalize), validating the answer, language "
        "detection and the metrics record, the same for every tier.  The log row adds one `write` + "
        "`fsync` per query.",
        "",
    ]
    report = "\n".join(lines)
    save_report(report, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
