#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in .venv with torch, the Rust extension
# built in release mode and installed editable, and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "maturin>=1.8,<2"
# Builds rust_dataloader/ into spongebob._rust and installs the package editable, with the
# runtime dependencies (torch, triton, tokenizers, gguf, ...) and the test extras. Among those,
# llama-cpp-python builds llama.cpp from source (minutes; pip caches the wheel afterwards).
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
.venv/bin/maturin develop --release --extras test -q
# The web page test drives a real headless browser: Debian's chromium.
bash scripts/install_chromium.sh
.venv/bin/python -c "import spongebob, spongebob.data, spongebob.kernels; print('spongebob', spongebob.__version__, 'ready')"
