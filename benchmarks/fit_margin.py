"""Fit the ambiguity margin (MLX_INTENT_MARGIN) of the default chain on the calibration split alone.

Each tier of the default chain runs once per text (memoized); the chain's own rules then decide each
margin of the grid, so every figure is what ``mlx-intent classify --margin M`` answers.  The margin chosen
maximizes primary accuracy on calib (ties: the smaller margin), and is adopted only where it beats no
margin (0) by at least MIN_GAIN: below that the gain is a few rows of 565.  dev and probe are printed beside
it as held-out checks, never used for the choice.

    python benchmarks/fit_margin.py                  # writes benchmarks/reports/ambiguity-fit.md
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from common import save_report

from mlx_intent.chain import build_chain
from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.settings import load_settings

GRID = (0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
MIN_GAIN = 0.005  # half a point of accuracy on calib
SETS = ("calib", "dev", "probe")


def memo(run):
    """A tier's run that answers each text once, whatever the margin asked of it later."""
    seen: dict[str, dict] = {}

    def wrapped(texts: list[str]) -> list[dict]:
        new = [t for t in dict.fromkeys(texts) if t not in seen]
        if new:
            seen.update(zip(new, run(new)))
        return [dict(seen[t]) for t in texts]

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "reports" / "ambiguity-fit.md")
    args = parser.parse_args()
    settings = load_settings()
    chain = build_chain(settings)
    tiers = [replace(t, run=memo(t.run)) for t in chain.tiers]
    rows = {name: read_labelled(data_path(name, settings.home)) for name in SETS}
    table: dict[str, dict[float, tuple[float, int, int]]] = {name: {} for name in SETS}
    for margin in GRID:
        variant = chain.derive(tiers=[replace(t, margin=margin) for t in tiers], cache_size=0)
        for name, labelled in rows.items():
            results = variant.classify_batch([r["text"] for r in labelled])
            right = sum(res["primary_intent"] == r["primary_intent"] for res, r in zip(results, labelled))
            passed = sum(any(f["kind"] == "ambiguous" for f in res["fallbacks"]) for res in results)
            flagged = sum(res["ambiguous"] for res in results)
            table[name][margin] = (right / len(labelled), passed, flagged)
    calib = table["calib"]
    best = max(GRID, key=lambda m: (calib[m][0], -m))
    chosen = best if calib[best][0] - calib[0.0][0] >= MIN_GAIN else 0.0
    lines = [
        "# Ambiguity margin: the fit",
        "",
        "`python benchmarks/fit_margin.py` (tiers: " + ", ".join(t.name for t in chain.tiers) + ")",
        "",
        "| margin | " + " | ".join(f"{n} accuracy | {n} passed over / flagged" for n in SETS) + " |",
        "|---:|" + "---:|---:|" * len(SETS),
    ]
    for m in GRID:
        cells = [f"{table[n][m][0]:.2%} | {table[n][m][1]} / {table[n][m][2]}" for n in SETS]
        lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Best on calib: {best:g} ({calib[best][0]:.2%} against {calib[0.0][0]:.2%} at 0); "
        f"adopted: {chosen:g} (a margin must gain at least {MIN_GAIN:.1%} on calib).",
    ]
    save_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
