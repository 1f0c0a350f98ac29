"""Row-wise argmax through our kernel (layers/argmax.py): torch's answer for every row, ties,
infinities and NaNs included, and torch's own argmax wherever the kernel is not to be used."""
from __future__ import annotations

import pytest
import torch

from mossserve.layers import cpu_kernels
from mossserve.layers.argmax import argmax_rows

needs_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512" or cpu_kernels.bf16_kernels() is None,
                                  reason="the kernel needs an AVX-512 CPU and a C compiler")


def called_kernel(monkeypatch) -> list[int]:
    """Rows each kernel call took (to see that the kernel, not torch, answered)."""
    kernels, calls = cpu_kernels.bf16_kernels(), []

    def counted(x, rows, n, out, threads):
        calls.append(rows)
        kernels.argmax(x, rows, n, out, threads)

    monkeypatch.setattr("mossserve.layers.argmax.bf16_kernels",
                        lambda: cpu_kernels.Bf16Kernels(kernels.gemm, kernels.decode, counted, kernels.amx))
    return calls


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (3, 15), (2, 16), (5, 17), (512, 1025), (2, 151936), (4, 3, 33)])
def test_random_rows_give_torch_argmax(monkeypatch, shape):
    calls = called_kernel(monkeypatch)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
    assert calls == [x.numel() // shape[-1]]


@needs_kernel
def test_ties_infinities_and_nans_as_torch(monkeypatch):
    calls = called_kernel(monkeypatch)
    n = 70
    rows = [torch.zeros(n), torch.full((n,), float("-inf")), torch.full((n,), float("inf"))]
    for first, second in [(3, 40), (20, 21), (0, 69), (17, 33), (50, 66)]:  # equal largest in one lane, in two
        row = torch.randn(n, generator=torch.Generator().manual_seed(first))
        row[[first, second]] = 9.0
        rows.append(row)
    for where in [(5,), (64,), (30, 31), (2, 40)]:
        row = torch.randn(n, generator=torch.Generator().manual_seed(sum(where)))
        row[list(where)] = float("nan")
        row[10] = float("inf")
        rows.append(row)
    row = torch.full((n,), float("-inf"))
    row[37] = -1e30
    rows.append(row)
    x = torch.stack(rows)
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
    assert calls == [len(rows)]


@needs_kernel
def test_strided_rows_and_one_thread(monkeypatch):
    called_kernel(monkeypatch)
    x = torch.randn(64, 2050, generator=torch.Generator().manual_seed(1))[:, ::2]
    expected = torch.argmax(x, dim=-1)
    assert torch.equal(argmax_rows(x), expected)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(argmax_rows(x), expected)
    finally:
        torch.set_num_threads(threads)


def test_other_dtypes_and_switched_off_take_torch(monkeypatch):
    def refuse(*args):
        raise AssertionError("the kernel must not be called")

    kernels = cpu_kernels.bf16_kernels()
    if kernels is not None:
        monkeypatch.setattr("mossserve.layers.argmax.bf16_kernels",
                            lambda: cpu_kernels.Bf16Kernels(kernels.gemm, kernels.decode, refuse, kernels.amx))
    gen = torch.Generator().manual_seed(2)
    for x in (torch.randn(4, 100, generator=gen).bfloat16(), torch.randn(4, 100, generator=gen).double(),
              torch.randint(0, 9, (4, 100), generator=gen), torch.empty(0, 5)):
        assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
    x = torch.randn(4, 100, generator=gen)
    with cpu_kernels.torch_products():
        assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
    monkeypatch.setattr("mossserve.layers.argmax.bf16_kernels", lambda: None)  # no kernel here
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
