"""Where mossserve keeps what it builds once and reuses: bench checkpoints, compiled CPU kernels."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """`$MOSSSERVE_CACHE`, or ~/.cache/mossserve; where there is no home directory (a container's user
    with no passwd entry and no $HOME), a directory of the user's in the temporary directory."""
    root = os.environ.get("MOSSSERVE_CACHE")
    if root:
        return Path(root).expanduser()
    try:
        return Path.home() / ".cache" / "mossserve"
    except RuntimeError:  # Path.home() found none
        return Path(tempfile.gettempdir()) / f"mossserve-{os.getuid()}"
