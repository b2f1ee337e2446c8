"""Chains side by side on our own sets and on human-written public ones: which should be the default?

Every configuration runs through ``mlx_intent.evaluation.run`` exactly as ``mlx-intent eval`` runs it
(query cache off), on every set in one process: dev and probe (ours, reported, never fitted on), the
held-out splits of the public training corpora (never trained on) and the reserved public sets (never
used for anything but this).  Calibrations are fitted on the calibration split (benchmarks/data/calib.jsonl
plus public-calib), which is not reported here.  The public sets come from ``mlx-intent data build``.

    python benchmarks/bench_chains.py                       # the configurations below, all sets
    python benchmarks/bench_chains.py --configs e5,e5+kw --sets dev,probe
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from common import save_report

from mlx_intent.evaluation.data import data_path, read_labelled
from mlx_intent.evaluation.report import lang_order, pct
from mlx_intent.evaluation.run import make_chain, run, summarize
from mlx_intent.settings import load_settings

# name -> (tiers, settings overrides)
CONFIGS: dict[str, tuple[tuple[str, ...], dict]] = {
    "kw": (("keyword",), {}),
    "e5": (("e5-small",), {"min_confidence": 0.0}),
    "e5+kw": (("e5-small", "keyword"), {}),  # the blend (MLX_INTENT_COMBINE=on, the default)
    "e5+kw-floor": (("e5-small", "keyword"), {"combine": False}),  # e5 answers above the keyword floor
    "e5+kw-0.5": (("e5-small", "keyword"), {"combine": False, "keyword_floor": False}),  # ... above 0.5
    "smol+kw": (("smollm2-135m", "keyword"), {}),  # the default chain before e5-small
    "smol+e5+kw": (("smollm2-135m", "e5-small", "keyword"), {}),  # floor rule, then the blend
    "e5+smol+kw": (("e5-small", "smollm2-135m", "keyword"), {}),  # cheap first: the LLM when e5 is unsure
}
OURS = ("dev", "probe")
HELDOUT = ("public-heldout-clinc150", "public-heldout-hwu64", "public-heldout-slurp", "public-heldout-massive")
RESERVED = ("reserved-clinc150", "reserved-slurp", "reserved-xsid", "reserved-snips", "reserved-massive")
SETS = OURS + HELDOUT + RESERVED
SHORT = {s: s.replace("public-heldout-", "held-out ").replace("reserved-", "reserved ") for s in SETS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated data names")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "reports" / "chains.md")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    sets = [s for s in args.sets.split(",") if s]
    base = load_settings()
    data = {s: read_labelled(data_path(s, base.home)) for s in sets}
    table: dict[tuple[str, str], dict] = {}
    started = time.time()
    for name in configs:
        tiers, overrides = CONFIGS[name]
        settings = dataclasses.replace(base, **overrides)
        chain = make_chain(tiers, settings)
        for s in sets:
            outcome = run(chain, data[s], settings.batch_size, desc=f"{name} on {s}")
            table[name, s] = summarize(data[s], outcome, chain.names[0])
            a = table[name, s]
            print(f"{name:>14} {s:<26} acc {pct(a['accuracy'])}  ece {a['ece']:.3f}", file=sys.stderr)
    lines = [
        "# Chains side by side, our sets and human-written public sets",
        "",
        f"`python benchmarks/bench_chains.py --configs {','.join(configs)} --sets {','.join(sets)}`",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end; the query cache is off.",
        "",
        "Configurations (tiers in order; `general` always closes the chain): "
        + "; ".join(f"`{n}` = {' → '.join(CONFIGS[n][0])} {CONFIGS[n][1] or ''}".strip() for n in configs),
        "",
        "Sets: dev and probe are ours (reported, never fitted on); `held-out` are the public training corpora's",
        "splits that are never trained on; `reserved` are public sets used for nothing but evaluation. Rows:",
        ", ".join(f"{SHORT[s]} {len(data[s])}" for s in sets) + ".",
        "",
    ]
    for metric, title, fmt in (
        ("accuracy", "Accuracy (primary intent)", pct),
        ("ece", "ECE (15 bins)", lambda x: "-" if x is None else f"{x:.3f}"),
        ("exact_multi", "Multi-intent exact match (rows with more than one gold intent)", pct),
        ("greeting_precision", "Greeting precision (answers `greeting` that are)", pct),
        ("per_query_ms", "Wall time per query, ms (batches of 8)", lambda x: f"{x:.1f}"),
    ):
        lines += [f"## {title}", "", "| config | " + " | ".join(SHORT[s] for s in sets) + " |"]
        lines += ["|---|" + "---:|" * len(sets)]
        for name in configs:
            lines.append(f"| `{name}` | " + " | ".join(fmt(table[name, s][metric]) for s in sets) + " |")
        lines.append("")
    for key, title, fmt in (
        ("accuracy", "accuracy", pct),
        ("ece", "ECE", lambda x: "-" if x is None else f"{x:.3f}"),
        ("greeting_precision", "greeting precision", pct),
    ):
        lines += [f"## Per language ({title})", ""]
        for s in sets:
            langs = lang_order({lang for name in configs for lang in table[name, s]["per_lang"]})
            if len(langs) < 2:
                continue
            lines += [f"{SHORT[s]}:", "", "| config | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
            for name in configs:
                per = table[name, s]["per_lang"]
                lines.append(f"| `{name}` | " + " | ".join(fmt(per[g][key]) if g in per else "-" for g in langs) + " |")
            lines.append("")
    save_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
