#!/usr/bin/env bash
# Make sure the services the tests talk to are up: PostgreSQL (registry tests) and headless Chromium (MLflow UI
# test). Idempotent. Uses the machine's own service commands; installs Chromium from Debian if it is missing.
set -euo pipefail
if command -v pg_isready >/dev/null 2>&1; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    cluster=$(ls /etc/postgresql 2>/dev/null | head -n1)
    if [ -n "$cluster" ]; then
      pg_ctlcluster --skip-systemctl-redirect "$cluster" main start || true
    fi
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  pg_isready -h 127.0.0.1 -p 5432 || echo "warning: PostgreSQL is not reachable on 127.0.0.1:5432; PostgreSQL tests will fail" >&2
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the MLflow UI browser test will fail" >&2
  fi
fi
