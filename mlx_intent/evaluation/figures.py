"""The PNG figures of an ``mlx-intent eval`` report: confusion matrix, reliability diagram, accuracy per
language and latency histogram.  Apart because they need matplotlib, which the package does not require."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: files only, no display
from matplotlib.figure import Figure

from mlx_intent.evaluation.report import lang_order, num, pct
from mlx_intent.schema import INTENTS


def write_figures(summary: dict[str, Any], report: Path) -> dict[str, str]:
    """PNG figures beside the report (<stem>-<figure>.png); {figure: file name}.  Needs matplotlib."""
    s = summary
    written = {}

    def save(fig: Figure, key: str) -> None:
        fig.tight_layout()
        name = f"{report.stem}-{key}.png"
        FigureCanvasAgg(fig).print_png(report.parent / name)
        written[key] = name

    labels = list(INTENTS)
    matrix = np.array([[s["confusion"].get((g, p), 0) for p in labels] for g in labels], dtype=float)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(9, 8))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (g, p), n in np.ndenumerate(matrix):
        if n:
            ax.text(
                p, g, f"{n:.0f}", ha="center", va="center", fontsize=7, color="white" if share[g, p] > 0.5 else "black"
            )
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(
        xlabel="predicted",
        ylabel="gold",
        title=f"Confusion matrix (counts; colour = share of the gold row), accuracy {pct(s['accuracy'])}",
    )
    fig.colorbar(image, ax=ax, fraction=0.046)
    save(fig, "confusion")

    bins = s["reliability"]
    used = [b for b in bins if b["count"]]
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    width = bins[0]["high"] - bins[0]["low"]
    ax.bar(
        [b["low"] for b in used],
        [b["accuracy"] for b in used],
        width=width,
        align="edge",
        edgecolor="white",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.scatter(
        [b["confidence"] for b in used],
        [b["accuracy"] for b in used],
        color="tab:red",
        s=12,
        zorder=3,
        label="mean confidence",
    )
    for b in used:
        ax.text(b["low"] + width / 2, 0.02, str(b["count"]), ha="center", fontsize=7, color="white")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence",
        ylabel="accuracy",
        title=f"Reliability (ECE {num(s['ece'])}; n per bin at the foot of each bar)",
    )
    ax.legend(loc="upper left")
    save(fig, "reliability")

    langs = lang_order(s["per_lang"])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    values = [s["per_lang"][k]["accuracy"] for k in langs]
    ax.bar(langs, values, color="tab:green")
    for x, v in enumerate(values):
        ax.text(x, v + 0.01, f"{v:.0%}", ha="center", fontsize=8)
    ax.axhline(s["accuracy"], color="k", ls="--", lw=1)
    ax.set(ylim=(0, 1.08), ylabel="accuracy", title=f"Accuracy per language (dashed: overall {pct(s['accuracy'])})")
    save(fig, "languages")

    latency = np.asarray(s["latencies"])
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    low, high = max(latency.min(), 1e-3), max(latency.max(), 1e-3)
    if high / low > 20:
        ax.hist(latency, bins=np.geomspace(low, high * 1.0001, 40), color="tab:blue")
        ax.set_xscale("log")
    else:
        ax.hist(latency, bins=40, color="tab:blue")
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        ax.axvline(s["latency"][q], color="k", ls=style, lw=1, label=f"p{q} {s['latency'][q]:.1f} ms")
    ax.set(xlabel="latency per query (ms)", ylabel="queries", title="Latency per query")
    ax.legend()
    save(fig, "latency")
    return written
