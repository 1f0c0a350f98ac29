"""RMSNorm computed in fp32, as Qwen3 does, whatever the weight dtype.

`F.rms_norm` computes Qwen3's x * rsqrt(mean(x^2) + eps) in one call (fewer dispatches) with the
same bits as the formula written out in eight ops (tests/test_norms_rotary.py checks it on this torch build).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x over its last dimension to unit root mean square, in fp32, returned in x's dtype (a new tensor)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)
