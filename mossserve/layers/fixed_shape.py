"""Fixed-shape model calls and their CUDA graphs.

A decode step's small model calls (a depth transformer's positions, one call per codebook) cost
more in kernel launches than in arithmetic. Run at a fixed batch size, from fixed input buffers,
each call has one shape, so on CUDA it can be captured once as a graph and replayed. The same
fixed-shape path runs eagerly on any device ("static"), which is how it is tested without a GPU.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch


def capture_graph(run: Callable[[], torch.Tensor], device: torch.device,
                  pool: tuple | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm `run` up on a side stream (lazy allocations, library handles), then capture one call
    on that stream. The graph keeps raw pointers: whatever `run` reads must never be reallocated
    afterwards. The capture names its stream: torch's default capture stream is made once, on the
    device current when it is first used, and a capture on a stream of another GPU records nothing."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.device(device):
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            out = run()
    return graph, out


@dataclass
class _Shape:
    """The buffers of one padded batch size, and per key its captured graph and output."""

    x: torch.Tensor  # (size, width): the input every call of this size reads
    buffers: object  # what consecutive calls share (a per-frame cache)
    graphs: dict[Hashable, torch.cuda.CUDAGraph] = field(default_factory=dict)
    outputs: dict[Hashable, torch.Tensor] = field(default_factory=dict)


class FixedShapeCalls:
    """`forward(key, x, buffers) -> y`, run on rows padded to the next of `batch_sizes`.

    `new_buffers(size)` makes the per-size buffers the calls of one frame share (written by one
    call, read by the next), so they must not depend on what earlier frames left there. Padding
    rows compute on zeros and are dropped; every row is independent of the others. With
    `graphs`, each (size, key) is captured once (all keys of `keys` are run eagerly before the
    first capture, so tables a forward grows lazily reach their final size) and replayed.
    A call's output is a view of that (size, key)'s buffer, valid until the key runs again.
    Without `batch_sizes` (eager decoding) every frame runs at its own size (`frame`).
    """

    def __init__(self, forward: Callable[[Hashable, torch.Tensor, object], torch.Tensor],
                 new_buffers: Callable[[int], object], width: int, dtype: torch.dtype,
                 device: torch.device, keys: Sequence[Hashable], batch_sizes: Sequence[int] = (),
                 graphs: bool = False) -> None:
        self.forward, self.new_buffers = forward, new_buffers
        self.width, self.dtype, self.device = width, dtype, device
        self.batch_sizes, self.keys, self.graphs = sorted(batch_sizes), list(keys), graphs
        self._shapes: dict[int, _Shape] = {}
        self._pool: tuple | None = None

    def fits(self, batch: int) -> bool:
        return bool(self.batch_sizes) and batch <= self.batch_sizes[-1]

    def frame(self, batch: int) -> Callable[[Hashable, torch.Tensor], torch.Tensor]:
        """The calls of one frame of `batch` rows, sharing one set of buffers: padded to a fixed size
        where one fits, else at the batch's own size with fresh buffers."""
        if self.fits(batch):
            return self
        buffers = self.new_buffers(batch)
        return lambda key, x: self.forward(key, x, buffers)

    def __call__(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """x (B, width), B <= the largest size -> forward's output for those B rows."""
        batch = x.shape[0]
        shape = self._shape(next(s for s in self.batch_sizes if s >= batch))
        shape.x[:batch].copy_(x)
        shape.x[batch:].zero_()
        if not self.graphs:
            return self.forward(key, shape.x, shape.buffers)[:batch]
        if key not in shape.graphs:
            self._capture(shape, key)
        shape.graphs[key].replay()
        return shape.outputs[key][:batch]

    def _shape(self, size: int) -> _Shape:
        if size not in self._shapes:
            x = torch.zeros(size, self.width, dtype=self.dtype, device=self.device)
            self._shapes[size] = _Shape(x, self.new_buffers(size))
        return self._shapes[size]

    def _capture(self, shape: _Shape, key: Hashable) -> None:
        if self._pool is None:
            for k in self.keys:
                self.forward(k, shape.x, shape.buffers)
            self._pool = torch.cuda.graph_pool_handle()
        graph, out = capture_graph(lambda: self.forward(key, shape.x, shape.buffers), self.device, self._pool)
        shape.graphs[key], shape.outputs[key] = graph, out
