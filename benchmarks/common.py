"""What every benchmark script shares: reading JSONL, percentiles, writing the report."""

from __future__ import annotations

from pathlib import Path

from mlx_intent import jsonl
from mlx_intent.evaluation import scores


def read_jsonl(path: Path) -> list[dict]:
    """Every value of a JSONL file (mlx_intent.jsonl: a bad line raises JSONLError naming it)."""
    return [value for _, value in jsonl.read_jsonl(path)]


def percentile(values: list[float], q: float) -> float:
    """numpy's (linear-interpolation) percentile, the one metrics, stats and eval reports use; the values
    need not be sorted.  (Was nearest-rank of a list assumed sorted, a second definition.)"""
    return scores.percentile(values, q)


def save_report(report: str, path: Path) -> None:
    """Print the report and write it to ``path``."""
    print(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report, encoding="utf-8")
