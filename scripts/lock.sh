#!/usr/bin/env bash
# Refresh requirements.lock: the newest releases that pyproject.toml's ranges allow (with the test
# extra), resolved in a scratch venv, torch pinned to the CPU build this machine keeps on disk
# (TORCH=2.13.0 by default). Then rerun the suite (bash scripts/test.sh: setup.sh brings .venv to
# the new lock first) and commit the lock with the fixes it needed.
set -euo pipefail
cd "$(dirname "$0")/.."

torch_version=${TORCH:-$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.lock 2>/dev/null || true)}
torch_version=${torch_version:-2.13.0}
scratch=$(mktemp -d /tmp/harness-lock.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check "torch==$torch_version"
"$py" -m pip install --quiet --disable-pip-version-check --upgrade setuptools -e ".[test,hf,trackers]"
"$py" scripts/lockfile.py write requirements.lock
echo "Now rerun the suite against the new lock: bash scripts/test.sh"
