"""Row-wise argmax and top k through our kernels (layers/cpu_select.py): torch's answers for every
row, ties, infinities and NaNs included, and torch's own ops wherever the kernels are not to be used
or (top k) where equal values make torch's order its own."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import needs_cpu_kernels

from mossserve.layers import cpu_kernels
from mossserve.layers.cpu_select import MAX_TOP_K, argmax_rows, top_k_rows


def called_kernel(monkeypatch, which: str = "argmax") -> list[int]:
    """Rows each call of the `which` kernel took (to see that the kernel, not torch, answered)."""
    kernels, calls = cpu_kernels.bf16_kernels(), []

    def counted(x, rows, *args):
        calls.append(rows)
        return getattr(kernels, which)(x, rows, *args)

    replaced = dataclasses.replace(kernels, **{which: counted})
    monkeypatch.setattr("mossserve.layers.cpu_select.bf16_kernels", lambda: replaced)
    return calls


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(1, 1), (3, 15), (2, 16), (5, 17), (512, 1025), (2, 151936), (4, 3, 33)])
def test_random_rows_give_torch_argmax(monkeypatch, shape):
    calls = called_kernel(monkeypatch)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
    assert calls == [x.numel() // shape[-1]]


@needs_cpu_kernels
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


@needs_cpu_kernels
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


def assert_same_top_k(got: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, k: int) -> None:
    values, indices = torch.topk(x, k, dim=-1)
    assert torch.equal(got[0], values) and torch.equal(got[1], indices)


@needs_cpu_kernels
@pytest.mark.parametrize("shape, k", [((1, 2), 1), ((3, 17), 16), ((512, 1025), 25), ((2, 151936), 50),
                                      ((4, 3, 300), MAX_TOP_K), ((64, 100), 99)])
def test_top_k_of_distinct_values_is_torch_topk(monkeypatch, shape, k):
    calls = called_kernel(monkeypatch, "top_k")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + k))
    x[..., 0] = float("-inf")  # a masked logit
    assert_same_top_k(top_k_rows(x, k), x, k)
    assert calls == [x.numel() // shape[-1]]


@needs_cpu_kernels
def test_top_k_asks_torch_where_values_tie_or_a_nan_is_kept(monkeypatch):
    """Equal values among a row's k + 1 largest (torch's order among them is its own) or a NaN send
    the whole call to torch; equal values below them do not."""
    called_kernel(monkeypatch, "top_k")
    kernels = cpu_kernels.bf16_kernels()
    gen = torch.Generator().manual_seed(3)
    k = 5
    for change in ([(7, 9.0), (40, 9.0)], [(3, 5.0), (60, 5.0)], [(11, float("nan"))]):
        x = torch.randn(2, 70, generator=gen)
        x[1, :k - 1] = torch.tensor([9.5, 9.4, 9.3, 9.2])[: k - 1]  # the 5th and 6th largest: the ties above
        for column, value in change:
            x[1, column] = value
        values, indices = torch.empty(2, k), torch.empty(2, k, dtype=torch.int64)
        assert kernels.top_k(x.data_ptr(), 2, 70, k, values.data_ptr(), indices.data_ptr(), 1) == 1
        got, expected = top_k_rows(x, k), torch.topk(x, k, dim=-1)
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0, equal_nan=True)
    crowded = torch.randn(1, 1025, generator=gen)
    crowded[0, 100:700] = 7.0  # more values at the top than the kernel gathers
    got, expected = top_k_rows(crowded, 25), torch.topk(crowded, 25, dim=-1)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    x = torch.randn(1, 70, generator=gen)
    x[0, 20] = x[0, 21] = -9.0  # equal, but far below the 6 largest
    values, indices = torch.empty(1, k), torch.empty(1, k, dtype=torch.int64)
    assert kernels.top_k(x.data_ptr(), 1, 70, k, values.data_ptr(), indices.data_ptr(), 1) == 0
    assert_same_top_k((values, indices), x, k)


@needs_cpu_kernels
def test_top_k_past_the_kernel_takes_torch(monkeypatch):
    calls = called_kernel(monkeypatch, "top_k")
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    for k in (MAX_TOP_K + 1, 300):
        assert_same_top_k(top_k_rows(x, k), x, k)
    assert calls == []


def test_other_dtypes_and_switched_off_take_torch(monkeypatch):
    def refuse(*args):
        raise AssertionError("the kernel must not be called")

    kernels = cpu_kernels.bf16_kernels()
    if kernels is not None:
        refusing = dataclasses.replace(kernels, argmax=refuse, top_k=refuse)
        monkeypatch.setattr("mossserve.layers.cpu_select.bf16_kernels", lambda: refusing)
    gen = torch.Generator().manual_seed(2)
    for x in (torch.randn(4, 100, generator=gen).bfloat16(), torch.randn(4, 100, generator=gen).double(),
              torch.randint(0, 9, (4, 100), generator=gen), torch.empty(0, 5)):
        assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
        if x.numel():
            assert_same_top_k(top_k_rows(x, 3), x, 3)
    x = torch.randn(4, 100, generator=gen)
    with cpu_kernels.torch_products():
        assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
        assert_same_top_k(top_k_rows(x, 3), x, 3)
    monkeypatch.setattr("mossserve.layers.cpu_select.bf16_kernels", lambda: None)  # no kernel here
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))
    assert_same_top_k(top_k_rows(x, 3), x, 3)
