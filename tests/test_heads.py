"""layers/heads.py: every CPU form of the stacked heads' product is the matmul's, the one-row
form is chosen once per shape and dtype, and a few bf16 rows take our kernel where it runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cpu_kernels

from mossserve.layers import cpu_gemv, cpu_kernels, heads


def stacked(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.randn(8 * 33, 48) * 0.1).to(dtype)


@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_blocks_equal_the_matmul_in_either_one_row_form(gemv: bool, rows: int, monkeypatch) -> None:
    weight = stacked()
    x = torch.randn(rows, 48)
    monkeypatch.setattr(heads, "_one_row_gemv", {(tuple(weight.shape), weight.dtype, 8): gemv})
    out = heads.project_blocks(x, weight, 8)
    assert out.shape == (rows, 8, 33)
    torch.testing.assert_close(out, F.linear(x, weight).view(rows, 8, 33), rtol=1e-6, atol=1e-6)


def test_the_one_row_form_is_timed_once_per_shape_and_dtype(monkeypatch) -> None:
    monkeypatch.setattr(heads, "_one_row_gemv", {})
    timed = []
    monkeypatch.setattr(heads.time, "perf_counter", lambda: timed.append(1) or float(len(timed)))
    for dtype in (torch.float32, torch.float32, torch.float16):
        weight = stacked(dtype)
        x = torch.randn(1, 48).to(dtype)
        torch.testing.assert_close(heads.project_blocks(x, weight, 8), F.linear(x, weight).view(1, 8, 33))
    assert set(heads._one_row_gemv) == {((264, 48), torch.float32, 8), ((264, 48), torch.float16, 8)}
    assert len(timed) == 2 * 2 * 3 * 2  # two keys, two forms, three rounds, a start and an end each


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_a_few_bf16_rows_take_the_kernel(rows: int, monkeypatch) -> None:
    """One read of the stacked heads for all rows (layers/cpu_gemv.py; eight where AMX runs), with no
    form to time."""
    kernels = cpu_kernels.bf16_kernels()
    if rows > 4 and not (kernels and kernels.amx):
        pytest.skip("needs a CPU with AMX tiles (five rows and more take the kernel there)")
    monkeypatch.setattr(heads, "_one_row_gemv", {})
    weight = stacked(torch.bfloat16)
    x = torch.randn(rows, 48).bfloat16()
    expected = cpu_gemv.bf16_rows(weight, x, torch.float32)  # the sums unrounded: heads widen their logits
    assert expected is not None
    assert torch.equal(heads.project_blocks(x, weight, 8), expected.view(rows, 8, 33))
    assert torch.equal(heads.project(x, weight), expected)
    assert heads._one_row_gemv == {}
