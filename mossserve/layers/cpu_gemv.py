"""bf16 products of one to four rows on CPU through our own kernel (layers/cpu_kernels.py).

A decode step of a few streams multiplies a few rows by each weight: it should cost one read of
the weights. torch 2.13's CPU `torch.mv` on bf16 spends about 30 us per call before it reads a
byte and reads the bench checkpoint's small projections at 11-20 GB/s (a 512 x 512 projection:
48 us), and its bf16 `F.linear` of a few rows is slower still. The kernel reads four weight rows at
a time once for all the rows of x, sums in fp32 and rounds each sum once, as torch does
(docs/performance.md, "A bf16 kernel for a few rows", has the figures).
"""
from __future__ import annotations

import torch

from .cpu_kernels import MAX_AMX_ROWS, bf16_kernels, kernels_off


def bf16_rows(weight: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor | None:
    """x (m, K) @ weight (N, K).T -> (m, N) by the kernel, for 1 to 4 bf16 rows on CPU (16 where
    AMX takes five and more); None where the kernel is not to be used (the caller then runs
    torch's product), which includes a product autograd is to record. `out_dtype` float32 keeps
    the fp32 sums instead of rounding them to bf16."""
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() != 2
            or not 1 <= x.shape[0] <= MAX_AMX_ROWS or x.device.type != "cpu" or not weight.is_contiguous()
            or kernels_off()
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return None
    kernels = bf16_kernels()
    if kernels is None or x.shape[0] > kernels.max_rows:
        return None
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype)
    kernels.gemm(weight.data_ptr(), x.data_ptr(), out.data_ptr(), weight.shape[0], weight.shape[1], x.shape[0],
                 out_dtype == torch.float32, torch.get_num_threads())
    return out
