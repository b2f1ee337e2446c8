#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job on the bundled model: classify the
# benchmark queries through the fallback chain, then evaluate on the dev set, and end
# with a short summary: which tiers answered, latency per query, the run-time fallback
# rate (tiers merely not installed here are listed apart), where the report is, and the
# next step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mlx-intent models list
.venv/bin/mlx-intent classify --verbose "Merhaba, where can I eat fish near Galata Tower?"
.venv/bin/mlx-intent classify --input benchmarks/data/bench_queries.jsonl --output results.jsonl
summary=$(.venv/bin/mlx-intent eval dev --report results-eval-dev.md --force)
echo
echo "Summary of the evaluation on the dev set ($(grep -c . benchmarks/data/dev.jsonl) queries, batches of 8):"
echo "$summary"
echo "  answers to benchmarks/data/bench_queries.jsonl: results.jsonl"
