#!/usr/bin/env bash
# The README's first command: install what is missing, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/mi2b2 demo "$@"
