"""Conversion, load and forward time of the bundled SmolLM2-135M: OpenBLAS vs MLX's own BLAS,
4-bit vs dequantized float32 weights.

Run:  python benchmarks/bench_foundation.py [--repeats 3] [--rounds 2] [--report benchmarks/reports/foundation.md]

OpenBLAS can only take over MLX's BLAS if it is loaded before mlx.core is imported, so each
BLAS setting runs in its own subprocesses (MLX_INTENT_OPENBLAS=0 keeps MLX's BLAS), alternated
over rounds so that other load on the machine hits both alike.  Each process times the GGUF
conversion, ``loading.load`` with 4-bit and with float32 weights, and one forward pass over a
64-token prompt (all logits, ``mx.eval``), each repeated after one warm-up; the report gives
medians and the spread.  On macOS (Metal) there is no OpenBLAS to load: its column reads n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
PROMPT_TOKENS = 64
PROMPT = (
    "I am travelling from Istanbul to Paris next week with my two children. Could you find a family hotel near "
    "the Gare du Nord, check whether the museums are open on Monday, and tell me how to get from the airport "
    "to the city centre by train? We land at half past nine in the evening."
)
SETTINGS = {"OpenBLAS": "1", "MLX's BLAS": "0"}  # value of MLX_INTENT_OPENBLAS
ROWS = [
    ("convert", "GGUF → MLX 4-bit conversion", "-"),
    ("load 4-bit", "load", "4-bit"),
    ("load float32", "load", "float32 (dequantized at load)"),
    ("forward 4-bit", f"forward, {PROMPT_TOKENS} tokens", "4-bit"),
    ("forward float32", f"forward, {PROMPT_TOKENS} tokens", "float32"),
    ("matmul", "float32 matmul 1024×1024", "float32"),
]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def worker(repeats: int) -> dict:
    """One BLAS setting, in this process: every step ``repeats`` times after a warm-up."""
    from mlx_intent.models import backend

    openblas = backend.use_openblas()  # before mlx.core, or it cannot take over
    import mlx.core as mx
    import mlx_lm

    from mlx_intent.models import registry
    from mlx_intent.models.gguf import convert_gguf
    from mlx_intent.models.loading import load
    from mlx_intent.settings import load_settings

    gguf = registry.bundled_gguf(registry.get_spec(MODEL))
    home = load_settings().home
    out = registry.model_dir(MODEL, home)
    convert_gguf(gguf, out)
    times = {"convert": timed(lambda: convert_gguf(gguf, out), repeats)}
    for weights, dequantize in (("4-bit", False), ("float32", True)):
        load(MODEL, dequantize=dequantize, home=home)
        times[f"load {weights}"] = timed(lambda d=dequantize: load(MODEL, dequantize=d, home=home), repeats)
        model, tokenizer = load(MODEL, dequantize=dequantize, home=home)
        ids = tokenizer.encode(PROMPT * 2)[:PROMPT_TOKENS]
        assert len(ids) == PROMPT_TOKENS
        x = mx.array([ids])
        mx.eval(model(x))
        times[f"forward {weights}"] = timed(lambda m=model, x=x: mx.eval(m(x)), repeats)
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    times["matmul"] = timed(lambda: mx.eval(a @ a), repeats)
    return {
        "openblas": openblas,
        "device": backend.device_name(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "times": times,
    }


def run_setting(value: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        env = os.environ | {"MLX_INTENT_HOME": home, "MLX_INTENT_OPENBLAS": value}
        cmd = [sys.executable, __file__, "--worker", "--repeats", str(repeats)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker with MLX_INTENT_OPENBLAS={value} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(seconds: float | None, row: str) -> str:
    if seconds is None:
        return "n/a"
    if row == "matmul":
        return f"{2 * 1024**3 / seconds / 1e9:.1f} GFLOP/s"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def cell(times: list[float] | None, row: str) -> str:
    """Median (best–worst): the spread shows how noisy the machine was."""
    if times is None:
        return "n/a"
    return f"{fmt(statistics.median(times), row)} ({fmt(min(times), row)}–{fmt(max(times), row)})"


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def report(results: dict[str, dict | None], runs: int, command: str, load: str) -> str:
    first = next(r for r in results.values() if r)
    med = {
        (setting, row): (statistics.median(r["times"][row]) if r else None)
        for setting, r in results.items()
        for row in first["times"]
    }
    blas, own = SETTINGS
    lines = [
        "# Foundation benchmark: bundled SmolLM2-135M (Q4_1 GGUF)",
        "",
        f"Reproduce: `{command}`",
        "",
        f"- device: {first['device']}; platform: {platform.platform()}; CPU: {cpu_name()}, {os.cpu_count()} cores",
        f"- mlx {first['mlx']}, mlx-lm {first['mlx_lm']}, Python {platform.python_version()}",
        f"- OpenBLAS: {results[blas]['openblas'] if results[blas] else 'n/a (not Linux or not installed)'}",
        f"- median (best–worst) of {runs} runs, each process warmed up once; BLAS settings in alternating processes",
        f"- load average (1/5/15 min) before / after: {load} (other work on the machine inflates the spread)",
        "",
        f"| step | weights | {blas} | {own} | time {own} / {blas} |",
        "|---|---|---:|---:|---:|",
    ]
    for row, step, weights in ROWS:
        a, b = med[blas, row], med[own, row]
        ratio = f"{b / a:.2f}×" if a and b else "n/a"
        cells = [cell(results[s]["times"][row] if results[s] else None, row) for s in (blas, own)]
        lines.append(f"| {step} | {weights} | {cells[0]} | {cells[1]} | {ratio} |")
    lines += ["", f"| time 4-bit / float32 | {blas} | {own} |", "|---|---:|---:|"]
    for step in ("load", "forward"):
        cells = []
        for setting in SETTINGS:
            q, f = med[setting, f"{step} 4-bit"], med[setting, f"{step} float32"]
            cells.append(f"{q / f:.2f}×" if q and f else "n/a")
        lines.append(f"| {step} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step per worker process")
    parser.add_argument("--rounds", type=int, default=2, help="worker processes per BLAS setting, alternated")
    parser.add_argument("--report", type=Path, help="also write the markdown report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return
    before = load_average()
    results: dict[str, dict | None] = {}
    for round_ in range(args.rounds):  # alternate the settings so that a busy spell hits both alike
        for setting, value in SETTINGS.items():
            result = run_setting(value, args.repeats)
            if value == "1" and not result["openblas"]:
                result = None  # macOS, or no system OpenBLAS: same as MLX's BLAS, not worth a column
            elif value == "0" and result["openblas"]:
                raise SystemExit("MLX_INTENT_OPENBLAS=0 did not keep OpenBLAS out")
            if round_ and result:
                for row, times in result["times"].items():
                    results[setting]["times"][row] += times
            else:
                results[setting] = result
            print(f"round {round_ + 1}/{args.rounds}: {setting} done", file=sys.stderr)
    command = "python benchmarks/bench_foundation.py " + " ".join(sys.argv[1:])
    text = report(results, args.repeats * args.rounds, command.strip(), f"{before} / {load_average()}")
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)


if __name__ == "__main__":
    main()
