"""Files written whole or not at all."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def whole_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`path` opened for writing. A new or regular file is written under a temporary name beside it
    and moved into place once complete, so a failed write (a full disk, Ctrl-C) leaves no partial
    file and an existing one as it was. Anything else (a device such as /dev/null, a symlink, a
    pipe), or a file in a directory that takes no new names, is written in place: moving a file
    onto it would replace it, or cannot be done."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()) or not os.access(path.parent, os.W_OK | os.X_OK):
        with open(path, "wb") as f:
            yield f
        return
    partial = path.with_name(f".{path.name}.partial")
    try:
        f = open(partial, "wb")
    except OSError as e:  # named as the caller named it, not by the temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with f:
            yield f
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
