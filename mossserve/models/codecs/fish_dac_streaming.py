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

from .fish_dac import FishDac
from .stream_slots import StreamSlots


class FishStreamingDecoder:
    def __init__(self, codec: FishDac, max_streams: int, max_chunk_frames: int, n_quantizers: int | None = None):
        self.codec = codec
        self.max_streams, self.max_chunk_frames = max_streams, max_chunk_frames
        self.n_quantizers = codec.quantizers_to_use(n_quantizers)
        self.streams = StreamSlots(max_streams, max_chunk_frames)
        self.channels, self.samples_per_frame = codec.channels, codec.samples_per_frame
        with torch.inference_mode():
            self._pool = codec.stream_state(max_streams)

    @property
    def num_open(self) -> int:
        return self.streams.num_open

    def state_bytes(self) -> int:
        """Bytes of decoder state held for all slots (fixed at construction)."""
        return sum(t.numel() * t.element_size() for t in self._pool.values())

    @torch.inference_mode()
    def open(self) -> int:
        sid, row = self.streams.open()
        for tensor in self._pool.values():
            tensor[row] = 0
        return sid

    def close(self, stream_id: int) -> None:
        self.streams.close(stream_id)

    @torch.inference_mode()
    def decode(self, stream_ids: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Next chunk (>= n_quantizers rows, t_i frames) of each listed stream -> audio
        (1, t_i * samples_per_frame) float32 per stream, in order."""
        rows = self.streams.check_call(stream_ids, chunks, self.n_quantizers)
        device, k = self.codec.device, self.n_quantizers
        frames = [int(c.shape[1]) for c in chunks]
        codes = pad_sequence([c[:k].T for c in chunks], batch_first=True).transpose(1, 2)  # (B, k, T)
        codes = self.codec.checked_codes(codes, None)
        rows = torch.tensor(rows, device=device)
        state = {key: tensor.index_select(0, rows) for key, tensor in self._pool.items()}
        audio = self.codec.decode_step(codes, torch.tensor(frames, device=device), state)
        for key, tensor in self._pool.items():
            tensor.index_copy_(0, rows, state[key])
        n = self.samples_per_frame
        return [audio[b, :, : t * n] for b, t in enumerate(frames)]
