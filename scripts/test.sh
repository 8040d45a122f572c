#!/usr/bin/env bash
# Set up, then lint and run the whole test suite (unit + integration on the tiny demo model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/hadolint Dockerfile
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/pytest -q "$@"
