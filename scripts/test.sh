#!/usr/bin/env bash
# Everything CI checks: set-up, Rust format/lint/tests, Python lint and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

PY="$(pwd)/.venv/bin/python"
export PYO3_PYTHON="$PY"
# `cargo test` links libpython (the extension-module feature is off there).
LIBDIR=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test"
cargo test --release
echo "== ruff check, ruff format --check"
.venv/bin/ruff check python tests benchmarks
.venv/bin/ruff format --check python tests benchmarks
echo "== pytest"
.venv/bin/python -m pytest "$@"
