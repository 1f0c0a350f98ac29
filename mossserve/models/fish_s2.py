"""Fish Audio S2 Pro: a slow AR (Qwen3-style) that emits one semantic token per frame, and a
fast AR that emits the frame's residual codes one codebook at a time.

Both are the shared Qwen3 backbone (models/qwen3.py) with bf16-rounded rotary tables; their
interleaved RoPE becomes rotate-half by permuting the q/k projection rows once after loading
(layers/rotary_rounded.py). Slow input (fixtures/fish_s2_pro/README.md section 4.1): at a
semantic token the token embedding plus all N codebook embeddings, divided by sqrt(N + 1);
elsewhere the token embedding alone. The fast AR (section 5) starts from the slow AR's final-
normed state at position 0 and reads codebook i-1's code at position i.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.batch_context import BatchContext
from ..layers.code_embedding import sum_code_embeddings
from ..layers.heads import project, project_float32
from ..layers.rotary_rounded import RoundedRotaryEmbedding, permute_heads
from .fish_s2_config import FishS2Config
from .qwen3 import Qwen3Model
from .qwen3_config import Qwen3Config


def _transformer(config: Qwen3Config) -> Qwen3Model:
    model = Qwen3Model(config)
    model.rotary = RoundedRotaryEmbedding(config.head_dim, config.rope_theta)
    return model


class FishS2Model(nn.Module):
    def __init__(self, config: FishS2Config) -> None:
        super().__init__()
        self.config = config
        c = config
        self.slow = _transformer(c.slow)
        self.codebook_embeddings = nn.Parameter(torch.empty(c.num_codebooks * c.codebook_size, c.slow.hidden_size))
        self.output = None if c.tie_word_embeddings else nn.Linear(c.slow.hidden_size, c.slow.vocab_size, bias=False)
        self.fast = _transformer(c.fast)
        self.fast_output = nn.Linear(c.fast.hidden_size, c.codebook_size, bias=False)
        self.project_in = None if c.fast.hidden_size == c.slow.hidden_size else nn.Linear(c.slow.hidden_size,
                                                                                          c.fast.hidden_size)

    # ---- slow AR ---------------------------------------------------------------------------
    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, T, 1 + N) -> input embeddings (B, T, D)."""
        c = self.config
        tokens = rows[..., 0]
        x = self.slow.embed_tokens(tokens)
        semantic = ((tokens >= c.semantic_start) & (tokens <= c.semantic_end))[..., None]
        codes = rows[..., 1:].clamp(0, c.codebook_size - 1)  # non-semantic rows: codes ignored
        summed = x + sum_code_embeddings(codes, self.codebook_embeddings, c.codebook_size)
        return torch.where(semantic, summed / math.sqrt(c.num_codebooks + 1), x)

    def forward(
        self,
        rows: torch.Tensor,
        ctx: BatchContext,
        cache_k: torch.Tensor | None = None,
        cache_v: torch.Tensor | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Final-normed slow states (B, T, D): the logits' input and the fast AR's start."""
        return self.slow(self.embed(rows), ctx, cache_k, cache_v, hidden_states)

    def head_weight(self) -> torch.Tensor:
        """The slow head (V, D): the tied token embedding unless the checkpoint has its own."""
        return self.slow.embed_tokens.weight if self.output is None else self.output.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw slow logits (..., V), float32 products and output whatever the weight's dtype, as
        the narrow slow head computes them (fish_s2_family.slow_tokens)."""
        return project_float32(hidden, self.head_weight())

    # ---- fast AR ---------------------------------------------------------------------------
    def new_fast_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one frame's N fast positions for `batch` rows."""
        f = self.config.fast
        weight = self.fast_output.weight
        shape = (f.num_hidden_layers, batch, f.num_key_value_heads, self.config.num_codebooks, f.head_dim)
        return (torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    def fast_start(self, hidden: torch.Tensor) -> torch.Tensor:
        """The fast AR's position-0 input for slow states (B, D)."""
        return hidden if self.project_in is None else self.project_in(hidden)

    def fast_input(self, codes: torch.Tensor) -> torch.Tensor:
        """The fast AR's input after choosing `codes` (B,): one embedding table for every codebook."""
        return self.fast.embed_tokens(codes)

    def fast_step(self, x: torch.Tensor, position: int, cache: tuple[torch.Tensor, torch.Tensor],
                  with_logits: bool = True) -> torch.Tensor | None:
        """Feed x (B, Df) at fast position `position`; its logits (B, C), float32, raw."""
        batch = x.shape[0]
        positions = torch.full((batch, 1), position, dtype=torch.int64, device=x.device)
        slots = torch.arange(batch, device=x.device)
        ctx = BatchContext.from_positions(positions, slots, position + 1)
        y = self.fast(x[:, None], ctx, cache[0], cache[1])[:, 0]
        return project(y, self.fast_output.weight).float() if with_logits else None

    def teacher_forced_fast_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Fast logits (B, N, C) at every position, position i reading codes[:, i - 1] (B, N)."""
        cache = self.new_fast_cache(hidden.shape[0])
        logits = [self.fast_step(self.fast_start(hidden), 0, cache)]
        for i in range(1, self.config.num_codebooks):
            logits.append(self.fast_step(self.fast_input(codes[:, i - 1]), i, cache))
        return torch.stack(logits, dim=1)

    # ---- loading ---------------------------------------------------------------------------
    def checkpoint_layout(self) -> dict[str, tuple[str, int]]:
        """Published names (README section 2.3) -> our parameters."""
        layout = _transformer_layout(self.slow, "text_model.model.", "slow.", "embeddings.weight")
        layout.update(_transformer_layout(self.fast, "audio_decoder.", "fast.", "embeddings.weight"))
        layout["audio_decoder.codebook_embeddings.weight"] = ("codebook_embeddings", 0)
        layout["audio_decoder.output.weight"] = ("fast_output.weight", 0)
        if self.output is not None:
            layout["text_model.model.output.weight"] = ("output.weight", 0)
        if self.project_in is not None:
            layout["audio_decoder.project_in.weight"] = ("project_in.weight", 0)
            layout["audio_decoder.project_in.bias"] = ("project_in.bias", 0)
        return layout

    @torch.no_grad()
    def to_rotate_half(self) -> None:
        """Once, after loading: reorder each head's q/k features so the rotate-half attention computes
        the reference's interleaved RoPE (scores are unchanged: q and k move together)."""
        for transformer in (self.slow, self.fast):
            cfg = transformer.config
            q_rows, k_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            for layer in transformer.layers:
                attn = layer.self_attn
                w = attn.qkv_proj.weight
                w[:q_rows] = permute_heads(w[:q_rows], cfg.num_attention_heads, cfg.head_dim)
                w[q_rows : q_rows + k_rows] = permute_heads(w[q_rows : q_rows + k_rows], cfg.num_key_value_heads,
                                                            cfg.head_dim)
                if attn.qk_norm:
                    for norm in (attn.q_norm, attn.k_norm):
                        norm.weight.copy_(permute_heads(norm.weight, 1, cfg.head_dim))


def _transformer_layout(model: Qwen3Model, src: str, dst: str, embedding: str) -> dict[str, tuple[str, int]]:
    c = model.config
    layout = {f"{src}{embedding}": (f"{dst}embed_tokens.weight", 0), f"{src}norm.weight": (f"{dst}norm.weight", 0)}
    for i, layer in enumerate(model.layers):
        s, d = f"{src}layers.{i}.", f"{dst}layers.{i}."
        layout.update({
            s + "attention_norm.weight": (d + "input_layernorm.weight", 0),
            s + "attention.wqkv.weight": (d + "self_attn.qkv_proj.weight", 0),
            s + "attention.wo.weight": (d + "self_attn.o_proj.weight", 0),
            s + "ffn_norm.weight": (d + "post_attention_layernorm.weight", 0),
            s + "feed_forward.w1.weight": (d + "mlp.gate_up_proj.weight", 0),
            s + "feed_forward.w3.weight": (d + "mlp.gate_up_proj.weight", c.intermediate_size),
            s + "feed_forward.w2.weight": (d + "mlp.down_proj.weight", 0),
        })
        if layer.self_attn.qk_norm:
            layout[s + "attention.q_norm.weight"] = (d + "self_attn.q_norm.weight", 0)
            layout[s + "attention.k_norm.weight"] = (d + "self_attn.k_norm.weight", 0)
    return layout
