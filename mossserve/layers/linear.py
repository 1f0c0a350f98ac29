"""A bias-free projection whose product of a few bf16 rows on CPU reads its weights once.

torch's CPU `F.linear` on one bf16 row is no faster than on sixteen (a GEMM kernel that converts
slower than memory delivers). Up to four bf16 rows run our own kernel on AVX-512 CPUs, up to
sixteen where it has AMX tiles (layers/cpu_gemv.py); without it one row runs `torch.mv`, about 1.3x
faster than `F.linear` with the same bits on the Intel Xeon with AMX measured (docs/performance.md,
"Choosing the dtype"). float32 and float16 keep `F.linear`: their matrix-vector products are no
faster (float16's is slower).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_gemv import bf16_rows


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T -> (..., N), in the fastest form for the rows at hand."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        rows = x.reshape(-1, x.shape[-1])
        out = bf16_rows(weight, rows)
        if out is None and rows.shape[0] == 1:
            out = torch.mv(weight, rows[0])
        if out is not None:
            return out.view(*x.shape[:-1], -1)
    return F.linear(x, weight)


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
