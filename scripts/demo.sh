#!/usr/bin/env bash
# Set up, then run the built-in demo end to end (tiny local model, demo data, offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/lora-pipeline demo "$@"
