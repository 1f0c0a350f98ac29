"""The depth ("local") transformer of MOSS-TTS-Local: Qwen3 decoder layers without positions.

It runs over one frame's channels (the backbone's state, then each chosen token), causally, with
qk-norm and the language config's GQA and no rotary embedding at all. Upstream recomputes the whole
list at every channel; position c never changes what positions < c computed, so a per-frame KV
cache (`DepthCache`) gives the same outputs for one new position per call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import Qwen3Attention
from ..layers.batch_context import BatchContext
from ..layers.cpu_decode import decode_layers
from ..layers.linear import linear
from ..layers.norms import RMSNorm
from .qwen3 import Qwen3DecoderLayer, Qwen3Model
from .qwen3_config import Qwen3Config


@dataclass
class DepthCache:
    """Keys and values of one frame's depth positions for a batch of rows."""

    k: torch.Tensor  # (layers, B, kv_heads, positions, d)
    v: torch.Tensor

    @classmethod
    def empty(cls, config: Qwen3Config, batch: int, positions: int, dtype: torch.dtype,
              device: torch.device) -> DepthCache:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, positions, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


class LocalAttention(Qwen3Attention):
    """Qwen3 attention (qk-norm, GQA) without rotary, over a per-frame cache."""

    def step(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, position: int) -> torch.Tensor:
        """x (B, 1, H) at depth `position`; attends to positions 0..position of the cache."""
        batch = x.shape[0]
        qkv = self.qkv_proj(x).view(batch, 1, self.heads + 2 * self.kv_heads, self.head_dim)
        qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=2)
        q, k = self._norm_qk(qk).split([self.heads, self.kv_heads], dim=2)
        cache_k[:, :, position] = k[:, 0]
        cache_v[:, :, position] = v[:, 0]
        keys, values = cache_k[:, :, : position + 1], cache_v[:, :, : position + 1]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, 1, self.heads * self.head_dim))


class LocalDecoderLayer(Qwen3DecoderLayer):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        c = config
        self.self_attn = LocalAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                        c.rms_norm_eps)

    def step(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, position: int) -> torch.Tensor:
        x = x + self.self_attn.step(self.input_layernorm(x), cache_k, cache_v, position)
        return x + self.mlp(self.post_attention_layernorm(x))


class LocalTransformer(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LocalDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def step(self, x: torch.Tensor, cache: DepthCache, position: int) -> torch.Tensor:
        """x (B, H) at depth `position` -> the final-normed output there (B, H)."""
        h = x[:, None]
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:  # our kernel's case (layers/cpu_decode.py)
            batch = x.shape[0]
            ctx = BatchContext.from_positions(torch.full((batch, 1), position, dtype=torch.int64),
                                              torch.arange(batch), position + 1)
            fused = decode_layers(self.layers, None, h, ctx, cache.k, cache.v)
            if fused is not None:
                return self.norm(fused)[:, 0]
        for i, layer in enumerate(self.layers):
            h = layer.step(h, cache.k[i], cache.v[i], position)
        return self.norm(h)[:, 0]

    def checkpoint_layout(self, prefix: str) -> dict[str, tuple[str, int]]:
        """The Qwen3 layer names under `prefix`; upstream deletes the embedding (and rotary)."""
        layout = Qwen3Model.checkpoint_layout(self, prefix)  # reads only self.config
        del layout[f"{prefix}embed_tokens.weight"]
        return layout


class BridgeMLPs(nn.Module):
    """`count` bias-free SwiGLU MLPs in -> ffn -> out, stored stacked (rows per MLP) so that one
    published MLP is a row range; `forward(x, i)` runs MLP i on every row of x."""

    def __init__(self, count: int, size_in: int, ffn: int, size_out: int) -> None:
        super().__init__()
        self.count, self.ffn, self.size_out = count, ffn, size_out
        self.gate_up = nn.Parameter(torch.empty(count * 2 * ffn, size_in))
        self.down = nn.Parameter(torch.empty(count * size_out, ffn))

    def forward(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        gate_up = self.gate_up[index * 2 * self.ffn : (index + 1) * 2 * self.ffn]
        gate, up = linear(x, gate_up).split(self.ffn, dim=-1)
        return linear(F.silu(gate) * up, self.down[index * self.size_out : (index + 1) * self.size_out])

    def checkpoint_layout(self, names: list[str], param_prefix: str) -> dict[str, tuple[str, int]]:
        """names[i]: the published prefix of MLP i (…`.gate_proj.weight` etc. follow)."""
        layout = {}
        for i, name in enumerate(names):
            layout[f"{name}.gate_proj.weight"] = (f"{param_prefix}gate_up", i * 2 * self.ffn)
            layout[f"{name}.up_proj.weight"] = (f"{param_prefix}gate_up", i * 2 * self.ffn + self.ffn)
            layout[f"{name}.down_proj.weight"] = (f"{param_prefix}down", i * self.size_out)
        return layout


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Upstream's per-channel norm before the heads: computed in the input dtype (no fp32 upcast)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
