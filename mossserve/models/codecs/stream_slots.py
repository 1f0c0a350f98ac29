"""Stream ids over the rows of a fixed pool of per-stream decoder state: the bookkeeping every
codec's multi-stream decoder shares (open, close, and the checks of a decode call)."""
from __future__ import annotations

import torch

from ...errors import InvalidRequestError


class StreamSlots:
    def __init__(self, max_streams: int, max_chunk_frames: int) -> None:
        if max_streams < 1 or max_chunk_frames < 1:
            raise InvalidRequestError("max_streams and max_chunk_frames must be >= 1")
        self.max_streams, self.max_chunk_frames = max_streams, max_chunk_frames
        self._rows: dict[int, int] = {}  # stream id -> pool row
        self._free = list(range(max_streams - 1, -1, -1))
        self._next_id = 0

    @property
    def num_open(self) -> int:
        return len(self._rows)

    def open(self) -> tuple[int, int]:
        """A new stream id and the pool row it owns (the caller resets that row's state)."""
        if not self._free:
            raise InvalidRequestError(f"all {self.max_streams} decoder streams are in use")
        row = self._free.pop()
        sid, self._next_id = self._next_id, self._next_id + 1
        self._rows[sid] = row
        return sid, row

    def close(self, stream_id: int) -> None:
        if stream_id not in self._rows:
            raise InvalidRequestError(f"stream {stream_id} is not open")
        self._free.append(self._rows.pop(stream_id))

    def row(self, stream_id: int) -> int:
        return self._rows[stream_id]

    def check_call(self, stream_ids: list[int], chunks: list[torch.Tensor], n_quantizers: int) -> list[int]:
        """The pool rows of a decode call's streams, after checking its arguments (each chunk has at
        least `n_quantizers` rows: the decoder's current setting, which the engine may change per call)."""
        if not stream_ids or len(stream_ids) != len(chunks):
            raise InvalidRequestError("decode needs one chunk per listed stream")
        if len(set(stream_ids)) != len(stream_ids):
            raise InvalidRequestError("a stream may appear once per call")
        for sid, c in zip(stream_ids, chunks):
            if sid not in self._rows:
                raise InvalidRequestError(f"stream {sid} is not open")
            if c.dim() != 2 or c.shape[0] < n_quantizers or not 1 <= c.shape[1] <= self.max_chunk_frames:
                raise InvalidRequestError(f"stream {sid}: expected codes (>= {n_quantizers}, "
                                          f"1..{self.max_chunk_frames}), got {tuple(c.shape)}")
        return [self._rows[s] for s in stream_ids]
