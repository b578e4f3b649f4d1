#!/usr/bin/env bash
# One-shot GPU check (one lent H100/H200 run measures every attention target at once, < 8 minutes):
# install, run the attention correctness cases on CUDA with the shipped launch configurations against
# float64, then time forward+JVP and the backward through it against SDPA's flash kernels (bf16, D 64/128,
# N 4k/16k). Writes results/gpu_check.json. Without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU on this machine; nothing was measured."
    exit 0
fi
bash scripts/setup_env.sh
exec .venv/bin/python benchmarks/gpu_check.py --out results/gpu_check.json "$@"
