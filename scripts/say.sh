#!/usr/bin/env bash
# Set up (first run only) and synthesize: scripts/say.sh "Hello." -o hello.wav [--model DIR] ...
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >&2
exec .venv/bin/mossserve say "$@"
