#!/usr/bin/env bash
# Create .venv/ in the repository root and install the project into it (idempotent).
# TORCH_SPEC picks the torch build: the default takes the CPU wheel; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0"
# with their CUDA index configured in pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip>=24"
# torch first, pinned, so that nothing below pulls another build.
"${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install -e ".[dev]"
# lmms-eval's declared dependencies include torchvision, which drags in a different (CUDA) torch; its core does
# not import torchvision, so it is installed without dependencies plus the few it imports (scripts/lmms-eval-deps.txt).
if [ -f scripts/lmms-eval-deps.txt ]; then
  "${PIP[@]}" install --no-deps "lmms-eval==0.7.3"
  "${PIP[@]}" install -r scripts/lmms-eval-deps.txt
fi
