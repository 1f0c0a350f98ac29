"""Rotary position embedding, rotate-half layout (Qwen/Llama): pairs are (i, i + d/2).

Rotate-half computes x * cos + cat(-x_hi, x_lo) * sin. Here the table keeps sin with its first
half negated, so the rotation is x * cos + swap_halves(x) * sin: one `roll` instead of two slices,
a negation and a concatenation, and the same products bit for bit (-a * b == a * -b in floating
point).
"""
from __future__ import annotations

import torch


class RotaryEmbedding:
    """cos/sin tables grown on demand; positions are absolute token indices.

    Not a module: it holds no weights, so checkpoints and meta-device construction ignore it.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.cos_table = torch.empty(0, head_dim)
        self.sin_table = torch.empty(0, head_dim)
        # Outgrown CUDA tables stay allocated: a captured CUDA graph reads the tables it was
        # captured with by pointer (a second engine on the same model may need longer ones).
        self._outgrown: list[torch.Tensor] = []

    def reserve(self, length: int, device: torch.device) -> None:
        """Precompute the tables up to `length` positions on `device` (grows, never shrinks)."""
        if length <= self.cos_table.shape[0] and self.cos_table.device == device:
            return
        length = max(length, 2 * self.cos_table.shape[0], 256)
        if self.cos_table.device.type == "cuda":
            self._outgrown += [self.cos_table, self.sin_table]
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        self.cos_table, self.sin_table = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    def cos_sin(self, positions: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (B, T, 1, d) at `positions` (B, T), all below `length`, for x laid out
        (B, T, heads, d); once per forward, shared by every layer."""
        self.reserve(length, positions.device)
        return self.cos_table[positions].unsqueeze(2).to(dtype), self.sin_table[positions].unsqueeze(2).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, d) rotated by the tables of `RotaryEmbedding.cos_sin`."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin
