#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job on the bundled model: classify the
# benchmark queries through the fallback chain, then evaluate on the dev set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mlx-intent models list
.venv/bin/mlx-intent classify --verbose "Merhaba, where can I eat fish near Galata Tower?"
.venv/bin/mlx-intent classify --input benchmarks/data/bench_queries.jsonl --output results.jsonl
.venv/bin/mlx-intent eval dev --report results-eval-dev.md
