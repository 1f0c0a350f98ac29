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
    monkeypatch.setattr(heads, "one_row_gemv", lambda: gemv)
    out = heads.project_blocks(x, weight, 8)
    assert out.shape == (rows, 8, 33)
    torch.testing.assert_close(out, F.linear(x, weight).view(rows, 8, 33), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("capability, gemv", [("AVX2", False), ("DEFAULT", False), ("AVX512", True)])
def test_the_one_row_form_is_a_rule_of_the_cpu_not_a_timing(capability: str, gemv: bool, monkeypatch) -> None:
    """Timed per process, it flipped between runs where both forms were close: the same seeded
    request then had different logits bits in different runs."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    heads.one_row_gemv.cache_clear()
    try:
        assert heads.one_row_gemv() is gemv
    finally:
        heads.one_row_gemv.cache_clear()


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_a_few_bf16_rows_take_the_kernel(rows: int, monkeypatch) -> None:
    """One read of the stacked heads for all rows (layers/cpu_gemv.py; eight where AMX runs), whatever
    the one-row form would be."""
    kernels = cpu_kernels.bf16_kernels()
    if rows > 4 and not (kernels and kernels.amx):
        pytest.skip("needs a CPU with AMX tiles (five rows and more take the kernel there)")
    monkeypatch.setattr(heads, "one_row_gemv", lambda: pytest.fail("the kernel's rows need no one-row form"))
    weight = stacked(torch.bfloat16)
    x = torch.randn(rows, 48).bfloat16()
    expected = cpu_gemv.bf16_rows(weight, x, torch.float32)  # the sums unrounded: heads widen their logits
    assert expected is not None
    assert torch.equal(heads.project_blocks(x, weight, 8), expected.view(rows, 8, 33))
    assert torch.equal(heads.project(x, weight), expected)
