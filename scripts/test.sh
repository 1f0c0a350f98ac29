#!/usr/bin/env bash
# Set up (first run only) and run the test suite: scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Chromium for the playground tests (once; as root or with sudo). Without it those tests fail and say why.
./scripts/install_browser.sh || echo "test.sh: Chromium could not be installed; the playground tests will fail" >&2
exec .venv/bin/python -m pytest "$@"
