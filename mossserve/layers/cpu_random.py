"""torch's CPU random stream drawn by our own code (`cpu_random.c`), where it draws exactly as torch.

A seeded request's text draw takes 151,936 numbers a step from its generator (the reference's
multinomial over the whole vocabulary; docs/performance.md, "A seeded row's text draw"), and every
sampled row 32 x 1,025 more for its codes. torch makes them one at a time (~6 ns a number: about 1 ms
a step for the text draw alone); the same numbers from the same state, tempered a block at a time,
take a fraction of that. Built like the bf16 kernels (layers/cpu_kernels.py: the C compiler found,
the cache, `MOSSSERVE_CPU_KERNELS=0` turns it off), with no instruction-set flags, and used only
after it has drawn what torch draws, numbers and the generator's state after them, from states at
several points of the stream.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from .cpu_kernels import compiled

SOURCE = Path(__file__).with_name("cpu_random.c")
FLAGS = ("-O3", "-shared", "-fPIC")
BITS = 53
log = logging.getLogger(__name__)


def random53(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor | None:
    """What `torch.empty(rows, columns, dtype=torch.int64).random_(0, 2**53, generator=generator)`
    returns, and the generator left as it leaves it; None where our draw is not available (then
    torch's is the caller's)."""
    draw = _random53()
    if draw is None or generator.device.type != "cpu":
        return None
    state = generator.get_state()
    out = torch.empty(rows, columns, dtype=torch.int64)
    draw(state.data_ptr(), rows * columns, out.data_ptr())
    generator.set_state(state)
    return out


@functools.cache
def _random53() -> Callable | None:
    library = compiled(SOURCE, FLAGS, "our random draws")
    if library is None:
        return None
    draw = library.mossserve_random53
    draw.argtypes, draw.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None
    if not draws_as_torch(draw):
        log.info("our random draws differ from this torch build's, torch's run")
        return None
    return draw


def draws_as_torch(draw: Callable) -> bool:
    """Whether `draw` gives torch's numbers and leaves torch's state, from generators at odd points
    of the stream (mid-block, a pair split by the next block) and over several counts."""
    for seed, skip, count in ((0, 0, 1), (1, 1, 311), (2, 623, 624), (3, 1247, 2051), (4, 5, 151_936)):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for generator in (ours, theirs):
            torch.empty(skip, dtype=torch.int32).random_(generator=generator)
        expected = torch.empty(count, dtype=torch.int64).random_(0, 1 << BITS, generator=theirs)
        state = ours.get_state()
        got = torch.empty(count, dtype=torch.int64)
        draw(state.data_ptr(), count, got.data_ptr())
        ours.set_state(state)
        if not (torch.equal(got, expected) and torch.equal(ours.get_state(), theirs.get_state())):
            return False
    return True
