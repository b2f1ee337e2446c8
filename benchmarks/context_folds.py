"""How the conversation design was chosen without reading context-dev: each training author held out in turn.

context-train.jsonl holds three independent authors' conversations (ids ctx-A-…, ctx-C-…, ctx-D-…).  For each
held-out author X this trains e5-small as `mlx-intent train e5-small` does (train, public-train, the other
authors' conversations and request pairs; calibrated on calib and public-calib) into a scratch folder, then
classifies X's conversations with the default chain (e5-small blended with the keyword tier, then general)
and its pair test (mlx_intent/context.py).  context-dev (author B) is never read here.  About 15 CPU-minutes
per fold on 2 cores; the shipped head is untouched.

    python benchmarks/context_folds.py [--hold C --hold D] [--work DIR] [--report benchmarks/reports/context-folds.md]
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import click

from mlx_intent import encoder
from mlx_intent.chain import build_chain
from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.evaluation.report import kind_table, pct
from mlx_intent.evaluation.run import run, summarize
from mlx_intent.settings import load_settings
from mlx_intent.tuner.augment import with_request_pairs
from mlx_intent.tuner.encoder import train_encoder


def author(row: dict) -> str:
    return row["id"].split("-")[1]


def fold_rows(conversations: list[dict], held: str, home: Path, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training rows without author ``held``, calibration rows), as the train command builds them."""
    rows = [{**r, "_source": n} for n in ("train", "public-train") for r in read_labelled(data_path(n, home))]
    rows = with_request_pairs(
        rows + [{**r, "_source": "context-train"} for r in conversations if author(r) != held], seed
    )
    calib = [{**r, "_source": n} for n in ("calib", "public-calib") for r in read_labelled(data_path(n, home))]
    return rows, calib


@click.command()
@click.option("--hold", "held", multiple=True, default=("C", "D"), show_default=True, help="Authors to hold out.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("models/context-folds"), show_default=True)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the tables here.")
def main(held: tuple[str, ...], work: Path, report: Path | None) -> None:
    home = load_settings().home
    conversations = read_labelled(data_path("context-train", home))
    lines = [
        "# Conversations: each training author held out in turn",
        "",
        f"Reproduce: `python {' '.join(sys.argv)}`",
        "",
    ]
    for x in held:
        head = work / f"without-{x}"
        if not (head / encoder.HEAD_CONFIG).exists():  # a fold trained before is reused
            train_rows, calib = fold_rows(conversations, x, home)
            train_encoder(train_rows, calib, out_dir=head, home=home, report=lambda m: click.echo(m, err=True))
        rows = [r for r in conversations if author(r) == x]
        with mock.patch.object(encoder, "HEAD_DIR", head):  # the tier loads the fold's head, not the shipped one
            chain = build_chain(load_settings(), names=["e5-small", "keyword", "general"])
            s = summarize(rows, run(chain, rows, batch_size=32, desc=f"author {x}"), "e5-small")
        lines += [f"## Author {x} held out: {pct(s['accuracy'])} ({s['correct']}/{s['n']})", ""]
        lines += kind_table(s["per_kind_lang"])[2:] + [""]
    text = "\n".join(lines)
    click.echo(text)
    if report is not None:
        report.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
