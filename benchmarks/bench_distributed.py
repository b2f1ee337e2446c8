"""Lines per second of ``classify --input`` with 1 and 2 ranks on this machine, for the keyword-and-encoder chain
and for an LLM chain, in one run.

Run:  python benchmarks/bench_distributed.py [--data benchmarks/data/dev.jsonl] [--lines 400] [--llm-lines 64]
      [--repeats 3]

Each measurement is the whole command a user runs, timed from outside: ``mlx-intent classify --input IN --output
OUT --chain C`` in one process; ``mlx.launch -n 2 --backend ring -- mlx-intent classify ... --distributed``; and the
same 2 ranks started here with the environment mlx.launch gives a ring rank, which tells the ranks' cost from the
launcher's.  Every rank is its own process that loads its own models, so a run has a fixed cost (start, imports,
model load, the ring's setup) besides its lines: the same command on one batch (8 lines) measures it, and
*classifying* lines per second is (lines - 8) / (wall - that).  Beside the wall time, the CPU time of every process
of the command (getrusage of the children): on a shared machine the wall time says how long a user waits, the CPU
time how much work a line costs.  The three ways rotate, each measured ``--repeats`` times; medians.  The latency
budget is lifted (``--latency-budget-ms 600000``) so no tier times out on the loaded machine and every way writes
the same OUT (checked, timing fields aside).  Last, 2 ranks time 200 of the ``all_sum`` calls that count their
lines, and mlx.launch's own CPU is read while its ranks sleep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save_report

from mlx_intent import distributed
from mlx_intent.distributed import STEP_SECONDS

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).with_name("mlx.launch")
CHAINS = {"keyword-and-encoder": "e5-small,keyword", "LLM": "smollm2-135m,keyword"}
TIMING = ("latency_ms", "latency_per_query_ms")
SMALL = 8  # one batch: the fixed cost of a run
SYNC = """
import time
from mlx_intent import distributed
group = distributed.init(True)
distributed.all_sum(group, [1, 1, 1, 1])
start = time.perf_counter()
for _ in range(200):
    distributed.all_sum(group, [1, 1, 1, 1])
if group.rank() == 0:
    print((time.perf_counter() - start) / 200 * 1000)
"""


WAYS = ("1 process", "2 ranks, mlx.launch", "2 ranks, started directly")


def run(way: str, cli: list[str], work: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of every process, rank 0's stdout) of ``cli`` run ``way``: alone; 2 ranks under
    ``mlx.launch -n 2 --backend ring``; or 2 ranks started here with the environment mlx.launch gives a ring
    rank (MLX_RANK, and MLX_HOSTFILE naming both ranks' addresses), which leaves the launcher out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = distributed.free_ports()
    hostfile = work / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    if way == WAYS[1]:
        commands = [[str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(port), "--", *cli]]
    else:
        commands = [cli] if way == WAYS[0] else [cli, cli]
    read, write = os.pipe()  # mlx.launch polls stdin: an open, silent pipe keeps it from spinning on EOF
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            cmd,
            stdin=read,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if way != WAYS[2] else {**env, "MLX_RANK": str(k), "MLX_HOSTFILE": str(hostfile)},
        )
        for k, cmd in enumerate(commands)
    ]
    outputs = [proc.communicate() for proc in procs]
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.close(read)
    os.close(write)
    for proc, (_, err) in zip(procs, outputs):
        if proc.returncode != 0 or "Traceback" in err or "WARN" in err:
            sys.exit(f"{' '.join(proc.args)} failed:\n{err[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, outputs[0][0]


def comparable(path: Path) -> list[str]:
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in rows]


def measure(name: str, chain: str, rows: list[str], repeats: int, work: Path) -> dict:
    """Medians of (wall, CPU) for the full input and for one batch, each way, the ways' order rotating."""
    full, small = work / f"{name}.jsonl", work / f"{name}-small.jsonl"
    full.write_text("".join(rows), encoding="utf-8")
    small.write_text("".join(rows[:SMALL]), encoding="utf-8")
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(repeats):
        for way in WAYS[r % 3 :] + WAYS[: r % 3]:
            for label, src in (("full", full), ("small", small)):
                out = work / f"{name}-{WAYS.index(way)}-{label}.out.jsonl"
                cli = [sys.executable, "-m", "mlx_intent", "classify", "--input", str(src), "--output", str(out)]
                cli += ["--chain", chain, "--latency-budget-ms", "600000"]
                wall, cpu, _ = run(way, cli + ([] if way == WAYS[0] else ["--distributed"]), work)
                runs.setdefault((way, label), []).append((wall, cpu))
                print(f"{name}: {way}, {label}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
    one = comparable(work / f"{name}-0-full.out.jsonl")
    same = all(comparable(work / f"{name}-{k}-full.out.jsonl") == one for k in (1, 2))
    medians = {k: tuple(statistics.median(x[i] for x in v) for i in (0, 1)) for k, v in runs.items()}
    return {"runs": medians, "lines": len(rows), "same": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "dev.jsonl")
    ap.add_argument("--lines", type=int, default=400, help="Lines for the keyword-and-encoder chain.")
    ap.add_argument("--llm-lines", type=int, default=64, help="Lines for the LLM chain.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "distributed.md")
    args = ap.parse_args()

    dev = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n" for r in dev]
    sizes = {"keyword-and-encoder": args.lines, "LLM": args.llm_lines}
    before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {
            name: measure(name, chain, lines[: sizes[name]], args.repeats, work) for name, chain in CHAINS.items()
        }
        sync_ms = float(run(WAYS[2], [sys.executable, "-c", SYNC], work)[2])
        idle = run(WAYS[1], [sys.executable, "-c", "import time; time.sleep(5)"], work)
    after = os.getloadavg()
    save_report(render(args, results, sync_ms, idle, before, after), args.out)


def render(args, results: dict, sync_ms: float, idle: tuple[float, float, str], before, after) -> str:
    data = args.data.resolve()
    shown = data.relative_to(ROOT) if data.is_relative_to(ROOT) else data
    out = [
        "# Distributed classify: 1 and 2 ranks on one machine",
        "",
        f"Reproduce: `python benchmarks/bench_distributed.py --data {shown} --lines {args.lines} "
        f"--llm-lines {args.llm_lines} --repeats {args.repeats}`",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, **shared with "
        f"other jobs**; load average (1/5/15 min) {' '.join(f'{x:.2f}' for x in before)} before, "
        f"{' '.join(f'{x:.2f}' for x in after)} after. Both ranks of a 2-rank run share these 2 cores.",
        "",
        "Medians of the whole command, timed from outside (start, imports, model load, the ring's setup, "
        "classifying, rank 0's merge). *Fixed*: the same command on one batch (8 lines). *Classifying* lines/s: "
        "(lines - 8) / (wall - fixed). *CPU ms per line*: (CPU of the full run - CPU of the one-batch run) / "
        "(lines - 8), every process of the command counted (`getrusage` of the children). Two ranks run "
        "`classify --distributed` over the ring backend on loopback, each rank loading its own models: under "
        "`mlx.launch -n 2 --backend ring`, and *started directly* with the environment mlx.launch gives a ring "
        "rank (`MLX_RANK`, `MLX_HOSTFILE`), to tell the ranks' own cost from the launcher's. The latency budget is "
        "lifted (`--latency-budget-ms 600000`) so that no tier times out on the loaded machine.",
        "",
        "| chain | `--chain` | lines | run | wall (s) | fixed (s) | lines/s end to end | lines/s classifying "
        "| CPU ms per line | fixed CPU (s) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    derived = {}
    for name, res in results.items():
        for way in WAYS:
            (wall, cpu), (fixed, fixed_cpu) = res["runs"][(way, "full")], res["runs"][(way, "small")]
            n = res["lines"] - SMALL
            rate = n / (wall - fixed) if wall > fixed else float("nan")
            derived[(name, way)] = {"rate": rate, "cpu_ms": (cpu - fixed_cpu) / n * 1000, "fixed": fixed}
            out.append(
                f"| {name} | `{CHAINS[name]}` | {res['lines']} | {way} | {wall:.1f} | {fixed:.1f} | "
                f"{res['lines'] / wall:.1f} | {rate:.1f} | {derived[(name, way)]['cpu_ms']:.1f} | {fixed_cpu:.1f} |"
            )
    same = all(res["same"] for res in results.values())
    out += [
        "",
        f"Every 2-rank OUT {'equals' if same else '**differs from**'} the 1-process OUT line for line, keys sorted, "
        "`latency_ms` and `latency_per_query_ms` aside (they time each call).",
        "",
        f"Counting lines: one `all_sum` per step of about {STEP_SECONDS:g} s of work, {sync_ms:.2f} ms a call here "
        f"(2 ranks started directly, loopback, 200 calls): {sync_ms / 10 / STEP_SECONDS:.2f}% of a step.",
        "",
        f"The launcher: while its 2 ranks only slept for 5 s, `mlx.launch` and the ranks used {idle[1]:.1f} CPU s in "
        f"{idle[0]:.1f} s. Its thread per rank calls `select` on the rank's stdin pipe, which is always writable, "
        "so it never blocks (mlx 0.32.4, `mlx/_distributed_utils/launch.py`); Python's lock keeps that polling under "
        "about one core. On a Mac with 8 or more cores that is a small tax; on this 2-core "
        "machine it takes much of what the ranks would use.",
        "",
        "## What it means for N machines",
        "",
    ]
    for name in results:
        one, launched, direct = (derived[(name, way)] for way in WAYS)
        out.append(
            f"- **{name}**: 2 ranks classify at {launched['rate'] / one['rate']:.2f}x one process's lines/s under "
            f"mlx.launch, {direct['rate'] / one['rate']:.2f}x started directly; CPU per line "
            f"{launched['cpu_ms'] / one['cpu_ms']:.2f}x and {direct['cpu_ms'] / one['cpu_ms']:.2f}x; the fixed "
            f"cost {one['fixed']:.1f} s alone, {launched['fixed']:.1f} s and {direct['fixed']:.1f} s with 2 ranks."
        )
    llm, encoder = derived[("LLM", WAYS[0])]["rate"], derived[("keyword-and-encoder", WAYS[0])]["rate"]
    out += [
        "",
        "Two ranks on one 2-core machine that other jobs also use cannot be faster than one: they split the same "
        "two cores, each process runs its own threads (MLX, OpenBLAS), and a rank that waits for the other in an "
        "`all_sum` polls its socket. The table measures what distribution costs, not what it gains. On N Macs each "
        "rank has a machine to itself, so the job takes about *fixed + lines / (N x one Mac's classifying "
        "lines/s)*: the fixed cost is paid on every Mac at once (each loads its own copy of the model: for Llama "
        "3.2 3B, seconds and 4-6 GB on each), counting lines adds well under 1%, and rank 0's merge costs "
        "microseconds a line (it holds every result in memory). Shares are equal in lines, so the slowest Mac sets "
        "the pace: mix Macs of one speed. N Macs pay off when the lines take much longer than the fixed cost: "
        f"months of logs through an LLM chain ({llm:.1f} lines/s for the bundled 135M model in one process here). "
        f"For one assistant's traffic, or the keyword-and-encoder chain ({encoder:.0f} lines/s in one process "
        "here), one Mac is enough: the launch and the model loads would take longer than the work.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
