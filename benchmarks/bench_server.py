"""Load test of ``mlx-intent serve`` on loopback: throughput and latency by concurrency, with and without
dynamic batching.

Run:  python benchmarks/bench_server.py [--requests 64] [--levels 1,4,16,64] [--max-seconds 120]

Three servers are started as subprocesses on 127.0.0.1 (dynamic batching; --no-batching; batching with
load shedding), warmed up, then take turns: at each concurrency level each gets ``--requests`` POST
/v1/classify from that many client threads (the same dev-set texts, cache off).  A level stops issuing
requests after ``--max-seconds``.  For the first two the latency budget and request timeout are out of
reach, so every answer is the chain's full answer and the figures measure capacity; the third answers
a request not done within SHED_MS from the keyword tier (the service's timeout behaviour).
``--serve-args`` adds flags to all three.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from common import percentile, read_jsonl, save_report

from mlx_intent.serve.client import ClientError, IntentClient

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
SHED_MS = 800  # the default latency budget
MODES = {
    "batching": [],
    "no batching": ["--no-batching"],
    f"batching, shed at {SHED_MS} ms": [f"--request-timeout-ms={SHED_MS}"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], log_path: Path) -> tuple[subprocess.Popen, IntentClient]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_intent", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = IntentClient(f"http://127.0.0.1:{port}", timeout=600)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if client.health()["ready"]:
                return proc, client
        except ClientError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server not ready after 300 s")
        time.sleep(0.2)


def run_level(client: IntentClient, texts: list[str], concurrency: int, max_seconds: float) -> dict:
    """Send ``texts`` with ``concurrency`` threads; stop taking new ones after ``max_seconds``."""
    lock = threading.Lock()
    todo = iter(texts)
    latencies: list[float] = []
    tiers: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    start = time.perf_counter()

    def worker() -> None:
        while time.perf_counter() - start < max_seconds:
            with lock:
                text = next(todo, None)
            if text is None:
                return
            t0 = time.perf_counter()
            try:
                tier = client.classify(text)["tier"]
            except ClientError as e:
                with lock:
                    errors[str(e.status)] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tiers[tier] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "done": len(latencies),
        "errors": dict(errors),
        "seconds": wall,
        "throughput": len(latencies) / wall,
        "p50_ms": percentile(ordered, 50) * 1000 if ordered else None,
        "p95_ms": percentile(ordered, 95) * 1000 if ordered else None,
        "llm_share": tiers[MODEL] / len(latencies) if latencies else None,
    }


def batch_histogram(client: IntentClient) -> tuple[float, float]:
    """(batches run, texts in them) from the server's own metrics."""
    import urllib.request

    with urllib.request.urlopen(client.base_url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    value = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line.startswith("mlx_intent_batch")}
    return value.get("mlx_intent_batch_texts_count", 0.0), value.get("mlx_intent_batch_texts_sum", 0.0)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (mode, rows) in enumerate(results.items()):
        xs, color = [r["concurrency"] for r in rows], f"C{i}"
        left.plot(xs, [r["throughput"] for r in rows], marker="o", color=color, label=mode)
        right.plot(xs, [r["p95_ms"] or float("nan") for r in rows], marker="o", color=color, label=f"{mode} p95")
        p50 = [r["p50_ms"] or float("nan") for r in rows]
        right.plot(xs, p50, marker=".", linestyle=":", color=color, label=f"{mode} p50")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend()
    left.set_ylabel("requests / s")
    left.set_title("throughput")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    right.set_title("latency")
    fig.suptitle(f"mlx-intent serve, {MODEL} on {platform.machine()} CPU ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(args, results, batches, loads, command: str) -> str:
    lines = [
        "# HTTP service load test: dynamic batching",
        "",
        f"Reproduce: `{command}`",
        "",
        f"- {platform.platform()}, {os.cpu_count()} cores; Python {platform.python_version()}",
        f"- load average (1, 5, 15 min) at start {loads[0]}, at end {loads[1]}: the machine is shared, so"
        " absolute figures vary from run to run; compare the two modes within one run",
        f"- server: `mlx-intent serve {' '.join(args.base_flags)}` on 127.0.0.1; clients: threads in this"
        " process using `mlx_intent.serve.client` (one request at a time each)",
        f"- {args.requests} requests per level: the same dev-set texts (all languages) at every level and in every"
        f" mode, cache off; a level stops after {args.max_seconds:g} s; latencies are seen by the client"
        " (queueing included); the servers run side by side and take turns at each level",
        "",
        "| mode | clients | done | errors | time (s) | req/s | p50 (ms) | p95 (ms) | answered by the LLM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, rows in results.items():
        for r in rows:
            errors = sum(r["errors"].values())
            lines.append(
                f"| {mode} | {r['concurrency']} | {r['done']} | {errors} | {r['seconds']:.1f} | {r['throughput']:.2f}"
                f" | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['llm_share'], '.0%')} |"
            )
    lines += ["", "| mode | batches run | texts per batch (mean) |", "|---|---:|---:|"]
    for mode, (count, total) in batches.items():
        lines.append(f"| {mode} | {count:.0f} | {total / count if count else 0:.2f} |")
    lines += ["", "Throughput over one client's:", ""]
    for mode, rows in results.items():
        base = rows[0]["throughput"]
        ups = ", ".join(f"{r['concurrency']} clients {r['throughput'] / base:.2f}x" for r in rows[1:])
        lines.append(f"- {mode}: {ups}")
    lines += ["", "Target (16 clients: >= 3x one client's throughput, p95 < 1 s):", ""]
    for mode, mode_rows in results.items():
        rows = {r["concurrency"]: r for r in mode_rows}
        if 1 in rows and 16 in rows:
            up, p95 = rows[16]["throughput"] / rows[1]["throughput"], rows[16]["p95_ms"] or float("inf")
            met = "met" if up >= 3 and p95 < 1000 else "not met"
            share = fmt(rows[16]["llm_share"], ".0%")
            lines.append(f"- {mode}: **{met}** ({up:.2f}x, p95 {p95:.0f} ms, {share} answered by the LLM)")
    lines += ["", "![throughput and latency](server_throughput.png)", ""]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="cap per level")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks/data/dev.jsonl")
    parser.add_argument("--serve-args", default="", help="extra flags for mlx-intent serve")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/reports/server.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/reports/server_throughput.png")
    args = parser.parse_args(argv)
    args.base_flags = [
        f"--chain={MODEL},keyword",
        "--cache-size=0",
        "--latency-budget-ms=600000",
        "--request-timeout-ms=600000",
        *shlex.split(args.serve_args),
    ]
    levels = [int(x) for x in args.levels.split(",")]
    texts = [row["text"] for row in read_jsonl(args.data)]

    sample = [texts[i * len(texts) // args.requests] for i in range(args.requests)]  # every language
    loads = [tuple(round(x, 2) for x in os.getloadavg())]
    servers = {}
    try:
        for mode, flags in MODES.items():
            log = Path(tempfile.gettempdir()) / f"bench_server.{mode.replace(' ', '_')}.log"
            servers[mode] = start_server([*args.base_flags, *flags], log)
        before = {}
        for mode, (_, client) in servers.items():
            for text in texts[-4:]:
                client.classify(text)  # first passes build MLX's kernels and buffers
            before[mode] = batch_histogram(client)
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for level in levels:  # the modes take turns at each level, so a change in the machine's load hits both
            for mode, (_, client) in servers.items():
                results[mode].append(run_level(client, sample, level, args.max_seconds))
                print(mode, results[mode][-1], flush=True)
        batches = {}
        for mode, (_, client) in servers.items():
            after = batch_histogram(client)
            batches[mode] = (after[0] - before[mode][0], after[1] - before[mode][1])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    loads.append(tuple(round(x, 2) for x in os.getloadavg()))

    command = "python benchmarks/bench_server.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.plot)
    save_report(report(args, results, batches, loads, command.strip()), args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
