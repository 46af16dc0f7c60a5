#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, then train the default recipe on 2 CPU ranks.
# Extra arguments are recipe overrides, e.g.: bash scripts/quickstart.sh train.epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \
    -m harness train recipes/breast_cancer_mlp.yaml "$@"
