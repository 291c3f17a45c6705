#!/usr/bin/env bash
# The test command: lint, then the whole test suite (unit, FSDP2 multi-process, registry on SQLite and
# PostgreSQL, MLflow server and UI). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
bash scripts/services.sh
ruff check .
ruff format --check .
exec python -m pytest "$@"
