"""Where the new tokens of one forward call sit: per row a cache slot and a start position."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import torch


@dataclass
class BatchContext:
    """Where the tokens of one forward call go: per row a slot and a start position.

    Row b appends T tokens at positions start[b] .. start[b]+T-1 of its slot and attends to
    every earlier position of that slot (causal by absolute position).
    """

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    slots: torch.Tensor | None  # (B,) slot of each row, None = no cache (plain causal attention)
    kv_len: int  # keys to read per row: max(start + T)
    # The first slot when the rows' slots are first, first + 1, ... (known on the host): attention then
    # reads the cache as a view instead of gathering the rows' keys (layers/attention.py).
    slot_run_start: int | None = None
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, kv_len), True = may attend; made on first use (a fused CPU decode step never reads it)."""
        if self._mask is None:
            keys = torch.arange(self.kv_len, device=self.positions.device)
            self._mask = (keys[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)
        return self._mask

    @classmethod
    def build(cls, starts: list[int], num_tokens: int, slots: list[int] | None, device: torch.device) -> "BatchContext":
        start = torch.tensor(starts, dtype=torch.int64, device=device)
        positions = start[:, None] + torch.arange(num_tokens, device=device)[None, :]
        slot_tensor = None if slots is None else torch.tensor(slots, dtype=torch.int64, device=device)
        ctx = cls.from_positions(positions, slot_tensor, int(max(starts)) + num_tokens)
        ctx.slot_run_start = run_start(slots)
        return ctx

    @classmethod
    def from_positions(cls, positions: torch.Tensor, slots: torch.Tensor | None, kv_len: int) -> "BatchContext":
        """From device tensors, without a host sync: the form a captured CUDA graph replays."""
        return cls(positions=positions, slots=slots, kv_len=kv_len)


def run_start(slots: list[int] | None) -> int | None:
    """slots[0] if the slots are consecutive and ascending (s, s + 1, ...), else None."""
    if not slots or any(b - a != 1 for a, b in pairwise(slots)):
        return None
    return int(slots[0])
