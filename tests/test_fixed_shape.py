"""FixedShapeCalls (layers/fixed_shape.py) on the CPU: the padded, fixed-shape path that CUDA graphs
capture returns what the call returns on the unpadded rows, and calls of one size share their buffers."""
from __future__ import annotations

import pytest
import torch

from mossserve.layers.fixed_shape import FixedShapeCalls


def make_calls(seen: list[tuple[int, torch.Tensor]]) -> FixedShapeCalls:
    """forward(key, x, memory): writes x into position `key` of a per-size memory and returns the
    running sum of positions 0..key, like a depth transformer reading its per-frame cache."""
    weight = torch.arange(12.0).reshape(3, 4) / 7

    def forward(key: int, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        seen.append((key, x.clone()))
        memory[:, key] = x @ weight
        return memory[:, : key + 1].sum(1)

    return FixedShapeCalls(forward, lambda size: torch.zeros(size, 5, 4), 3, torch.float32, torch.device("cpu"),
                           batch_sizes=(2, 4, 8), keys=range(5))


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_padded_calls_equal_the_unpadded_ones(batch: int) -> None:
    seen: list = []
    calls = make_calls(seen)
    xs = torch.randn(5, batch, 3, generator=torch.Generator().manual_seed(batch))
    memory = torch.zeros(batch, 5, 4)
    for key in range(5):
        expected = make_calls([]).forward(key, xs[key], memory)
        assert torch.equal(calls(key, xs[key]), expected)
    size = next(s for s in (2, 4, 8) if s >= batch)
    assert set(calls._shapes) == {size}
    for _, x in seen:  # the forward saw the rows, then zeros up to the padded size
        assert x.shape == (size, 3) and not x[batch:].any()


def test_each_size_keeps_its_own_buffers() -> None:
    calls = make_calls([])
    a, b = torch.ones(2, 3), torch.ones(3, 3)
    calls(0, a)
    calls(0, b)  # a frame at size 4 must not disturb the one at size 2
    assert torch.equal(calls(1, a), 2 * (a @ (torch.arange(12.0).reshape(3, 4) / 7)))
    assert calls.fits(8) and not calls.fits(9)
