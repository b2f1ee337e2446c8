"""What starting the CLI costs: modules imported and wall time of ``mlx-intent --version`` and ``--help``.

Run:  python benchmarks/bench_cli_import.py [--before DIR] [--repeats 15] [--out benchmarks/reports/cli-import.md]

Each run is ``python -X importtime -m mlx_intent FLAG`` in a fresh process, with PYTHONPATH set to a source tree:
this repository, and with ``--before DIR`` another checkout (``git archive COMMIT | tar -x -C DIR``) measured in the
same loop, the two alternating, so a load spike on a shared machine hits both.  Modules: the lines of
``-X importtime`` (every module the process imported, the standard library's included, each once) and those of them
under mlx_intent.  Wall: the process from start to exit, the median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--version", "--help")


def run_once(tree: Path, flag: str) -> tuple[int, int, float]:
    """(modules imported, of them mlx_intent's, wall seconds) of one ``python -m mlx_intent FLAG``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mlx_intent", flag],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    names = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    names = set(names[1:])  # less the header line; a module imported again is listed again
    return len(names), sum(n.split(".")[0] == "mlx_intent" for n in names), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="another source tree, measured in the same loop")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": ROOT} if args.before else {"this tree": ROOT}
    seen: dict[tuple[str, str], list[tuple[int, int, float]]] = {(t, f): [] for t in trees for f in FLAGS}
    for flag in FLAGS:
        for tree in trees.values():
            run_once(tree, flag)  # warm the file cache and the bytecode
        for _ in range(args.repeats):
            for name, tree in trees.items():
                seen[name, flag].append(run_once(tree, flag))
    lines = [
        "| command | tree | modules imported | of them mlx_intent | wall, median (min-max) |",
        "|---|---|---:|---:|---:|",
    ]
    for flag in FLAGS:
        for name in trees:
            runs = seen[name, flag]
            walls = [w for _, _, w in runs]
            lines.append(
                f"| `mlx-intent {flag}` | {name} | {runs[0][0]} | {runs[0][1]} | "
                f"{statistics.median(walls) * 1000:.0f} ms ({min(walls) * 1000:.0f}-{max(walls) * 1000:.0f}) |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        shown = " ".join(["python benchmarks/bench_cli_import.py", *sys.argv[1:]])
        args.out.write_text(
            "# What starting the CLI costs\n\n"
            f"Reproduce: `{shown}` ({args.repeats} runs of each, alternating; "
            f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, a machine shared with other work).\n\n"
            + table
            + "\n"
        )


if __name__ == "__main__":
    main()
