"""How far apart two matmuls of the same output head may put one logit.

A slice of a head (a few of its rows) is not computed bit for bit like the whole head: the BLAS
picks other kernels and blockings for other shapes, and the whole head's bits change with the
number of rows it is given. A caller that decides on a slice proves that its decision holds for any
of those roundings; this is the bound it proves it with.
"""
from __future__ import annotations

import torch


def head_rounding_bound(weight_abs: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor,
                        weight: torch.Tensor) -> torch.Tensor:
    """|logit from this matmul - logit from any other matmul of the same rows| per entry (R, N).

    `weight_abs` is |W| (N, H) in float32, `logits` this matmul's (R, N) result. A dot product of H
    terms summed in fp32 in any order is within H * 2**-24 * sum|w x| of the exact value; two such
    results are within twice that. Added: the rounding of a low-precision output (both sides), TF32
    inputs on CUDA, and split-K reductions in reduced precision on CUDA."""
    magnitude = (weight_abs @ hidden.abs().float().T).T
    per_term = hidden.shape[-1] * 2.0 ** -23
    if weight.dtype == torch.float32 and weight.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        per_term += 2.0 ** -9
    elif weight.dtype in (torch.bfloat16, torch.float16) and weight.device.type == "cuda":
        per_term += 4 * torch.finfo(weight.dtype).eps
    return per_term * magnitude + torch.finfo(weight.dtype).eps * logits.abs()


def head_cannot_overflow(hidden: torch.Tensor, max_row_norm: float) -> torch.Tensor:
    """Rows (R,) whose every logit over the whole head, and every partial sum of it, is finite in
    fp32 whatever the order: |partial sum| <= sum|w x| <= |w| |x| (Cauchy-Schwarz), with room."""
    norm = hidden.float().norm(dim=-1)
    return torch.isfinite(hidden).all(-1) & (norm * max_row_norm < 1e37)
