"""The bf16 CPU kernel for one to four rows (layers/cpu_gemv.py, built by layers/cpu_kernels.py):
right sums, once rounded, and torch's own products wherever the kernel is not to be used."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import needs_amx, needs_cpu_kernels

from mossserve.layers import cpu_gemv, cpu_kernels
from mossserve.layers.linear import Linear



@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """bf16_kernel() looked up again, building into an empty cache."""
    monkeypatch.setenv("MOSSSERVE_CACHE", str(tmp_path))
    cpu_kernels.bf16_kernels.cache_clear()
    yield tmp_path
    cpu_kernels.bf16_kernels.cache_clear()


def one_ulp(values: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at each value (8 significant bits)."""
    exponent = torch.frexp(values.abs().clamp_min(1e-30)).exponent
    return torch.ldexp(torch.ones_like(values), exponent - 8)


def assert_rounds_the_exact_product_once(m: int, n: int, k: int, seed: int) -> None:
    """The kernel's product of random bf16 operands: fp32 sums in another order than fp64's, then one
    rounding, so within one bf16 step of the exact value."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    exact = x.double() @ weight.double().T
    got = cpu_gemv.bf16_rows(weight, x)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert ((got.double() - exact).abs() <= one_ulp(exact.float()).double()).all()
    # The fp32 sums themselves (for output heads): what was rounded, and within fp32 sums' error.
    sums = cpu_gemv.bf16_rows(weight, x, torch.float32)
    assert sums is not None and sums.dtype == torch.float32 and torch.equal(sums.bfloat16(), got)
    assert ((sums.double() - exact).abs() <= k * 2.0 ** -24 * (x.double().abs() @ weight.double().abs().T)).all()


@needs_cpu_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k", [(1, 1), (3, 15), (4, 16), (5, 17), (1001, 700), (64, 512), (7, 1536)])
def test_kernel_rounds_the_exact_product_once(fresh_kernel, m, n, k):
    assert cpu_kernels.bf16_kernels() is not None, "AVX-512, a C compiler and torch's libgomp: the kernel must build"
    assert_rounds_the_exact_product_once(m, n, k, seed=n * 1000 + k)


@needs_cpu_kernels
def test_a_row_gets_the_same_bits_alone_and_with_others(fresh_kernel):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 200, generator=gen).bfloat16()
    x = torch.randn(4, 200, generator=gen).bfloat16()
    together = cpu_gemv.bf16_rows(weight, x)
    for i in range(4):
        assert torch.equal(cpu_gemv.bf16_rows(weight, x[i : i + 1]), together[i : i + 1])
    strided = torch.randn(4, 400, generator=gen).bfloat16()[:, ::2]  # rows that are not contiguous
    assert torch.equal(cpu_gemv.bf16_rows(weight, strided), cpu_gemv.bf16_rows(weight, strided.contiguous()))


@needs_cpu_kernels
def test_kernel_matches_torch_mv_and_does_not_depend_on_threads(fresh_kernel):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 512, generator=gen).bfloat16()
    x = torch.randn(1, 512, generator=gen).bfloat16()
    assert cpu_kernels.bf16_kernels() is not None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemv.bf16_rows(weight, x)
        torch.set_num_threads(2)
        two = cpu_gemv.bf16_rows(weight, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each sum is formed by one thread
    reference = torch.mv(weight, x[0]).float()
    assert ((one.float() - reference).abs() <= one_ulp(reference)).all()


@needs_cpu_kernels
def test_kernel_propagates_nan_and_inf(fresh_kernel):
    weight = torch.ones(4, 64, dtype=torch.bfloat16)
    weight[1, 3] = float("inf")
    weight[2, 5] = float("nan")
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    got = cpu_gemv.bf16_rows(weight, x)[0]
    assert got[0].item() == 64 and got[1].item() == float("inf") and got[2].isnan() and got[3].item() == 64


@needs_cpu_kernels
def test_the_build_is_cached(fresh_kernel):
    compiler = os.environ.get("CC") or "cc"
    first = cpu_kernels.build(compiler)
    built_at = first.stat().st_mtime_ns
    assert cpu_kernels.build(compiler) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no scratch left behind


@needs_cpu_kernels
@pytest.mark.parametrize("shape", [(1, 1, 512), (1, 512), (2, 1, 512), (4, 512)])
def test_linear_takes_the_kernel_for_up_to_four_bf16_rows(fresh_kernel, shape):
    gen = torch.Generator().manual_seed(1)
    layer = Linear(512, 1024).bfloat16().requires_grad_(False)
    layer.weight.copy_(torch.randn(1024, 512, generator=gen))
    x = torch.randn(shape, generator=gen).bfloat16()
    rows = x.reshape(-1, 512)
    expected = cpu_gemv.bf16_rows(layer.weight, rows)
    assert torch.equal(layer(x), expected.view(*shape[:-1], -1))


def test_more_rows_than_the_kernel_takes_take_torch(fresh_kernel):
    weight = torch.randn(16, 64).bfloat16()
    assert cpu_gemv.bf16_rows(weight, torch.randn(17, 64).bfloat16()) is None
    kernels = cpu_kernels.bf16_kernels()
    if kernels is None or not kernels.amx:
        assert cpu_gemv.bf16_rows(weight, torch.randn(5, 64).bfloat16()) is None




@needs_amx
@pytest.mark.parametrize("m", [5, 8, 16])
@pytest.mark.parametrize("n, k", [(16, 32), (37, 64), (48, 64), (1001, 704), (64, 96), (7, 1536)])
def test_amx_rounds_the_exact_product_once(fresh_kernel, m, n, k):
    """Blocks of 16 weight rows on tiles (two at a time, and one left over at 48 rows), the rows past
    them and a k that is not a multiple of 32 by FMAs: every sum within one bf16 step of the exact
    product."""
    assert_rounds_the_exact_product_once(m, n, k, seed=n * 1000 + k + m)


@needs_amx
def test_on_amx_a_row_gets_the_same_bits_among_five_or_sixteen(fresh_kernel):
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(300, 256, generator=gen).bfloat16()
    x = torch.randn(16, 256, generator=gen).bfloat16()
    sixteen = cpu_gemv.bf16_rows(weight, x)
    assert torch.equal(cpu_gemv.bf16_rows(weight, x[[3, 9, 0, 15, 7]]), sixteen[[3, 9, 0, 15, 7]])


def test_switched_off_by_the_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv("MOSSSERVE_CPU_KERNELS", "0")
    assert cpu_kernels.bf16_kernels() is None
    weight, x = torch.randn(8, 40).bfloat16(), torch.randn(1, 40).bfloat16()
    assert cpu_gemv.bf16_rows(weight, x) is None
    layer = Linear(40, 8).bfloat16().requires_grad_(False)
    layer.weight.copy_(weight)
    assert torch.equal(layer(x), torch.mv(weight, x[0]).unsqueeze(0))


def test_a_failing_compiler_falls_back_to_torch_mv(fresh_kernel, monkeypatch, tmp_path):
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(failing))
    assert cpu_kernels.bf16_kernels() is None
    assert not list((tmp_path / "kernels").glob("*.so"))
    weight, x = torch.randn(8, 40).bfloat16(), torch.randn(1, 40).bfloat16()
    assert cpu_gemv.bf16_rows(weight, x) is None


def test_other_dtypes_and_layouts_take_torch(fresh_kernel):
    assert cpu_gemv.bf16_rows(torch.randn(16, 64), torch.randn(1, 64)) is None
    transposed = torch.randn(64, 16).bfloat16().T  # not contiguous
    assert cpu_gemv.bf16_rows(transposed, torch.randn(1, 64).bfloat16()) is None


@needs_cpu_kernels
def test_torch_products_switches_the_kernel_off_in_this_thread_only(fresh_kernel):
    import threading

    weight, x = torch.randn(8, 64).bfloat16(), torch.randn(1, 64).bfloat16()
    elsewhere = []
    with cpu_kernels.torch_products():
        assert cpu_gemv.bf16_rows(weight, x) is None
        thread = threading.Thread(target=lambda: elsewhere.append(cpu_gemv.bf16_rows(weight, x)))
        thread.start()
        thread.join()
    assert elsewhere[0] is not None
    assert cpu_gemv.bf16_rows(weight, x) is not None


@needs_cpu_kernels
def test_a_product_autograd_records_takes_torch(fresh_kernel):
    layer = Linear(64, 8).bfloat16()  # its weight requires grad
    x = torch.randn(1, 64).bfloat16()
    assert cpu_gemv.bf16_rows(layer.weight, x) is None
    out = layer(x)
    assert out.requires_grad and torch.equal(out, torch.mv(layer.weight, x[0]).unsqueeze(0))
    with torch.inference_mode():
        assert cpu_gemv.bf16_rows(layer.weight, x) is not None


def test_without_a_home_directory_the_kernels_build_in_a_private_temporary_directory(tmp_path, monkeypatch) -> None:
    """A container's user with no $HOME and no passwd entry: Path.home() raises RuntimeError, which
    escaped the kernels' lookup and failed every request. The directory must be ours alone: a kernel
    found there is loaded into the process."""
    import tempfile
    from pathlib import Path

    from mossserve import cache

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("MOSSSERVE_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", no_home)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache.private_temp_dir.cache_clear()
    ours = tmp_path / f"mossserve-{os.getuid()}"
    assert cache.cache_root() == ours and stat.S_IMODE(ours.stat().st_mode) == 0o700
    ours.chmod(0o777)  # as another user could have made it, to plant a kernel
    cache.private_temp_dir.cache_clear()
    elsewhere = cache.cache_root()
    assert elsewhere != ours and elsewhere.parent == tmp_path and stat.S_IMODE(elsewhere.stat().st_mode) == 0o700
    cache.private_temp_dir.cache_clear()


def test_a_kernel_whose_build_raises_anything_leaves_torchs_ops(monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("an unexpected failure while building")

    monkeypatch.setattr(cpu_kernels, "build", broken)
    monkeypatch.setenv("CC", "cc")
    assert cpu_kernels.compiled(cpu_kernels.SOURCE, cpu_kernels.FLAGS, "the test kernel") is None
