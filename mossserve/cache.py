"""Where mossserve keeps what it builds once and reuses: bench checkpoints, compiled CPU kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MOSSSERVE_CACHE`, or ~/.cache/mossserve."""
    root = os.environ.get("MOSSSERVE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mossserve"
