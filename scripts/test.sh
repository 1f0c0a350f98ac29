#!/usr/bin/env bash
# Set up (first run only) and run the test suite: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/install_browser.sh  # Chromium for the playground tests (once)
exec .venv/bin/python -m pytest "$@"
