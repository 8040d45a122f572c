#!/usr/bin/env bash
# Set up, then lint and run the whole test suite (unit + integration on the tiny demo model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The oci:// tests run Debian's reference OCI registry (/usr/bin/docker-registry) and htpasswd on loopback;
# they fail, not skip, without them, so CI installs them here.
if ! { command -v docker-registry >/dev/null || test -x /usr/bin/docker-registry; } || ! command -v htpasswd >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq docker-registry apache2-utils >/dev/null
    else
        echo "scripts/test.sh: the oci:// tests need docker-registry and htpasswd (apt-get install docker-registry apache2-utils)" >&2
    fi
fi
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/hadolint Dockerfile
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/pytest -q "$@"
