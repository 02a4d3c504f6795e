#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the whole pipeline on the bundled demo
# data on CPU. Extra arguments go to `spongebob demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/spongebob demo --out runs/demo "$@"
