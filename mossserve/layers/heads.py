"""Output-head projection for the few rows of a decode step.

On CPU, `weight @ x.T` runs two to three times faster than `F.linear(x, weight)` when x has a
handful of rows and the weight tens of thousands (the BLAS picks a slow kernel for the skinny
operand); on GPU the two are the same and `F.linear` is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., H) @ weight (N, H).T -> (..., N)."""
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight)
    return (weight @ x.T).T
