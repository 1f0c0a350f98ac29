"""The modded DAC's windowed causal transformer (fixture README 8.1), offline and streaming.

Query t attends to keys t - window < s <= t. Pre-norm blocks with LayerScale on both branches,
SwiGLU, a final RMSNorm, no GQA, channels-first in and out. RoPE rotates interleaved pairs with
bf16-rounded tables at absolute positions; the loader reorders each head's q/k features so the
shared rotate-half rotation (layers/rotary_rounded.py) does the same arithmetic.

Streaming keeps, per row and layer, the rotated keys and the values of the last window - 1
positions: a chunk attends over [those | its own], so every query sees its offline window, and
the new context is cut at each row's real length. The tables are not shift-invariant (rounded),
which is why positions stay absolute (per-row `offset`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.mlp import SwiGLU
from ...layers.norms import RMSNorm
from ...layers.rotary import rotate
from ...layers.rotary_rounded import RoundedRotaryEmbedding
from .fish_dac_config import WindowTransformerConfig
from .fish_dac_modules import Streamable, StreamStep

QUERY_BLOCK = 1024  # offline queries per attention call: bounds the mask on long inputs


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, config: WindowTransformerConfig):
        super().__init__()
        self.heads, self.head_dim, self.window = config.n_head, config.head_dim, config.window
        inner = config.n_head * config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, config.dim, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                context: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, dim); context: keys/values (B, H, W-1, hd) in front of the chunk, or None
        (offline, whole sequences from position 0: `mask` unused). Returns the output and the
        keys/values the queries attended over."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.heads, self.head_dim)
        cos, sin = rotary  # (B, T, 1, hd): one more axis broadcasts them over q and k together
        q, k = rotate(qkv[:, :, :2], cos.unsqueeze(2), sin.unsqueeze(2)).transpose(1, 3).unbind(2)  # (B, H, T, hd)
        v = qkv[:, :, 2].transpose(1, 2)
        if context is not None:
            k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = _window_attention(q, k, v, self.window)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1)), (k, v)


class Block(nn.Module):
    def __init__(self, config: WindowTransformerConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = SwiGLU(config.dim, config.intermediate_size)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention_layer_scale = LayerScale(config.dim)
        self.ffn_layer_scale = LayerScale(config.dim)

    def forward(self, x, rotary, mask, context=None):
        attended, kv = self.attention(self.attention_norm(x), rotary, mask, context)
        h = x + self.attention_layer_scale(attended)
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h))), kv


class WindowTransformer(Streamable):
    def __init__(self, config: WindowTransformerConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary = RoundedRotaryEmbedding(config.head_dim, config.rope_base)

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        c = self.config
        kv = ((c.n_head, c.window - 1, c.head_dim), None)
        shapes = {f"{self.key}.offset": ((), torch.long)}
        for i in range(c.n_layer):
            shapes[f"{self.key}.{i}.k"] = shapes[f"{self.key}.{i}.v"] = kv
        return shapes

    def forward(self, x: torch.Tensor, step: StreamStep | None = None) -> torch.Tensor:
        """x (B, dim, T) -> (B, dim, T); offline from position 0, or one streaming chunk."""
        h = x.transpose(1, 2)
        B, T, _ = h.shape
        steps = torch.arange(T, device=x.device)
        if step is None:
            positions = steps[None].expand(B, -1)
            rotary = self.rotary.cos_sin(positions, T, h.dtype)
            for layer in self.layers:
                h, _ = layer(h, rotary, None)
            return self.norm(h).transpose(1, 2)
        w = self.config.window - 1
        offset = step.state[f"{self.key}.offset"]
        positions = offset[:, None] + steps
        rotary = self.rotary.cos_sin(positions, int(positions.max()) + 1, h.dtype)
        key_positions = offset[:, None] - w + torch.arange(w + T, device=x.device)
        delta = positions[:, :, None] - key_positions[:, None, :]
        mask = ((key_positions[:, None, :] >= 0) & (delta >= 0) & (delta <= w))[:, None]
        lengths = step.lengths(x)
        for i, layer in enumerate(self.layers):
            keys, values = f"{self.key}.{i}.k", f"{self.key}.{i}.v"
            h, (k, v) = layer(h, rotary, mask, (step.state[keys], step.state[values]))
            step.state[keys], step.state[values] = _last(k, lengths, w), _last(v, lengths, w)
        step.state[f"{self.key}.offset"] = offset + lengths
        return self.norm(h).transpose(1, 2)


def _last(kv: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """kv (B, H, n + T, hd) -> the n entries ending at each row's real length."""
    index = lengths[:, None] + torch.arange(n, device=kv.device)
    return kv.gather(2, index[:, None, :, None].expand(-1, kv.shape[1], -1, kv.shape[3]))


def _window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Offline causal window attention over whole sequences, QUERY_BLOCK queries at a time."""
    T = q.shape[2]
    outs = []
    for a in range(0, T, QUERY_BLOCK):
        b, s = min(T, a + QUERY_BLOCK), max(0, a - window + 1)
        delta = torch.arange(a, b, device=q.device)[:, None] - torch.arange(s, b, device=q.device)[None, :]
        mask = (delta >= 0) & (delta < window)
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, s:b], v[:, :, s:b], attn_mask=mask))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
