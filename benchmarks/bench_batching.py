"""How far batching can raise scoring throughput on this machine: the ceiling for the server's dynamic batching.

Run:  python benchmarks/bench_batching.py [--sizes 1,4,16] [--repeats 3]

For each prompt style (the full few-shot system prompt the untrained model uses, the compact one its
adapter uses) and each batch size, ``IntentClassifier.distributions`` scores batches of different
bench queries; the best of ``--repeats`` is kept (a shared machine only ever adds time).  Queries per
second at batch size B over batch size 1 is the most any batching server can gain over answering one
request at a time, before HTTP and queueing costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from common import read_jsonl, save_report

import mlx_intent  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_intent.models import backend

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"


def measure(clf, texts: list[str], size: int, repeats: int) -> float:
    """Best seconds for one batch of ``size`` texts (a different slice each repeat)."""
    clf.distributions(texts[:size])  # warm-up: kernels for this shape
    best = float("inf")
    for rep in range(repeats):
        start = (rep * size) % max(1, len(texts) - size)
        batch = texts[start : start + size]
        t0 = time.perf_counter()
        clf.distributions(batch)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=Path, default=ROOT / "benchmarks/data/bench_queries.jsonl")
    parser.add_argument("--sizes", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/batching.md")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    texts = [r["text"] for r in read_jsonl(args.queries)]

    from mlx_intent.classifier import IntentClassifier

    load_before = os.getloadavg()
    rows = []
    for label, use_adapter in (("full system prompt, no adapter", False), ("compact prompt + LoRA adapter", True)):
        clf = IntentClassifier(MODEL, use_adapter=use_adapter)
        if use_adapter and clf.adapter is None:
            continue
        base = None
        for size in sizes:
            seconds = measure(clf, texts, size, args.repeats)
            qps = size / seconds
            base = base or qps
            rows.append((label, len(clf.prefix_ids), size, seconds * 1000, seconds * 1000 / size, qps, qps / base))
            print(f"{label}: batch {size}: {seconds * 1000:.0f} ms", flush=True)
    load_after = os.getloadavg()

    command = f"python benchmarks/bench_batching.py --sizes {args.sizes} --repeats {args.repeats}"
    lines = [
        "# Batching ceiling: scoring throughput by batch size",
        "",
        f"Reproduce: `{command}`",
        "",
        f"- MLX on **{backend.device_name()}**; {platform.platform()}, {os.cpu_count()} CPUs",
        f"- load average (1 min) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end",
        f"- model {MODEL}; queries from `{args.queries.relative_to(ROOT)}`; best of {args.repeats} batches per size",
        "",
        "| prompt | system tokens | batch | ms per batch | ms per query | queries/s | vs batch 1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.1f} | {r[6]:.2f}x |" for r in rows]
    lines += [
        "",
        "Queries per second at batch B over batch 1 bounds what a batching server can gain over answering",
        "one request at a time. Where one query already keeps the CPU's matrix units busy (a 30-token row",
        "is a 30-row matrix product per weight), a batch only adds rows to the same work.",
        "",
    ]
    save_report("\n".join(lines), args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
