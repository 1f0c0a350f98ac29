"""Each row's argmax and top k of fp32 logits on CPU through our kernel (layers/cpu_kernels.py).

torch 2.13's CPU argmax over the last dimension reads about 1.1 ns a value whatever the row length
(0.58-0.68 ms for a greedy step's audio logits at sixteen streams, 16 x 32 codebooks x 1,025), and
its topk of 25 over those rows took 4.8 ms of a sampled step; our AVX-512 kernels take a tenth of
that. The answers are torch's: argmax's first of equal largest values and first NaN; topk's values
and indices, largest first, wherever no two of a row's k + 1 largest are equal (there torch's order
among equal values decides, and torch is asked). docs/performance.md has the figures.
"""
from __future__ import annotations

import torch

from .cpu_kernels import bf16_kernels, kernels_off

MAX_TOP_K = 128  # cpu_bf16.c keeps a row's k + 1 largest in a fixed-size buffer


def _kernels_for(x: torch.Tensor):
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 1 and x.numel() > 0
            and x.shape[-1] < 2**31 and not kernels_off()):
        return bf16_kernels()
    return None


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`torch.argmax(x, dim=-1)`: by the kernel for fp32 CPU tensors where it runs, else by torch."""
    kernels = _kernels_for(x)
    if kernels is None:
        return torch.argmax(x, dim=-1)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.int64)
    kernels.argmax(rows.data_ptr(), rows.shape[0], rows.shape[1], out.data_ptr(), torch.get_num_threads())
    return out.view(x.shape[:-1])


def top_k_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k, dim=-1)` (values and indices, largest first): by the kernel where
    `distinct_top_k` answers with it, else by torch."""
    found = distinct_top_k(x, k) if _kernels_for(x) is not None else None
    return found if found is not None else torch.topk(x, k, dim=-1)


def distinct_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's topk for CPU rows longer than k where no two of each row's k + 1 largest values are
    equal (so every row's k-th largest is above the rest); None anywhere else. fp32 rows with k up
    to MAX_TOP_K take the kernel; the others (a CPU without AVX-512) torch's topk of k + 1, checked:
    still about half the cost of the sort it spares the sampler (layers/hf_warpers.py)."""
    if x.device.type != "cpu" or x.dim() < 1 or not 1 <= k < x.shape[-1]:
        return None
    kernels = _kernels_for(x)
    if kernels is None or k > MAX_TOP_K:
        values, indices = torch.topk(x, k + 1, dim=-1)
        if bool((values[..., 1:] == values[..., :-1]).any() | values.isnan().any()):
            return None
        return values[..., :k], indices[..., :k]
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    values = torch.empty(rows.shape[0], k, dtype=torch.float32)
    indices = torch.empty(rows.shape[0], k, dtype=torch.int64)
    declined = kernels.top_k(rows.data_ptr(), rows.shape[0], rows.shape[1], k, values.data_ptr(), indices.data_ptr(),
                             torch.get_num_threads())
    return None if declined else (values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k))
