"""Slot-based KV cache: one fixed-size slot per running request, allocated once.

Slots (not pages) because a talker request's length is bounded and known at admission
(prompt + max new frames), the batch is small (tens of requests), and a slot makes the
decode-step gather a plain index. docs/engine.md has the reasoning.

A released slot keeps its keys and values until it is handed out again; `release(slot, kept)`
labels it with the rows they belong to, so that a later prompt beginning with those rows can
start from them instead of prefilling them again (engine.py). Allocation hands out unlabelled
slots first, then the longest-unused labelled one, and drops the label of the slot it hands out.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidRequestError


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
        try:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        except RuntimeError as e:  # out of memory (torch.OutOfMemoryError on CUDA is one)
            size = 2 * int(np.prod(shape, dtype=object)) * torch.empty((), dtype=dtype).element_size()
            raise InvalidRequestError(f"the KV cache of {num_slots} slots (one a running request, plus a scratch "
                                      f"slot in the fixed-shape modes) of {max_len} positions needs "
                                      f"{size / 2**30:.1f} GiB on {device}, which could not be allocated; lower "
                                      f"max_running (--max-running), max_len or prefill_tokens (an engine's "
                                      f"positions are max_len + prefill_tokens)") from e
        self.num_slots = num_slots
        self.max_len = max_len
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self.kept: dict[int, np.ndarray] = {}  # free slot -> the rows its first positions hold, oldest first

    def allocate(self, slot: int | None = None) -> int:
        """A free slot: `slot` itself, or an unlabelled one, or else the longest-unused labelled one."""
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        if slot is None:
            unlabelled = [s for s in self._free if s not in self.kept]
            slot = unlabelled[-1] if unlabelled else next(iter(self.kept))
        self._free.remove(slot)
        self.kept.pop(slot, None)
        self.lengths[slot] = 0
        return slot

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    def release(self, slot: int, kept: np.ndarray | None = None) -> None:
        """Free `slot`; `kept`: the rows whose keys and values its positions 0.. hold, for reuse."""
        if slot in self._free:
            raise RuntimeError(f"slot {slot} released twice")
        self.lengths[slot] = 0
        self._free.append(slot)
        if kept is not None and len(kept):
            self.kept[slot] = kept
