"""Release the calling thread's idle GNU OpenMP worker pool.

torch's Linux CPU wheels run intra-op work on GNU OpenMP, which gives every thread that starts a
parallel region a pool of its own and, once it manages more threads than there are CPUs, stops
spinning between regions: each region then waits for sleeping workers to wake. The engine's
talker runs on a worker thread, so the pool the caller's thread made while the model loaded
would cost every parallel op of every step that wake-up (2.5-4 ms of a 13 ms batch-1 step on a
2-core host; docs/performance.md). `omp_pause_resource_all` frees the caller's pool; a later
parallel op on that thread makes a new one. Elsewhere (another OpenMP runtime, or none) nothing is
done.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

OMP_PAUSE_HARD = 2


def release_openmp_pool() -> bool:
    """Free this thread's GNU OpenMP pool; True if it was done."""
    pause = _pause_function()
    return pause is not None and pause(OMP_PAUSE_HARD) == 0


@functools.cache
def _pause_function() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the libgomp this process loaded, found once."""
    library = loaded_libgomp()
    if library is None:
        return None
    try:
        pause = ctypes.CDLL(library).omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


def loaded_libgomp() -> str | None:
    """The path of the libgomp this process has loaded (torch's own copy or the system's), if any."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        if len(fields) == 6 and "libgomp" in Path(fields[5]).name:
            return fields[5]
    return None
