#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the whole test suite: unit tests, then integration
# tests with real daemons, sshd, network namespaces and the emulated ARM board.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
