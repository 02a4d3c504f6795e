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
# A portable AVX2 build, not -march=native: on these Xeons native turns on ggml's AMX int8
# path, and llama.cpp then segfaults decoding a q8_0 model inside this sandbox (tests/test_gguf).
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
export CMAKE_ARGS="${CMAKE_ARGS:-$LLAMA_CMAKE_ARGS}"
# maturin installs into $VIRTUAL_ENV when one is set: name ours, so a venv the user has active
# (another checkout's, say) is left alone.
VIRTUAL_ENV="$PWD/.venv" .venv/bin/maturin develop --release --extras test -q
# pip's wheel cache ignores CMAKE_ARGS, so a wheel built natively earlier would come back:
# drop it and rebuild once (the portable wheel is cached in its place).
if .venv/bin/python -c "import llama_cpp, sys; sys.exit('AMX_INT8 = 1' not in llama_cpp.llama_print_system_info().decode())"; then
    echo "setup: the installed llama-cpp-python uses AMX; rebuilding it portable (minutes)"
    LLAMA_VERSION=$(.venv/bin/python -c "import llama_cpp; print(llama_cpp.__version__)")
    .venv/bin/python -m pip cache remove llama_cpp_python >/dev/null || true
    .venv/bin/python -m pip install -q --force-reinstall --no-deps "llama-cpp-python==$LLAMA_VERSION"
fi
# The web page test drives a real headless browser: Debian's chromium.
bash scripts/install_chromium.sh
.venv/bin/python -c "import spongebob, spongebob.data, spongebob.kernels; print('spongebob', spongebob.__version__, 'ready')"
