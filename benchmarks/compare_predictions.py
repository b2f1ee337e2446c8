"""Two heads (or chains) side by side, from the files `mlx-intent eval --predictions` wrote for each.

For each set found in both folders (SET.jsonl), per language: accuracy, ECE beside the ECE a perfectly
calibrated model shows on as many rows, greeting precision, and McNemar's test of the accuracy difference
on the same rows.  Nothing is run here, so the figures are exactly those of the two eval runs.

    mlx-intent eval dev --predictions A/dev.jsonl ...     # once with each head installed
    python benchmarks/compare_predictions.py A B --names "before,after" --report benchmarks/reports/X.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import read_jsonl, save_report

from mlx_intent.evaluation import scores
from mlx_intent.evaluation.report import lang_order, pct, table


def figures(rows: list[dict]) -> str:
    """'accuracy (ECE / perfect-calibration mean; greeting precision)' for some rows."""
    if not rows:
        return "-"
    conf, right = [r["confidence"] for r in rows], [r["correct"] for r in rows]
    said = [r for r in rows if r["primary_intent"] == "greeting"]
    greeting = f"; greeting {sum(r['correct'] for r in said)}/{len(said)}" if said else ""
    return (
        f"{pct(sum(right) / len(rows))} (ECE {scores.ece(conf, right):.3f} / {scores.ece_floor(conf)[0]:.3f}"
        f"{greeting})"
    )


def compare(a: list[dict], b: list[dict], name: str, names: tuple[str, str]) -> list[str]:
    by_id = {r["id"]: r for r in b}
    pairs = [(r, by_id[r["id"]]) for r in a if r["id"] in by_id]
    if len(pairs) != len(a) or len(pairs) != len(b):
        raise SystemExit(f"{name}: the two runs hold different rows ({len(a)} and {len(b)})")
    rows = []
    for lang in [*lang_order({r["lang"] for r in a}), None]:
        sel = [(x, y) for x, y in pairs if lang is None or x["lang"] == lang]
        test = scores.mcnemar([x["correct"] for x, _ in sel], [y["correct"] for _, y in sel])
        rows.append(
            [
                lang or "**all**",
                str(len(sel)),
                figures([x for x, _ in sel]),
                figures([y for _, y in sel]),
                f"{test['c']} / {test['b']}",
                f"{test['p']:.3g}",
            ]
        )
    head = ["language", "n", names[0], names[1], f"{names[1]} alone right / {names[0]} alone right", "McNemar p"]
    return [f"## {name}", "", *table(head, rows), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="folder of the first run's prediction files")
    parser.add_argument("b", type=Path, help="folder of the second run's prediction files")
    parser.add_argument("--names", default="A,B", help="the two runs' names, comma-separated")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--title", default="Two runs side by side")
    args = parser.parse_args()
    names = tuple(args.names.split(",", 1))
    sets = sorted(p.stem for p in args.a.glob("*.jsonl") if (args.b / p.name).is_file())
    if not sets:
        raise SystemExit(f"no prediction file is in both {args.a} and {args.b}")
    out = [
        f"# {args.title}",
        "",
        "Each cell: accuracy (ECE / the mean ECE a perfectly calibrated model shows on as many rows; greeting: "
        "right of answered `greeting`). McNemar's test on the same rows.",
        "",
    ]
    for name in sets:
        out += compare(read_jsonl(args.a / f"{name}.jsonl"), read_jsonl(args.b / f"{name}.jsonl"), name, names)
    save_report("\n".join(out), args.report)


if __name__ == "__main__":
    main()
