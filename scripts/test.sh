#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
