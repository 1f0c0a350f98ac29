"""Output-head projection for the few rows of a decode step.

On CPU, `weight @ x.T` runs two to three times faster than `F.linear(x, weight)` when x has a
handful of rows and the weight tens of thousands (the BLAS picks a slow kernel for the skinny
operand); on GPU the two are the same and `F.linear` is kept.

A weight that stacks several heads of equal size (the Delay family's 32 codebook heads) runs on
CPU as one batched matmul over its blocks: each block's product is formed while the block is in
cache. Measured on the bench checkpoint's heads (32 x 1,025 x 512, 2 threads, AVX2): 10.3 -> 4.8 ms
at 1 row, 18.0 -> 11.0 ms at 16; from 2 rows on, this machine's MKL returns the same bits as the
single matmul (same kernel and reduction order per block), at 1 row a GEMM instead of a GEMV.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., H) @ weight (N, H).T -> (..., N)."""
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight)
    return (weight @ x.T).T


def project_blocks(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """x (B, H) @ weight (blocks * R, H).T -> (B, blocks, R): `blocks` heads stacked in one weight."""
    if x.device.type != "cpu" or x.dim() != 2:
        return project(x, weight).unflatten(-1, (blocks, -1))
    heads = weight.view(blocks, -1, weight.shape[-1])
    return torch.bmm(heads, x.T.expand(blocks, -1, -1)).permute(2, 0, 1)


def project_float32(x: torch.Tensor, weight: torch.Tensor, block_rows: int = 8192) -> torch.Tensor:
    """x (..., H) @ weight (N, H).T in float32 products and output. A half-precision weight is
    widened a block of rows at a time (its values are exact in float32), so a head too large to
    widen whole gives logits that are not rounded to half precision: the rounding a certificate
    over some of its rows (layers/head_bound.py) can bound as tightly as float32's."""
    x = x.float()
    if weight.dtype == torch.float32:
        return project(x, weight)
    return torch.cat([project(x, block.float()) for block in weight.split(block_rows)], dim=-1)
