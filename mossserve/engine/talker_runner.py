"""Batched prefill and decode steps of a talker family over a slot KV cache.

Prefill takes a piece of several prompts at once, right-padded to the longest piece: a padded
row writes throw-away keys past its prompt, which its own later steps overwrite before any
query may see them (attention is causal by absolute position). The cache holds
`prefill_tokens` extra positions per slot for that overhang.

Decode runs one row per request. mode "eager" sizes every step to the batch and to the
longest sequence; "static" pads the batch to a fixed size and the keys to a fixed bucket so
that the step has a fixed shape; "graphs" (CUDA) captures each static shape once in a CUDA
graph and replays it, which removes the per-step launch cost of every layer. Padding rows of
a static step read and write a scratch slot no request owns. The family is told the mode, so
that model calls inside its own step (a depth loop) run at fixed shapes too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layers.batch_context import BatchContext
from ..layers.fixed_shape import capture_graph
from ..models.family import StepOutput, TalkerFamily
from .kv_cache import SlotKVCache

KV_BUCKET_MIN = 256


@dataclass
class StaticStep:
    """Input and output buffers of one fixed decode shape (and its CUDA graph, if captured)."""

    rows: torch.Tensor  # (B, columns)
    positions: torch.Tensor  # (B, 1)
    slots: torch.Tensor  # (B,)
    hidden: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class TalkerRunner:
    def __init__(self, family: TalkerFamily, max_running: int, max_len: int, prefill_tokens: int,
                 mode: str = "eager", batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> None:
        if mode not in ("eager", "static", "graphs"):
            raise ValueError(f"mode must be eager, static or graphs, got {mode!r}")
        weight = next(family.model.parameters())
        self.family, self.device, self.mode = family, weight.device, mode
        backbone = family.backbone_config
        static = mode != "eager"
        slots = max_running + int(static)  # fixed-shape steps pad into one scratch slot
        self.cache = SlotKVCache(backbone.num_hidden_layers, slots, max_len + prefill_tokens,
                                 backbone.num_key_value_heads, backbone.head_dim, weight.dtype, self.device)
        self.scratch_slot = self.cache.allocate() if static else -1
        self.state = family.new_state(slots, self.device)
        self.batch_sizes = sorted({min(s, max_running) for s in batch_sizes} | {max_running})
        family.set_decode_mode(self.state, mode, self.batch_sizes)
        self.next_rows = torch.zeros(slots, family.columns, dtype=torch.int64, device=self.device)
        self._steps: dict[tuple[int, int], StaticStep] = {}
        self._graph_pool = None

    @property
    def slots_in_use(self) -> int:
        return self.cache.used - (self.scratch_slot >= 0)

    def allocate(self, slot: int | None = None) -> int:
        return self.cache.allocate(slot)

    def release(self, slot: int, kept: np.ndarray | None = None) -> None:
        self.family.release(self.state, slot)
        self.cache.release(slot, kept)

    # ---- forward passes ------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slots: list[int], pieces: list[np.ndarray]) -> torch.Tensor:
        """Append prompt pieces (n_i, columns) to their slots; returns the hidden state after each piece (B, H)."""
        width = max(len(p) for p in pieces)
        rows = np.zeros((len(pieces), width, pieces[0].shape[1]), dtype=np.int64)
        for b, piece in enumerate(pieces):
            rows[b, : len(piece)] = piece
        starts = [self.cache.lengths[s] for s in slots]
        ctx = BatchContext.build(starts, width, slots, self.device)
        hidden = self.family.model(torch.from_numpy(rows).to(self.device), ctx, self.cache.k, self.cache.v)
        last = torch.tensor([len(p) - 1 for p in pieces], device=self.device)
        for slot, piece in zip(slots, pieces):
            self.cache.lengths[slot] += len(piece)
        return hidden[torch.arange(len(pieces), device=self.device), last]

    @torch.inference_mode()
    def decode(self, slots: list[int]) -> torch.Tensor:
        """Each slot's next row (from its last step) -> hidden states (B, H)."""
        rows = self.next_rows[torch.tensor(slots, device=self.device)]
        starts = [self.cache.lengths[s] for s in slots]
        if self.mode == "eager":
            ctx = BatchContext.build(starts, 1, slots, self.device)
            hidden = self.family.model(rows[:, None], ctx, self.cache.k, self.cache.v)[:, -1]
        else:
            hidden = self._decode_static(slots, starts, rows)
        for slot in slots:
            self.cache.lengths[slot] += 1
        return hidden

    def step(self, hidden: torch.Tensor, slots: list[int]) -> StepOutput:
        """The family's step for these slots; their next rows are kept for `decode`."""
        with torch.inference_mode():
            index = torch.tensor(slots, device=self.device)
            out = self.family.step(self.state, hidden, index)
            self.next_rows[index] = out.rows
            return out

    # ---- fixed-shape decode steps --------------------------------------------------------
    def _decode_static(self, slots: list[int], starts: list[int], rows: torch.Tensor) -> torch.Tensor:
        batch = len(slots)
        size = next(s for s in self.batch_sizes if s >= batch)
        keys = KV_BUCKET_MIN
        while keys < max(starts) + 1:
            keys *= 2
        keys = min(keys, self.cache.max_len)
        step = self._steps.get((size, keys)) or self._build_step(size, keys)
        step.rows[:batch].copy_(rows)
        step.rows[batch:].zero_()
        step.positions[:batch, 0].copy_(torch.tensor(starts), non_blocking=True)
        step.positions[batch:].zero_()
        step.slots[:batch].copy_(torch.tensor(slots), non_blocking=True)
        step.slots[batch:].fill_(self.scratch_slot)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.hidden = self._static_forward(step, keys)
        return step.hidden[:batch].clone()

    def _static_forward(self, step: StaticStep, keys: int) -> torch.Tensor:
        ctx = BatchContext.from_positions(step.positions, step.slots, keys)
        return self.family.model(step.rows[:, None], ctx, self.cache.k, self.cache.v)[:, -1]

    def _build_step(self, size: int, keys: int) -> StaticStep:
        columns = self.family.columns
        step = StaticStep(
            rows=torch.zeros(size, columns, dtype=torch.int64, device=self.device),
            positions=torch.zeros(size, 1, dtype=torch.int64, device=self.device),
            slots=torch.full((size,), self.scratch_slot, dtype=torch.int64, device=self.device),
        )
        if self.mode == "graphs":
            self._capture(step, keys)
        self._steps[(size, keys)] = step
        return step

    def _capture(self, step: StaticStep, keys: int) -> None:
        """Capture one replayable step. The fresh buffers point every row at the scratch slot, so
        warm-up and capture touch no request's cache."""
        if self._graph_pool is None:  # tables sized for the longest bucket, so no capture ever regrows them
            self._static_forward(step, self.cache.max_len)
            self._graph_pool = torch.cuda.graph_pool_handle()
        step.graph, step.hidden = capture_graph(lambda: self._static_forward(step, keys), self.device,
                                                self._graph_pool)
