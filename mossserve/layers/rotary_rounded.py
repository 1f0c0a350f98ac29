"""Rotary tables rounded to bfloat16, and the row order that turns interleaved RoPE into rotate-half.

Fish S2 Pro (and its codec) rotate adjacent pairs (x_2i, x_2i+1) with cos/sin tables computed in
fp32 and stored in bfloat16; the rotation runs in fp32 with the rounded values. The rounding is
visible (logits move by ~1e-2 without it), so the tables must be rounded the same way.

Interleaved pairs are rotate-half pairs after a fixed permutation of each head's features:
evens first, then odds. Attention scores are sums over features, so permuting the rows of the q
and k projections (and the q/k norm weights) once at load time lets the shared rotate-half
attention (layers/attention.py) run the interleaved model unchanged.
"""
from __future__ import annotations

import torch

from .rotary import RotaryEmbedding


class RoundedRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose cos/sin tables are rounded to bfloat16 (kept in fp32)."""

    def reserve(self, length: int, device: torch.device) -> None:
        before = self.cos_table
        super().reserve(length, device)
        if self.cos_table is not before:
            self.cos_table = self.cos_table.bfloat16().float()
            self.sin_table = self.sin_table.bfloat16().float()


def half_order(head_dim: int) -> torch.Tensor:
    """Feature permutation of one head: interleaved pair i = (2i, 2i+1) -> rotate-half pair (i, i + d/2)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_heads(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows (heads * head_dim, ...) of a q or k projection, each head's features in `half_order`."""
    order = half_order(head_dim).to(weight.device)
    rows = weight.reshape(heads, head_dim, *weight.shape[1:])
    return rows[:, order].reshape(weight.shape)
