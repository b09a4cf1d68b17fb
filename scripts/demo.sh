#!/usr/bin/env bash
# The main job: set up everything (idempotent), then run epd-demo on the embedded default
# (tiny locally generated Qwen3-VL-MoE checkpoint, Mooncake over TCP on loopback, CPU).
# Extra arguments go to epd-demo, e.g. `bash scripts/demo.sh --transport shm`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 MC_LOG_LEVEL=ERROR
exec .venv/bin/epd-demo "$@"
