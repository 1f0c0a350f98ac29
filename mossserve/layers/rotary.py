"""Rotary position embedding, rotate-half layout (Qwen/Llama): pairs are (i, i + d/2)."""
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

    def reserve(self, length: int, device: torch.device) -> None:
        """Precompute the tables up to `length` positions on `device` (grows, never shrinks)."""
        if length <= self.cos_table.shape[0] and self.cos_table.device == device:
            return
        length = max(length, 2 * self.cos_table.shape[0], 256)
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        self.cos_table, self.sin_table = angles.cos(), angles.sin()

    def cos_sin(self, positions: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, d) at `positions` (B, T), all below `length`; once per forward, shared by every layer."""
        self.reserve(length, positions.device)
        return self.cos_table[positions].unsqueeze(1).to(dtype), self.sin_table[positions].unsqueeze(1).to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, nh, T, d), k (B, nkv, T, d) rotated by the tables of `RotaryEmbedding.cos_sin`."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
