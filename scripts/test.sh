#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, then run the whole test suite.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k schedules
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
