#!/usr/bin/env bash
# Create .venv and install lora-pipeline with its test tools. Safe to re-run (fast when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: any unpinned torch requirement would pull several GB of CUDA wheels on a CPU box.
# Set TORCH_SPEC (e.g. "torch==2.13.0+cu128 --index-url ...") to pick another build.
.venv/bin/pip install --quiet --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
