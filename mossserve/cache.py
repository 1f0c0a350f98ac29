"""Where mossserve keeps what it builds once and reuses: bench checkpoints, compiled CPU kernels."""
from __future__ import annotations

import functools
import os
import stat
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
        return private_temp_dir()


@functools.cache
def private_temp_dir() -> Path:
    """`mossserve-<uid>` in the temporary directory where it is ours alone (a directory we own, not a
    link, writable by nobody else: the kernels built there are loaded into the process), else a new
    directory for this process."""
    path = Path(tempfile.gettempdir()) / f"mossserve-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        found = path.lstat()
        if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid() and not found.st_mode & 0o077:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="mossserve-"))
