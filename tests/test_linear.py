"""layers/linear.py: up to four bf16 rows (sixteen where AMX runs) go to layers/cpu_gemv.py (one row
to torch.mv where its kernel is not built) and give F.linear's product; other inputs take F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_amx

from mossserve.layers import cpu_gemv, linear
from mossserve.layers.linear import Linear


def layer(dtype: torch.dtype) -> Linear:
    torch.manual_seed(0)
    return Linear(96, 160).to(dtype)


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (5, 96), (2, 3, 96)])
def test_float32_is_f_linear_bit_for_bit(shape) -> None:
    lin = layer(torch.float32)
    x = torch.randn(shape)
    assert torch.equal(lin(x), F.linear(x, lin.weight))


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (4, 96), (2, 2, 96)])
def test_up_to_four_bfloat16_rows_take_the_kernel_path(shape, monkeypatch) -> None:
    lin = layer(torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    expected = F.linear(x, lin.weight)
    calls = []
    bf16_rows = linear.bf16_rows
    monkeypatch.setattr(linear, "bf16_rows", lambda *a: calls.append(1) or bf16_rows(*a))
    out = lin(x)
    assert calls and out.shape == expected.shape == (*shape[:-1], 160)
    torch.testing.assert_close(out, expected)  # bf16 tolerance; the CPUs measured give equal bits
    exact = x.float() @ lin.weight.float().T
    torch.testing.assert_close(out.float(), exact, rtol=2 ** -7, atol=1e-2)


@needs_amx
@pytest.mark.parametrize("shape", [(5, 96), (2, 8, 96)])
def test_five_to_sixteen_bfloat16_rows_take_the_amx_kernel(shape) -> None:
    lin = layer(torch.bfloat16).requires_grad_(False)
    x = torch.randn(shape).to(torch.bfloat16)
    out = lin(x)
    assert torch.equal(out, cpu_gemv.bf16_rows(lin.weight, x.reshape(-1, 96)).view(*shape[:-1], 160))
    exact = x.float() @ lin.weight.float().T
    torch.testing.assert_close(out.float(), exact, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("shape", [(17, 96), (3, 6, 96)])
def test_more_bfloat16_rows_than_the_kernel_takes_take_f_linear(shape) -> None:
    lin = layer(torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
