#!/usr/bin/env bash
# Set up (see setup.sh), lint with ruff and import-linter (the layers of pyproject.toml), and run the whole test
# suite on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports  # the layers contract of pyproject.toml
.venv/bin/python -m pytest "$@"
