"""Slot-based KV cache: one fixed-size slot per running request, allocated once.

Slots (not pages) because a talker request's length is bounded and known at admission
(prompt + max new frames), the batch is small (tens of requests), and a slot makes the
decode-step gather a plain index. docs/engine.md has the reasoning.
"""
from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    def release(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"slot {slot} released twice")
        self.lengths[slot] = 0
        self._free.append(slot)
