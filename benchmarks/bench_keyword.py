"""Accuracy and latency of the keyword tier on a labelled JSONL file.

Run:  python benchmarks/bench_keyword.py [--data benchmarks/data/dev.jsonl] [--report benchmarks/reports/keyword.md]
Accuracy is on primary_intent; greeting accuracy is over the queries labelled greeting.
Latency is per query, time.perf_counter around classify_keywords, over several repeats
after one warm-up pass (so the one-off lexicon load is not counted).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from common import percentile, read_jsonl, save_report

from mlx_intent.keyword import classify_keywords, default_lexicon
from mlx_intent.schema import INTENTS, LANGUAGES, answer_of, validate

ROOT = Path(__file__).resolve().parent.parent


def accuracy_table(title: str, groups: dict[str, list[bool]], order: list[str]) -> list[str]:
    lines = [f"### {title}", "", "| | n | correct | accuracy |", "|---|---:|---:|---:|"]
    for key in order:
        hits = groups.get(key, [])
        if hits:
            lines.append(f"| {key} | {len(hits)} | {sum(hits)} | {sum(hits) / len(hits):.1%} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks/data/dev.jsonl")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/keyword.md")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the data")
    args = parser.parse_args(argv)

    rows = read_jsonl(args.data)
    default_lexicon()  # load once, outside the timings
    results = [classify_keywords(r["text"]) for r in rows]  # also the warm-up pass
    for result in results:
        validate(answer_of(result))

    by_lang: dict[str, list[bool]] = defaultdict(list)
    by_intent: dict[str, list[bool]] = defaultdict(list)
    hits, set_hits = [], []
    confusions: dict[tuple[str, str], int] = defaultdict(int)
    for row, result in zip(rows, results):
        ok = result["primary_intent"] == row["primary_intent"]
        hits.append(ok)
        set_hits.append(set(result["all_intents"]) == set(row["all_intents"]))
        by_lang[row["lang"]].append(ok)
        by_intent[row["primary_intent"]].append(ok)
        if not ok:
            confusions[(row["primary_intent"], result["primary_intent"])] += 1

    timings_us: list[float] = []
    for _ in range(args.repeats):
        for row in rows:
            start = time.perf_counter()
            classify_keywords(row["text"])
            timings_us.append((time.perf_counter() - start) * 1e6)
    timings_us.sort()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    greeting = by_intent.get("greeting", [])
    data_name = args.data.resolve().relative_to(ROOT) if args.data.resolve().is_relative_to(ROOT) else args.data
    command = f"python benchmarks/bench_keyword.py --data {data_name} --repeats {args.repeats}"
    lines = [
        "# Keyword tier benchmark",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()} ({platform.machine()}), "
        f"{os.cpu_count()} CPUs, 1-minute load average {load:.1f} after the timed passes "
        "(a busy machine inflates p99).",
        "",
        f"Data: `{data_name}`, {len(rows)} queries. The lexicons and rules are tuned on "
        "`benchmarks/data/train.jsonl` and on probe queries written for the purpose (they then join "
        "train); dev is held out for measurement.",
        "",
        "## Summary",
        "",
        f"- primary_intent accuracy: **{sum(hits) / len(hits):.1%}** ({sum(hits)}/{len(hits)})",
        f"- greeting accuracy: **{sum(greeting) / max(1, len(greeting)):.1%}** ({sum(greeting)}/{len(greeting)})",
        f"- all_intents exact set match: {sum(set_hits) / len(set_hits):.1%}",
        f"- latency per query over {len(timings_us)} calls: p50 {percentile(timings_us, 50):.1f} µs, "
        f"p95 {percentile(timings_us, 95):.1f} µs, p99 {percentile(timings_us, 99):.1f} µs, "
        f"mean {statistics.fmean(timings_us):.1f} µs",
        "",
        *accuracy_table("Per language", by_lang, [*LANGUAGES, *sorted(set(by_lang) - set(LANGUAGES))]),
        *accuracy_table("Per intent (by gold primary_intent)", by_intent, list(INTENTS)),
        "### Most frequent confusions (gold → predicted)",
        "",
        "| gold | predicted | n |",
        "|---|---|---:|",
        *[f"| {g} | {p} | {n} |" for (g, p), n in sorted(confusions.items(), key=lambda kv: -kv[1])[:15]],
        "",
    ]
    report = "\n".join(lines)
    save_report(report, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
