"""Output-head projection for the few rows of a decode step.

On CPU, `weight @ x.T` runs two to three times faster than `F.linear(x, weight)` when x has a
handful of rows and the weight tens of thousands (the BLAS picks a slow kernel for the skinny
operand); one row is a matrix-vector product (`torch.mv`). On GPU the forms are the same and
`F.linear` is kept.

A weight that stacks several heads of equal size (the Delay family's 32 codebook heads) runs on
CPU, from two rows on, as one batched matmul over its blocks: each block's product is formed while
the block is in cache (bench heads, 32 x 1,025 x 512, 2 threads: 18.0 -> 11.0 ms at 16 rows). At one
row the faster form depends on the machine: the blocks took 4.8 ms against the GEMV's 10.3 on an
AMD EPYC (AVX2), the GEMV 1.3 ms against the blocks' 2.6 on an Intel Xeon (AVX-512), about 2.5 ms
of a 16 ms engine step there. The forms differ in the last bits of the logits, so the choice is a
fixed rule by the CPU's vector width (the GEMV where torch runs AVX-512), not a timing: timed, it
flipped from process to process where the two are close (another AVX2 EPYC: 6.1 and 6.9 ms), and
one seeded request gave different logits in different runs.

One to four bf16 rows (sixteen where AMX runs) take our CPU kernel (layers/cpu_gemv.py) where it
runs, whatever the head: one read of the weight for all rows, faster than `torch.mv` and the blocks
in the engine (bench heads at one row: about 0.6 ms of a 4.7 ms bf16 step; docs/performance.md).
It hands the logits over as its fp32 sums, not rounded to bf16 as torch's bf16 product stores them:
every caller widens them anyway, and bf16 logits tie (most of a sampled row's top-k candidates did,
which costs top-p a sort of the whole vector, layers/sampler.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .cpu_gemv import bf16_rows


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., H) @ weight (N, H).T -> (..., N); from our bf16 kernel in fp32 (its sums unrounded)."""
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight)
    out = bf16_rows(weight, x, torch.float32)
    if out is not None:
        return out
    if x.shape[0] == 1:
        return torch.mv(weight, x[0]).unsqueeze(0)
    return (weight @ x.T).T


def project_blocks(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """x (B, H) @ weight (blocks * R, H).T -> (B, blocks, R): `blocks` heads stacked in one weight."""
    out = bf16_rows(weight, x, torch.float32) if x.device.type == "cpu" and x.dim() == 2 else None
    if out is not None:
        return out.unflatten(-1, (blocks, -1))
    if x.device.type != "cpu" or x.dim() != 2 or (x.shape[0] == 1 and one_row_gemv()):
        return project(x, weight).unflatten(-1, (blocks, -1))
    return _by_block(x, weight, blocks).permute(2, 0, 1)


def _by_block(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """(blocks, R, B): each stacked head's product with x, as one batched matmul."""
    return torch.bmm(weight.view(blocks, -1, weight.shape[-1]), x.T.expand(blocks, -1, -1))


@functools.cache
def one_row_gemv() -> bool:
    """Whether one row of a stacked head takes the GEMV (AVX-512 CPUs) or the blocks' products."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def project_float32(x: torch.Tensor, weight: torch.Tensor, block_rows: int = 8192) -> torch.Tensor:
    """x (..., H) @ weight (N, H).T in float32 products and output. A half-precision weight is
    widened a block of rows at a time (its values are exact in float32), so a head too large to
    widen whole gives logits that are not rounded to half precision: the rounding a certificate
    over some of its rows (layers/head_bound.py) can bound as tightly as float32's."""
    x = x.float()
    if weight.dtype == torch.float32:
        return project(x, weight)
    return torch.cat([project(x, block.float()) for block in weight.split(block_rows)], dim=-1)
