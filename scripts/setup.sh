#!/usr/bin/env bash
# Create .venv (if missing) with torch and mossserve (editable, with the server, Ray Serve and test tools) installed.
# torch is pinned to 2.13.0 first so pip takes the CPU build instead of a multi-GB CUDA one;
# on a GPU machine install the torch build you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --disable-pip-version-check -q torch==2.13.0
.venv/bin/pip install --disable-pip-version-check -q -e '.[serve,ray,test]'
