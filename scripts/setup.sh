#!/usr/bin/env bash
# Create .venv (if missing) with torch and mossserve (editable, with the server, Ray Serve and test tools) installed.
# torch 2.13.0 comes first, its CPU build unless the machine has an NVIDIA GPU (PyPI's Linux wheel
# is the multi-GB CUDA build): a CPU wheel pip already sees (a local wheel directory), else PyTorch's
# CPU index. On a GPU machine install the torch build you want before running this.
# Later runs install nothing while .venv's mossserve is this checkout and pyproject.toml and the
# extras below are what the last install had (their hash is kept in the stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
extras='.[serve,ray,test]'
find_python() {  # $PYTHON, else the first python3 that is 3.11 or newer (the pinned numpy and av need it)
  for python in ${PYTHON:-python3 python3.14 python3.13 python3.12 python3.11}; do
    if command -v "$python" >/dev/null && "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$python"
      return
    fi
  done
  echo "error: mossserve needs Python 3.11 or newer; set PYTHON=/path/to/python3.11 (or newer)" >&2
  return 1
}
if [ ! -x .venv/bin/python ]; then
  python=$(find_python)
  "$python" -m venv .venv
fi
install_torch() {
  local pip=(.venv/bin/pip install --disable-pip-version-check -q)
  if command -v nvidia-smi >/dev/null || [ "$(uname -s)" != Linux ]; then
    "${pip[@]}" torch==2.13.0  # PyPI's: the CUDA build on Linux, the only build elsewhere
  else
    "${pip[@]}" torch==2.13.0+cpu 2>/dev/null || "${pip[@]}" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
}
.venv/bin/python -c "import torch" 2>/dev/null || install_torch
stamp=.venv/.mossserve-installed
here=$(pwd -P)
want=$( { cat pyproject.toml; echo "$extras"; } | sha256sum | cut -d' ' -f1)
installed_here() {  # from another directory, so that the checkout itself is not what imports
  (cd / && "$here/.venv/bin/python" -c "import mossserve, pathlib, sys; sys.exit(pathlib.Path(mossserve.__file__).resolve().parents[1] != pathlib.Path('$here'))") 2>/dev/null
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! installed_here; then
  .venv/bin/pip install --disable-pip-version-check -q -e "$extras"
  echo "$want" > "$stamp"
fi
