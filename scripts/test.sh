#!/usr/bin/env bash
# The README's second command: install what is missing, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# PostgreSQL tests need the server on 127.0.0.1:5432; start the local cluster if it is installed but down.
if command -v pg_ctlcluster >/dev/null && ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
.venv/bin/ruff check src tests bench
.venv/bin/mypy  # strict, over src/ ([tool.mypy] in pyproject.toml)
exec .venv/bin/python -m pytest "$@"
