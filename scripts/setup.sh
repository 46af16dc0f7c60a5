#!/usr/bin/env bash
# Set up a local virtual environment (.venv, or $HARNESS_VENV) with the harness and its tests.
# Idempotent: a second run installs nothing new. Usable alone: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${HARNESS_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"

# torch first, pinned to the CPU build this machine keeps on disk: an unpinned `torch` would pull a
# multi-GB CUDA build. A venv that already has a torch (yours, CUDA or not) keeps it.
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m pip install --quiet --disable-pip-version-check -r constraints/torch-cpu.txt
fi
# The project itself, editable, with the test extra (pyproject.toml lists them).
stamp="$venv/.harness-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$stamp"
fi
