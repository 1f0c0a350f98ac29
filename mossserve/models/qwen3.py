"""Qwen3 decoder backbone (gpt-fast style), reading and writing a slot KV cache.

The input is already embedded: every MOSS family sums its own text and audio embeddings.
Projections are fused (q|k|v and gate|up); the loader maps the published per-projection
tensors into row ranges of the fused weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.attention import Qwen3Attention
from ..layers.batch_context import BatchContext
from ..layers.cpu_decode import decode_layers
from ..layers.mlp import SwiGLU
from ..layers.norms import RMSNorm
from ..layers.rotary import RotaryEmbedding
from .qwen3_config import Qwen3Config


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Qwen3Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                        c.rms_norm_eps, c.qk_norm)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x, ctx, rotary, cache_k, cache_v):
        x = x + self.self_attn(self.input_layernorm(x), ctx, rotary, cache_k, cache_v)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        ctx: BatchContext,
        cache_k: torch.Tensor | None = None,
        cache_v: torch.Tensor | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, T, H) embeddings -> final-normed hidden states (B, T, H).

        cache_k/v: (layers, slots, kv_heads, max_len, d) or None for a cache-free pass.
        hidden_states, if given, collects the input and every layer's output (before the final norm).
        """
        fused = None if hidden_states is not None else decode_layers(self.layers, self.rotary, x, ctx, cache_k, cache_v)
        if fused is not None:
            return self.norm(fused)
        rotary = self.rotary.cos_sin(ctx.positions, ctx.kv_len, x.dtype)
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, ctx, rotary, None if cache_k is None else cache_k[i], None if cache_v is None else cache_v[i])
        if hidden_states is not None:
            hidden_states.append(x)
        return self.norm(x)

    def checkpoint_layout(self, prefix: str) -> dict[str, tuple[str, int]]:
        """Published tensor name -> (parameter name here, first row in that parameter)."""
        c = self.config
        q_rows, kv_rows = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        layout = {f"{prefix}embed_tokens.weight": ("embed_tokens.weight", 0), f"{prefix}norm.weight": ("norm.weight", 0)}
        for i in range(c.num_hidden_layers):
            src, dst = f"{prefix}layers.{i}.", f"layers.{i}."
            layout.update({
                src + "input_layernorm.weight": (dst + "input_layernorm.weight", 0),
                src + "post_attention_layernorm.weight": (dst + "post_attention_layernorm.weight", 0),
                src + "self_attn.q_proj.weight": (dst + "self_attn.qkv_proj.weight", 0),
                src + "self_attn.k_proj.weight": (dst + "self_attn.qkv_proj.weight", q_rows),
                src + "self_attn.v_proj.weight": (dst + "self_attn.qkv_proj.weight", q_rows + kv_rows),
                src + "self_attn.o_proj.weight": (dst + "self_attn.o_proj.weight", 0),
                src + "self_attn.q_norm.weight": (dst + "self_attn.q_norm.weight", 0),
                src + "self_attn.k_norm.weight": (dst + "self_attn.k_norm.weight", 0),
                src + "mlp.gate_proj.weight": (dst + "mlp.gate_up_proj.weight", 0),
                src + "mlp.up_proj.weight": (dst + "mlp.gate_up_proj.weight", c.intermediate_size),
                src + "mlp.down_proj.weight": (dst + "mlp.down_proj.weight", 0),
            })
        return layout
