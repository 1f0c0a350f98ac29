"""Multi-stream streaming decoder of the Fish modded DAC: the engine's side of the codec seam.

Each stream owns one row of a fixed pool of state tensors (conv left contexts, and per post
transformer layer the keys/values of the last window - 1 frames plus the stream's position),
allocated at construction: a stream's state never grows with its length. A call decodes the
chunks of the listed streams as one right-padded batch (lengths may differ within a call and
across calls): their rows are gathered, advanced by one `decode_step`, and written back.
Unlisted streams are untouched; streams open and close at any call. Every stage is causal and
the state is exact, so a stream's concatenated chunks equal its offline decode.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ...errors import InvalidRequestError
from .fish_dac import FishDac


class FishStreamingDecoder:
    def __init__(self, codec: FishDac, max_streams: int, max_chunk_frames: int, n_quantizers: int | None = None):
        if max_streams < 1 or max_chunk_frames < 1:
            raise InvalidRequestError("max_streams and max_chunk_frames must be >= 1")
        self.codec = codec
        self.max_streams, self.max_chunk_frames = max_streams, max_chunk_frames
        self.n_quantizers = codec.quantizers_to_use(n_quantizers)
        self.channels, self.samples_per_frame = codec.channels, codec.samples_per_frame
        with torch.inference_mode():
            self._pool = codec.stream_state(max_streams)
        self._slots: dict[int, int] = {}  # stream id -> pool row
        self._free = list(range(max_streams - 1, -1, -1))
        self._next_id = 0

    @property
    def num_open(self) -> int:
        return len(self._slots)

    def state_bytes(self) -> int:
        """Bytes of decoder state held for all slots (fixed at construction)."""
        return sum(t.numel() * t.element_size() for t in self._pool.values())

    @torch.inference_mode()
    def open(self) -> int:
        if not self._free:
            raise InvalidRequestError(f"all {self.max_streams} decoder streams are in use")
        slot = self._free.pop()
        for tensor in self._pool.values():
            tensor[slot] = 0
        sid, self._next_id = self._next_id, self._next_id + 1
        self._slots[sid] = slot
        return sid

    def close(self, stream_id: int) -> None:
        if stream_id not in self._slots:
            raise InvalidRequestError(f"stream {stream_id} is not open")
        self._free.append(self._slots.pop(stream_id))

    @torch.inference_mode()
    def decode(self, stream_ids: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Next chunk (>= n_quantizers rows, t_i frames) of each listed stream -> audio
        (1, t_i * samples_per_frame) float32 per stream, in order."""
        self._check_call(stream_ids, chunks)
        device, k = self.codec.device, self.n_quantizers
        frames = [int(c.shape[1]) for c in chunks]
        codes = pad_sequence([c[:k].T for c in chunks], batch_first=True).transpose(1, 2)  # (B, k, T)
        codes = self.codec.checked_codes(codes, None)
        rows = torch.tensor([self._slots[s] for s in stream_ids], device=device)
        state = {key: tensor.index_select(0, rows) for key, tensor in self._pool.items()}
        audio = self.codec.decode_step(codes, torch.tensor(frames, device=device), state)
        for key, tensor in self._pool.items():
            tensor.index_copy_(0, rows, state[key])
        n = self.samples_per_frame
        return [audio[b, :, : t * n] for b, t in enumerate(frames)]

    def _check_call(self, stream_ids: list[int], chunks: list[torch.Tensor]) -> None:
        if not stream_ids or len(stream_ids) != len(chunks):
            raise InvalidRequestError("decode needs one chunk per listed stream")
        if len(set(stream_ids)) != len(stream_ids):
            raise InvalidRequestError("a stream may appear once per call")
        for sid, c in zip(stream_ids, chunks):
            if sid not in self._slots:
                raise InvalidRequestError(f"stream {sid} is not open")
            if c.dim() != 2 or c.shape[0] < self.n_quantizers or not 1 <= c.shape[1] <= self.max_chunk_frames:
                raise InvalidRequestError(f"stream {sid}: expected codes (>= {self.n_quantizers}, "
                                          f"1..{self.max_chunk_frames}), got {tuple(c.shape)}")
