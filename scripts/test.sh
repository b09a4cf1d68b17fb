#!/usr/bin/env bash
# The test command: set up everything (idempotent), then lint, type-check and run the full suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/transfer -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MC_LOG_LEVEL=ERROR
echo "[test] ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] mypy (protocol, transfer, encode_server, language_server)"
.venv/bin/mypy
echo "[test] pytest"
.venv/bin/pytest "$@"
