"""What every benchmark script shares: reading JSONL, percentiles, writing the report."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_intent.evaluation import scores


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def percentile(values: list[float], q: float) -> float:
    """numpy's (linear-interpolation) percentile, the one metrics, stats and eval reports use; the values
    need not be sorted.  (Was nearest-rank of a list assumed sorted, a second definition.)"""
    return scores.percentile(values, q)


def save_report(report: str, path: Path) -> None:
    """Print the report and write it to ``path``."""
    print(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report, encoding="utf-8")
