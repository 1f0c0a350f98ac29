#!/usr/bin/env bash
# Set up (first run only) and synthesize: scripts/say.sh "Hello." -o hello.wav [--model DIR] ...
# Paths in the arguments are the caller's: only the set-up runs in the checkout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd -P)
"$root/scripts/setup.sh" >&2
exec "$root/.venv/bin/mossserve" say "$@"
