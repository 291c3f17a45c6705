#!/usr/bin/env bash
# Set up a fresh machine and run the embedded default end to end:
# bootstrap -> rollout -> distill -> evaluate -> gate (dvc repro).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
dvc repro "$@"
oprd-ci results
