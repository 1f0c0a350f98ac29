"""bf16 products of one to four rows on CPU through a kernel of our own, compiled here at first use.

A decode step of a few streams multiplies a few rows by each weight: it should cost one read of
the weights. torch 2.13's CPU `torch.mv` on bf16 spends about 30 us per call before it reads a
byte and reads the bench checkpoint's small projections at 11-20 GB/s (a 512 x 512 projection:
48 us), and its bf16 `F.linear` of a few rows is slower still, so a bf16 step of one stream was no
faster than a float32 one even on a CPU with native bf16. `cpu_gemv_bf16.c` reads four weight rows
at a time once for all the rows of x, sums in fp32 and rounds each sum once, as torch does
(docs/performance.md, "A bf16 kernel for a few rows", has the figures).

It is built with the C compiler found (`$CC`, `cc` or `gcc`) into the cache
(`$MOSSSERVE_CACHE/kernels`) once per source and compiler, and used only where it can help and
cannot hurt: an x86-64 CPU with AVX-512 (torch's `AVX512` capability), and torch's OpenMP runtime
being the GNU one that the kernel is linked against (a second runtime would give the calling
thread a second worker pool). Anywhere else, or if the build fails, or with
`MOSSSERVE_CPU_KERNELS=0`, torch's own products run.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..cache import cache_root
from ..openmp import loaded_libgomp

SOURCE = Path(__file__).with_name("cpu_gemv_bf16.c")
MAX_ROWS = 4  # the kernel's limit: up to four rows share each read of the weights
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp", "-shared", "-fPIC")
log = logging.getLogger(__name__)
_this_thread = threading.local()


def bf16_rows(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """x (m, K) @ weight (N, K).T -> (m, N) by the kernel, for 1 to MAX_ROWS bf16 rows on CPU;
    None where the kernel is not to be used (the caller then runs torch's product), which includes
    a product autograd is to record."""
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() != 2
            or not 1 <= x.shape[0] <= MAX_ROWS or x.device.type != "cpu" or not weight.is_contiguous()
            or getattr(_this_thread, "off", False)
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return None
    kernel = bf16_kernel()
    if kernel is None:
        return None
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    kernel(weight.data_ptr(), x.data_ptr(), out.data_ptr(), weight.shape[0], weight.shape[1], x.shape[0],
           torch.get_num_threads())
    return out


@contextlib.contextmanager
def torch_products() -> Iterator[None]:
    """torch's own products in this thread inside: the same weights read and the same FLOPs as the
    kernel's, in ops that an op counter can see (the bench's floors)."""
    _this_thread.off = True
    try:
        yield
    finally:
        _this_thread.off = False


@functools.cache
def bf16_kernel() -> Callable | None:
    """The compiled kernel, or None where it is not to be used (module docstring)."""
    if os.environ.get("MOSSSERVE_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if loaded_libgomp() is None or compiler is None:
        return None
    try:
        function = ctypes.CDLL(str(build(compiler))).mossserve_gemm_bf16
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        log.info("bf16 CPU kernel unavailable, torch's products run: %s", error)
        return None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    function.restype = None
    return function


def build(compiler: str) -> Path:
    """The shared library compiled from SOURCE by `compiler`, built once into the cache."""
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"gemv_bf16-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                           timeout=120)
            os.replace(built, target)  # whole or not at all, when several processes build at once
    return target
