#!/usr/bin/env bash
# GPU readiness check in one command (benchmarks/gpu_check.py): environment, kernel tests on
# CUDA, FlexAttention vs SDPA, bf16 vs fp32 training, kernel / training-step / decoding
# benchmarks. ≤ 10 min on one GPU; writes benchmarks/results/gpu-<gpu>-<date>.json (or into
# --out DIR) and prints a table. Exit status: 0 all passed, 1 a correctness check failed,
# 2 only a benchmark step failed.
#
#   bash scripts/gpu_check.sh [--out DIR] [--only STEP...] [--skip STEP...] [--no-install]
#   bash scripts/gpu_check.sh --dry-run [--out DIR]    # every step on CPU at toy shapes (CI)
#
# Without .venv (a GPU machine whose python3 already has torch, triton, pytest, numpy,
# tokenizers, safetensors and tqdm), bring the built extension python/spongebob/_rust.abi3.so
# (abi3: any CPython >= 3.10 on x86-64 Linux) and run: PYTHONPATH=python bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    PY="$(command -v python3)"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
