#!/usr/bin/env bash
# Set up .venv if needed, then run the main job on its embedded default: train a flow map on offline data
# (CPU), writing metrics.json, a loss curve and sample pictures into runs/demo. Extra arguments go to
# `python -m flowmap_kernels.train` (e.g. --method tvm --data moons --steps 500).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m flowmap_kernels.train --out runs/demo --overwrite "$@"
