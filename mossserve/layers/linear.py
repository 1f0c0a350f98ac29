"""A bias-free projection whose one-row bf16 product on CPU runs as a matrix-vector product.

torch's CPU `F.linear` on one bf16 row is no faster than on sixteen (a GEMM kernel that converts
slower than memory delivers); `torch.mv` reads the same weights about 1.3x faster and returns the
same bits on the CPU measured, an Intel Xeon with AMX (docs/performance.md, "Choosing the dtype"). float32 and float16
keep `F.linear`: their matrix-vector products are no faster (float16's is slower).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() == x.shape[-1]:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight)
