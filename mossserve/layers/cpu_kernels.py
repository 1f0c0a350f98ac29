"""bf16 CPU kernels of our own (`cpu_bf16.c`), compiled here at first use, and the switch that
turns them off.

A decode step of a few streams multiplies a few rows by each weight and runs about sixty small
ops per layer around those products. torch 2.13's CPU bf16 products of a few rows read weights
well below memory bandwidth, and each small op costs 2-20 us of dispatch, so a bf16 step of one
stream was hardly faster than a float32 one even on a CPU with native bf16. The library holds a
product of one to four rows (layers/cpu_gemv.py) and whole Qwen3 decoder layers for a decode step
of up to sixteen rows or, on AMX tiles, a prefill piece (layers/cpu_decode.py; their products of
five rows and more on AMX tiles where the CPU has them), and each row's argmax and top k of fp32
logits (layers/cpu_select.py); docs/performance.md has the figures.

It is built with the C compiler found (`$CC`, `cc` or `gcc`; one that knows AVX-512 and AMX
intrinsics: GCC 11 or clang 12 and later) into the cache (`$MOSSSERVE_CACHE/kernels`) once per
source and compiler, and used only where it can help and cannot hurt: an x86-64 CPU with AVX-512
(torch's `AVX512` capability), and torch's OpenMP runtime being the GNU one that the kernels are
linked against (a second runtime would give the calling thread a second worker pool). Anywhere
else, or if the build fails, or with `MOSSSERVE_CPU_KERNELS=0`, torch's own ops run.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import cache_root
from ..openmp import loaded_libgomp

SOURCE = Path(__file__).with_name("cpu_bf16.c")
MAX_ROWS = 4  # rows of a product on FMAs; up to four rows share each read of the weights
MAX_AMX_ROWS = 16  # rows of a product where AMX tiles take five and more
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared",
         "-fPIC")
log = logging.getLogger(__name__)
_this_thread = threading.local()


@dataclass(frozen=True)
class Bf16Kernels:
    gemm: Callable  # (w, x, y, n, k, m, wide, threads): y (m, n) = x (m, k) @ w (n, k).T, m up to max_rows;
    # y bf16, or fp32 sums with `wide`
    decode: Callable  # whole decoder layers, arguments in layers/cpu_decode.py; nonzero: declined
    argmax: Callable  # (x, rows, n, out, threads): out (rows,) int64 = each fp32 row's argmax, as torch's
    top_k: Callable  # (x, rows, n, k, values, indices, threads) -> rows declined (ties): torch's topk
    amx: bool  # products of 5-16 rows run on AMX tiles (the CPU has them, Linux allows them)

    @property
    def max_rows(self) -> int:
        return MAX_AMX_ROWS if self.amx else MAX_ROWS


@contextlib.contextmanager
def torch_products() -> Iterator[None]:
    """torch's own ops in this thread inside: the same weights read and the same FLOPs as the
    kernels', in ops that an op counter can see (the bench's floors)."""
    _this_thread.off = True
    try:
        yield
    finally:
        _this_thread.off = False


def kernels_off() -> bool:
    """Whether this thread is inside `torch_products()`."""
    return getattr(_this_thread, "off", False)


@functools.cache
def bf16_kernels() -> Bf16Kernels | None:
    """The compiled kernels, or None where they are not to be used (module docstring)."""
    if (platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() != "AVX512"
            or loaded_libgomp() is None):
        return None
    library = compiled(SOURCE, FLAGS, "bf16 CPU kernels")
    if library is None:
        return None
    gemm, decode, argmax = library.mossserve_gemm_bf16, library.mossserve_decode_bf16, library.mossserve_argmax_f32
    gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    decode.argtypes = ([ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 7
                       + [ctypes.c_float, ctypes.c_int])
    argmax.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    top_k = library.mossserve_top_k_f32
    top_k.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_int]
    gemm.restype, decode.restype, argmax.restype, top_k.restype = None, ctypes.c_int, None, ctypes.c_int64
    return Bf16Kernels(gemm=gemm, decode=decode, argmax=argmax, top_k=top_k, amx=bool(library.mossserve_amx_available()))


def compiled(source: Path, flags: tuple[str, ...], what: str) -> ctypes.CDLL | None:
    """`source` built (once, into the cache) and loaded; None with `MOSSSERVE_CPU_KERNELS=0`, without
    a C compiler, or when the build fails (logged: `what` unavailable, torch's ops run)."""
    if os.environ.get("MOSSSERVE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        return ctypes.CDLL(str(build(compiler, source, flags)))
    except Exception as error:  # noqa: BLE001 - the kernels are optional: whatever stops them, torch's ops run
        log.info("%s unavailable, torch's ops run: %s", what, error)
        return None


def build(compiler: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library compiled from `source` by `compiler`, built once into the cache."""
    key = hashlib.sha256(source.read_bytes() + "\0".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True,
                           timeout=120)
            os.replace(built, target)  # whole or not at all, when several processes build at once
    return target
