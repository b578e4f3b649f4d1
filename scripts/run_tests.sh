#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (Triton kernels in the CPU interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests "$@"
