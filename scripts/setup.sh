#!/usr/bin/env bash
# Create a virtual environment in the repository root and install the project into it from the lock (idempotent).
#
#   bash scripts/setup.sh            # .venv/ from requirements/lock.txt (what `make run` / `make test` use)
#   bash scripts/setup.sh --latest   # the newest releases inside pyproject.toml's ranges (`make test-latest`)
#
# Variables:
#   VENV             the environment's folder (default .venv; `make test-latest` uses .venv-latest)
#   TORCH_VERSION    the torch release (default below; the lock was resolved against it)
#   TORCH_INDEX_URL  where torch's build comes from. Default: PyTorch's CPU index (the CPU build). A GPU user
#                    sets their CUDA build's index, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128,
#                    or TORCH_INDEX_URL= (empty) for PyPI's default build. A local wheel in pip's find-links
#                    (PIP_FIND_LINKS) is used when that index cannot be reached.
#   PYTHON           the interpreter that creates the environment (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
LMMS_EVAL_SPEC="${LMMS_EVAL_SPEC:-lmms-eval==0.7.3}"
PIP_VERSION="26.3"
LOCK=requirements/lock.txt
mode="${1:-lock}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "pip==$PIP_VERSION"
torch_index=()
[ -n "$TORCH_INDEX_URL" ] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")

case "$mode" in
  lock)
    # Everything but torch and the project, exactly as locked: no resolver, every file checked against its hash.
    "${PIP[@]}" install --no-deps --require-hashes -r "$LOCK"
    # torch after the lock, with its dependencies: they are in the lock already for the CPU build; a CUDA build
    # adds its own CUDA libraries.
    "${PIP[@]}" install "torch==$TORCH_VERSION" "${torch_index[@]}"
    "${PIP[@]}" install --no-deps -e .
    # Which lock this environment was installed from (tests/test_dependencies.py compares it with the lock).
    sha256sum "$LOCK" > "$VENV/.installed-from-lock"
    ;;
  --latest)
    # The newest releases pyproject.toml and requirements/constraints.txt allow, for `make test-latest`.
    "${PIP[@]}" install "torch==$TORCH_VERSION" "${torch_index[@]}"
    # torch stays the chosen build: the newest torch release would be another (on Linux, CUDA) build.
    echo "torch==$TORCH_VERSION" > "$VENV/torch-constraint.txt"
    "${PIP[@]}" install --upgrade --upgrade-strategy eager -c requirements/constraints.txt \
      -c "$VENV/torch-constraint.txt" -e ".[dev]" -r scripts/lmms-eval-deps.txt
    "${PIP[@]}" install --upgrade --no-deps "${LMMS_EVAL_SPEC%%==*}<0.8"
    rm -f "$VENV/.installed-from-lock"
    ;;
  *)
    echo "setup.sh: unknown argument '$mode' (valid: none, or --latest)" >&2; exit 2 ;;
esac

# The native packed-weight kernels are built here, never on first use; without a C compiler the torch path runs.
"$VENV/bin/python" -m mcmoe_vl.quant.native build || echo "setup.sh: native kernels not built; the torch path runs" >&2

# What pip check reports beyond the packages left out on purpose (scripts/lmms-eval-absent.txt) is an error.
"$VENV/bin/python" scripts/pip_check.py
