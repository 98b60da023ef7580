#!/usr/bin/env bash
# Sets up .venv with everything the plugin, its main job and its tests need (CPU; no CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
