#!/usr/bin/env bash
# Create .venv (once) and install the package with everything the tests and demos need, from nothing.
# torch: the CPU wheel 2.13.0 (on this project's machines it lies on disk; elsewhere it downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.9.0" \
    "setuptools>=77" wheel "pybind11>=2.12" ninja
python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[train,bench,test,diffusers]"
