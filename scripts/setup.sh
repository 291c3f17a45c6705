#!/usr/bin/env bash
# Create .venv and install oprd-ci with its dev tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
. .venv/bin/activate
# torch==2.13.0 resolves to the local CPU wheel on the CPU machines; pip (not uv) is required for that.
pip install -q -e '.[dev]'
python - <<'PY'
import torch, transformers, mlflow
print(f"oprd-ci env ready: torch {torch.__version__}, transformers {transformers.__version__}, mlflow {mlflow.__version__}")
PY
