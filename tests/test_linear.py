"""layers/linear.py: the one-row bf16 matrix-vector path gives F.linear's product; other inputs take F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mossserve.layers.linear import Linear


def layer(dtype: torch.dtype) -> Linear:
    torch.manual_seed(0)
    return Linear(96, 160).to(dtype)


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (5, 96), (2, 3, 96)])
def test_float32_is_f_linear_bit_for_bit(shape) -> None:
    lin = layer(torch.float32)
    x = torch.randn(shape)
    assert torch.equal(lin(x), F.linear(x, lin.weight))


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96)])
def test_one_bfloat16_row_is_the_matrix_vector_product(shape, monkeypatch) -> None:
    lin = layer(torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    expected = F.linear(x, lin.weight)
    calls = []
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or mv(*a))
    out = lin(x)
    assert calls and out.shape == expected.shape == (*shape[:-1], 160)
    torch.testing.assert_close(out, expected)  # bf16 tolerance; the CPUs measured give equal bits
    exact = x.float().reshape(-1) @ lin.weight.float().T
    torch.testing.assert_close(out.float().reshape(-1), exact, rtol=2 ** -7, atol=1e-2)


def test_several_bfloat16_rows_take_f_linear() -> None:
    lin = layer(torch.bfloat16)
    x = torch.randn(4, 96).to(torch.bfloat16)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
