"""Our draw of torch's CPU random stream (layers/cpu_random.py) against torch's own draws."""
from __future__ import annotations

import shutil

import pytest
import torch

from mossserve.layers import cpu_random
from mossserve.layers.sampler import exponential_bits

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="needs a C compiler")


@pytest.fixture
def fresh_draw(tmp_path, monkeypatch):
    """The draw looked up again, building into an empty cache."""
    monkeypatch.setenv("MOSSSERVE_CACHE", str(tmp_path))
    cpu_random._random53.cache_clear()
    yield
    cpu_random._random53.cache_clear()


def torch_bits(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(count, dtype=torch.int64).random_(0, 1 << cpu_random.BITS, generator=generator)


@needs_compiler
@pytest.mark.parametrize("skip", [0, 1, 2, 622, 623, 624, 625, 1247, 1248])
def test_the_same_numbers_and_state_from_any_point_of_the_stream(fresh_draw, skip: int) -> None:
    """From a generator `skip` outputs in (mid-block, at a block's end, a pair split by the next
    block), every count of draws gives torch's numbers and leaves torch's state."""
    for count in (0, 1, 2, 311, 312, 623, 624, 625, 2051, 151_936):
        ours, theirs = torch.Generator().manual_seed(count + skip), torch.Generator().manual_seed(count + skip)
        for generator in (ours, theirs):
            torch.empty(skip, dtype=torch.int32).random_(generator=generator)
        got = cpu_random.random53(1, count, ours)
        assert got is not None
        assert torch.equal(got[0], torch_bits(count, theirs)), (skip, count)
        assert torch.equal(ours.get_state(), theirs.get_state()), (skip, count)
        # and the stream goes on as torch's
        assert torch.equal(cpu_random.random53(3, 5, ours).flatten(), torch_bits(15, theirs))


@needs_compiler
def test_the_self_check_refuses_a_wrong_draw(fresh_draw) -> None:
    draw = cpu_random._random53()
    assert draw is not None and cpu_random.draws_as_torch(draw)

    def one_number_short(state_ptr, count, out_ptr):
        draw(state_ptr, max(count - 1, 0), out_ptr)

    assert not cpu_random.draws_as_torch(one_number_short)


def test_switched_off_torch_draws(fresh_draw, monkeypatch) -> None:
    monkeypatch.setenv("MOSSSERVE_CPU_KERNELS", "0")
    generator, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert cpu_random.random53(1, 10, generator) is None
    assert torch.equal(exponential_bits(2, 9, generator).flatten(), torch_bits(18, theirs))
    assert torch.equal(generator.get_state(), theirs.get_state())
