"""The codec's causal Transformer stage: GPT-J RoPE, sliding-window attention, streaming state.

One code path serves offline and streaming. Offline a stage sees a whole sequence from position
0. Streaming, each row keeps a ring of keys/values (position p at index p % capacity) with
capacity = context - 1 + the most tokens a chunk may bring: a chunk's keys are written before it
attends without evicting any key its queries still need, so every query sees its full window.
Chunks are right-padded to the longest in the batch; padding sits after every real token of its
row, so the causal mask keeps it out of real outputs, and a ring slot holding padding is either
rewritten by the row's next tokens or outside every window it will ever serve (`ring_positions`).

Window rules (spec 5.4, 5.7), query at position p:
  exact: keys at p - context < k <= p (the offline result, for any chunk size);
  ring:  additionally k >= end - context, where end is the row's position after its chunk: the
         reference's ring buffer of `context` entries, overwritten before the chunk attends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .moss_audio_tokenizer_config import TransformerSpec

OFFLINE_BLOCK = 1024  # offline queries per attention call: bounds memory on long inputs


@dataclass
class StageState:
    """Streaming state of one Transformer stage for a batch of rows, updated in place."""

    offset: torch.Tensor  # (B,) int64: real tokens already pushed through the stage
    keys: list[torch.Tensor]  # per layer (B, H, L, D) ring after RoPE, contiguous; L = capacity,
    values: list[torch.Tensor]  # or fewer while no row has wrapped (a gathered copy of the head)
    capacity: int  # position p lives at index p % capacity
    max_offset: int = 0  # host-side bound on `offset`: until a ring wraps, only its head is used

    @classmethod
    def zeros(cls, spec: TransformerSpec, batch: int, max_tokens: int, device: torch.device,
              dtype: torch.dtype) -> "StageState":
        """State for chunks of at most `max_tokens` tokens of this stage."""
        capacity = spec.context - 1 + max_tokens
        shape = (batch, spec.num_heads, capacity, spec.head_dim)
        return cls(
            offset=torch.zeros(batch, dtype=torch.long, device=device),
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)],
            capacity=capacity,
        )

    def span(self, tokens: int) -> int:
        """Ring entries that can hold keys once a chunk of `tokens` tokens is written."""
        return min(self.capacity, self.max_offset + tokens)


def ring_positions(offset: torch.Tensor, tokens: int, capacity: int) -> torch.Tensor:
    """Position held by each ring index (B, capacity) once `tokens` tokens (padding included)
    were written from `offset`: the latest p < offset + tokens with p = index mod capacity.
    Negative = never written. A slot last written with padding (a previous chunk's tail) holds a
    position >= offset if this chunk rewrote it, else <= offset - context: outside every window."""
    last = (offset + tokens - 1)[:, None]
    return last - (last - torch.arange(capacity, device=offset.device)) % capacity


class Rope(nn.Module):
    """Rotary embedding on interleaved pairs (2i, 2i+1) read as complex numbers, in fp32."""

    def forward(self, qk: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """qk (B, T, 2, H, D): q and k of each token; rotation (B, T, 1, 1, D/2) complex."""
        pairs = torch.view_as_complex(qk.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(qk.dtype)


def rope_rotation(pos: torch.Tensor, head_dim: int, max_period: float) -> torch.Tensor:
    """cos + i sin of pos * f_i, f_i = max_period^(-2i/D): (B, T, 1, 1, D/2), shared by a stage's layers."""
    ds = torch.arange(head_dim // 2, device=pos.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angle = freqs * pos.float()[:, :, None]
    return torch.complex(torch.cos(angle), torch.sin(angle))[:, :, None, None]


def window_mask(pos_q: torch.Tensor, pos_k: torch.Tensor, context: int) -> torch.Tensor:
    delta = pos_q[:, :, None] - pos_k[:, None, :]
    return (pos_k[:, None, :] >= 0) & (delta >= 0) & (delta < context)


class Attention(nn.Module):
    def __init__(self, spec: TransformerSpec):
        super().__init__()
        d = spec.d_model
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.context, self.causal = spec.context, spec.causal
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.rope = Rope()

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Offline (cache None), or streaming: the chunk's keys/values go into the rings `cache`
        at flat rows `rows` (of the rings viewed as (-1, D), in (B, H, T) order), then the queries
        attend over the first mask.shape[-1] ring entries with the additive `mask` (0 / -inf)."""
        B, T, d = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.heads, self.head_dim)
        qk = qkv[:, :, :2] if rotation is None else self.rope(qkv[:, :, :2], rotation)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if cache is None:
            out = self._offline(q, k, v)
        else:
            keys, values = cache
            keys.view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
            values.view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
            span = mask.shape[-1]
            out = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span], mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, d))

    def _offline(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.causal:
            return F.scaled_dot_product_attention(q, k, v)
        T = q.shape[2]
        pos = torch.arange(T, device=q.device)[None]
        outs = []
        for a in range(0, T, OFFLINE_BLOCK):
            b, s = min(T, a + OFFLINE_BLOCK), max(0, a - self.context + 1)
            mask = window_mask(pos[:, a:b], pos[:, s:b], self.context)[:, None]
            outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, s:b], v[:, :, s:b], mask))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


class LayerScale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, fp32: bool):
        super().__init__()
        self.eps, self.fp32 = eps, fp32
        self.alpha = nn.Parameter(torch.empty(1, 1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if self.fp32 else x
        var = self.eps + torch.mean(y * y, dim=2, keepdim=True)
        return (y * (self.alpha.to(var) * torch.rsqrt(var))).to(x.dtype)


class GatedMLP(nn.Module):
    """`linear_out(act(a) * b)` with [a | b] = linear_in(x) (not used by released checkpoints)."""

    def __init__(self, d: int, dim_feedforward: int, activation: str):
        super().__init__()
        hidden = (21 * d) // 8 if dim_feedforward == 4 * d else (2 * dim_feedforward) // 3
        self.linear_in = nn.Linear(d, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, d, bias=False)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.linear_in(x).unflatten(-1, (2, -1)).unbind(-2)
        return self.linear_out(self.activation(a) * b)


_ACTIVATIONS = {  # the names of GATING_ACTIVATIONS
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "leaky_relu": F.leaky_relu, "elu": F.elu,
    "gelu": F.gelu, "silu": F.silu, "mish": F.mish, "softsign": F.softsign, "identity": lambda x: x,
}


def _norm(spec: TransformerSpec) -> nn.Module:
    if spec.norm == "layer_norm":
        return nn.LayerNorm(spec.d_model, eps=1e-5)
    return RMSNorm(spec.d_model, eps=1e-8 if spec.norm == "rms_norm_f32" else 1e-5, fp32=spec.norm == "rms_norm_f32")


class Layer(nn.Module):
    """Pre-norm block: x += s1 * attn(norm1(x)); x += s2 * mlp(norm2(x))."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.self_attn = Attention(spec)
        self.norm1, self.norm2 = _norm(spec), _norm(spec)
        if spec.gating == "none":
            self.linear1 = nn.Linear(spec.d_model, spec.dim_feedforward, bias=False)
            self.linear2 = nn.Linear(spec.dim_feedforward, spec.d_model, bias=False)
        else:
            self.gating = GatedMLP(spec.d_model, spec.dim_feedforward, spec.gating)
        self.gated = spec.gating != "none"
        scaled = spec.layer_scale is not None
        self.layer_scale_1 = LayerScale(spec.d_model) if scaled else nn.Identity()
        self.layer_scale_2 = LayerScale(spec.d_model) if scaled else nn.Identity()

    def forward(self, x, rotation, cache=None, rows=None, mask=None):
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), rotation, cache, rows, mask))
        h = self.norm2(x)
        h = self.gating(h) if self.gated else self.linear2(F.gelu(self.linear1(h)))
        return x + self.layer_scale_2(h)


class Transformer(nn.Module):
    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(Layer(spec) for _ in range(spec.num_layers))

    def forward(self, x: torch.Tensor, offset: torch.Tensor, state: StageState | None = None,
                lengths: torch.Tensor | None = None, ring: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        spec = self.spec
        pos = offset[:, None] + torch.arange(T, device=x.device)
        if spec.positional_embedding in ("sin", "sin_rope"):
            x = x + spec.positional_scale * _sin_embedding(pos, C, spec.max_period, x.dtype)
        rotation = None
        if spec.positional_embedding in ("rope", "sin_rope"):
            rotation = rope_rotation(pos, spec.head_dim, spec.max_period)
        if state is None:
            for layer in self.layers:
                x = layer(x, rotation)
            return x
        # One mask and one write index for all layers of the stage. While no row has wrapped its
        # ring, keys sit in the first max_offset + T entries: attend over those only.
        pos_k = ring_positions(offset, T, state.capacity)[:, : state.span(T)]
        mask = window_mask(pos, pos_k, spec.context)
        if ring:
            mask &= (pos_k >= offset[:, None] + lengths[:, None] - spec.context)[:, None, :]
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))[:, None]
        heads = torch.arange(B * spec.num_heads, device=x.device).view(B, -1, 1) * state.keys[0].shape[2]
        rows = (heads + (pos % state.capacity)[:, None, :]).reshape(-1)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotation, (state.keys[i], state.values[i]), rows, bias)
        return x


def _sin_embedding(pos: torch.Tensor, dim: int, max_period: float, dtype: torch.dtype) -> torch.Tensor:
    half = dim // 2
    adim = torch.arange(half, device=pos.device, dtype=dtype)
    phase = pos.to(dtype)[..., None] / (torch.full([], max_period, device=pos.device, dtype=dtype) ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class ProjectedTransformer(nn.Module):
    """A Transformer entry of encoder_kwargs / decoder_kwargs; channels-first in and out."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.spec = spec
        self.input_proj = nn.Linear(spec.input_dimension, spec.d_model, bias=False) \
            if spec.input_dimension != spec.d_model else nn.Identity()
        self.transformer = Transformer(spec)
        self.output_proj = nn.Linear(spec.d_model, spec.output_dimension, bias=False) \
            if spec.output_dimension != spec.d_model else nn.Identity()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Offline: the whole sequence from position 0. x: (B, C_in, T)."""
        offset = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        h = self.transformer(self.input_proj(x.transpose(1, 2)), offset)
        return self.output_proj(h).transpose(1, 2), lengths

    def step(self, x: torch.Tensor, state: StageState, lengths: torch.Tensor, ring: bool = False) -> torch.Tensor:
        """Streaming: one right-padded chunk per row, `lengths` (B,) real tokens each; `state`
        advances in place."""
        if not self.spec.causal:
            raise ValueError("a non-causal Transformer stage cannot stream")
        T = x.shape[2]
        if T > state.capacity - self.spec.context + 1 or state.keys[0].shape[2] < state.span(T):
            raise ValueError(f"a chunk of {T} tokens does not fit this streaming state")
        h = self.transformer(self.input_proj(x.transpose(1, 2)), state.offset, state, lengths, ring)
        state.offset += lengths
        state.max_offset += T
        return self.output_proj(h).transpose(1, 2)


class Patch(nn.Module):
    """Encoder patch (B, C, L*h) -> (B, C*h, L), or its exact inverse in the decoder."""

    def __init__(self, patch_size: int, down: bool):
        super().__init__()
        self.patch_size, self.down = patch_size, down

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, n = x.shape
        h = self.patch_size
        if self.down:
            return x.reshape(b, c, n // h, h).transpose(2, 3).reshape(b, c * h, n // h), lengths // h
        return x.reshape(b, c // h, h, n).transpose(2, 3).reshape(b, c // h, n * h), lengths * h
