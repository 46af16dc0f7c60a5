#!/usr/bin/env bash
# Set up a local virtual environment (.venv, or $HARNESS_VENV) with the harness and its tests, at
# the versions in requirements.lock (every package, torch's CPU build included), then the harness
# itself, editable. Idempotent: when the venv already matches the lock it installs nothing (a
# check of about 0.1 s); a venv whose packages drifted (upgraded by hand, a newer release) is
# brought back to the lock. Usable alone: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${HARNESS_VENV:-.venv}
lock=requirements.lock
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)

if ! "$py" scripts/lockfile.py check "$lock" --quiet-if-empty; then
    # Exact versions, up or down; torch==X takes the CPU wheel this machine keeps on disk (an
    # unpinned torch would pull a multi-GB CUDA build).
    echo "[setup] installing $lock into $venv" >&2
    "${pip[@]}" -r "$lock"
    "$py" scripts/lockfile.py check "$lock"  # says what still differs, and stops here if anything does
fi
# The project itself, editable, without dependencies (all of them are in the lock) and without
# build isolation (its build backend, setuptools, is locked too). Again whenever pyproject.toml
# changes (entry points, metadata).
stamp="$venv/.harness-installed"
want="$(cd "$PWD" && pwd) $(sha256sum pyproject.toml | cut -c1-64)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "${pip[@]}" --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
fi
