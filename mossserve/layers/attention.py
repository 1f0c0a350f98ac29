"""Qwen3 self-attention (qk-norm, rotary, GQA) reading and writing a slot KV cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch_context import BatchContext
from .linear import Linear
from .norms import RMSNorm, rms_normalize
from .rotary import rotate


class Qwen3Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, qk_norm: bool = True) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self.qkv_proj = Linear(hidden, (heads + 2 * kv_heads) * head_dim)
        self.o_proj = Linear(heads * head_dim, hidden)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        ctx: BatchContext,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache_k: torch.Tensor | None,
        cache_v: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (B, T, H); rotary: (cos, sin) of the new positions; cache_k/v (slots, kv_heads, max_len, d)
        of this layer, or None."""
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, self.heads + 2 * self.kv_heads, self.head_dim)
        qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=2)
        q, k = rotate(self._norm_qk(qk), *rotary).split([self.heads, self.kv_heads], dim=2)  # (B, T, heads, d)
        if cache_k is not None:
            rows = ctx.slots[:, None]
            cache_k[rows, :, ctx.positions] = k
            cache_v[rows, :, ctx.positions] = v
            k, v = cached_keys(cache_k, ctx), cached_keys(cache_v, ctx)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=ctx.mask,
                                             enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))

    def _norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """The q and k heads (B, T, heads + kv_heads, d) normalised in one call, then each scaled by its
        own weight: what q_norm and k_norm give apart, in fewer ops."""
        if not self.qk_norm:
            return qk
        normed = rms_normalize(qk, self.eps)
        normed[:, :, : self.heads] *= self.q_norm.weight
        normed[:, :, self.heads :] *= self.k_norm.weight
        return normed


def cached_keys(cache: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """The rows' first `kv_len` cached positions (B, kv_heads, kv_len, d).

    A run of consecutive slots (the usual decode batch) is a view of the cache; other slot lists
    are gathered with `index_select`, which copies the same values as advanced indexing at a
    third of the cost. Either way each (row, head) block keeps its (kv_len, d) layout with rows of
    d contiguous values, so attention's kernels see the same operands with the same row strides
    and return the same bits (tests/test_delay_step_prefix.py)."""
    keys = cache.narrow(2, 0, ctx.kv_len)
    if ctx.slot_run_start is not None:
        return keys.narrow(0, ctx.slot_run_start, len(ctx.slots))
    return keys.index_select(0, ctx.slots)
