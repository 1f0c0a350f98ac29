"""Multi-stream streaming decoder of the MOSS-Audio-Tokenizer: the engine's side of the codec seam.

Every decoder attention layer keeps, per stream slot, a ring of keys/values sized for the window
plus one chunk (`context - 1 + max chunk tokens`), and each stream's position (`StageState` rows
of a fixed pool). A call decodes the chunks of the streams it lists as one right-padded batch
(chunk lengths may differ within a call and across calls): when every slot takes part it works
on the pool in place, otherwise on a gathered copy of the listed rows whose new entries are then
written back. Unlisted streams are not touched. Streams open and close at any call. A call that
raises leaves every stream as it was before it, so its chunks can be decoded again.

window="exact" (default): every query sees its full offline window, so a stream's concatenated
output equals its offline decode for any length and chunking. window="ring" reproduces the
reference's ring buffer of `context` entries (spec 5.7 / 5.9), which differs from offline once a
stream has outrun a window; it needs every chunk to fit in each stage's window.
State per stream is fixed at open: it never grows with the stream's length.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ...errors import InvalidRequestError
from .moss_audio_tokenizer import MossAudioTokenizer
from .moss_transformer import Patch, StageState
from .stream_slots import StreamSlots


class MossStreamingDecoder:
    def __init__(self, codec: MossAudioTokenizer, max_streams: int, max_chunk_frames: int,
                 n_quantizers: int | None = None, window: str = "exact"):
        if window not in ("exact", "ring"):
            raise InvalidRequestError(f"window must be 'exact' or 'ring', got {window!r}")
        self.codec = codec
        self.max_streams, self.max_chunk_frames = max_streams, max_chunk_frames
        self.n_quantizers = codec.quantizers_to_use(n_quantizers, codec.num_quantizers)
        self.streams = StreamSlots(max_streams, max_chunk_frames)
        self.ring = window == "ring"
        self.channels, self.samples_per_frame = codec.channels, codec.samples_per_frame
        if self.ring:
            self._check_ring_fits()
        with torch.inference_mode():
            self._pool = codec.stream_states(codec.decoder, max_streams, max_chunk_frames)
        self._tokens_per_frame = _tokens_per_frame(codec)
        self._frames = [0] * max_streams  # frames decoded per pool row (host copy of the offsets)

    @property
    def num_open(self) -> int:
        return self.streams.num_open

    def state_bytes(self) -> int:
        """Bytes of decoder state held for all slots (fixed at construction)."""
        return sum(t.numel() * t.element_size() for s in self._pool.values() for t in [s.offset, *s.keys, *s.values])

    @torch.inference_mode()
    def open(self) -> int:
        sid, slot = self.streams.open()
        self._frames[slot] = 0
        for state in self._pool.values():
            state.offset[slot] = 0
            for t in (*state.keys, *state.values):
                t[slot].zero_()
        return sid

    def close(self, stream_id: int) -> None:
        self.streams.close(stream_id)

    @torch.inference_mode()
    def decode(self, stream_ids: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Next chunk (>= n_quantizers rows, t_i frames) of each listed stream -> audio
        (channels, t_i * samples_per_frame) float32 per stream, in order."""
        rows = self.streams.check_call(stream_ids, chunks, self.n_quantizers)
        device, k = self.codec.device, self.n_quantizers
        frames = [int(c.shape[1]) for c in chunks]
        if any(c.is_floating_point() for c in chunks):
            raise InvalidRequestError(f"codes must be integers in [0, {self.codec.codebook_size})")
        codes = pad_sequence([c[:k].T.to(device, torch.long) for c in chunks], batch_first=True).permute(2, 0, 1)
        if bool(((codes < 0) | (codes >= self.codec.codebook_size)).any()):
            raise InvalidRequestError(f"codes must be integers in [0, {self.codec.codebook_size})")
        try:
            audio = self._decode_rows(codes, torch.tensor(frames, device=device), rows)
        except BaseException:
            self._rewind()
            raise
        for r, t in zip(rows, frames):
            self._frames[r] += t
        n = self.samples_per_frame
        return [audio[b, :, : t * n] for b, t in enumerate(frames)]

    def _decode_rows(self, codes: torch.Tensor, lengths: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Audio (B, channels, T * samples_per_frame) of one call; advances the rows' offsets and rings."""
        done = max(self._frames[r] for r in rows)
        if len(rows) == self.max_streams:  # every slot: decode in place, in slot order
            order = sorted(range(len(rows)), key=lambda b: rows[b])
            for i, pool in self._pool.items():
                pool.max_offset = done * self._tokens_per_frame[i]
            audio = self.codec.decode_step(codes[:, order], lengths[order], self._pool, self.ring)
            return audio[torch.tensor(order, device=codes.device).argsort()]
        slots = torch.tensor(rows, device=codes.device)
        states = {i: _gather(pool, slots, done * self._tokens_per_frame[i], codes.shape[2] * self._tokens_per_frame[i])
                  for i, pool in self._pool.items()}
        starts = {i: state.offset.clone() for i, state in states.items()}
        audio = self.codec.decode_step(codes, lengths, states, self.ring)
        for i, pool in self._pool.items():
            _write_back(pool, slots, states[i], starts[i], codes.shape[2] * self._tokens_per_frame[i])
        return audio

    def _rewind(self) -> None:
        """Every stream back to where it was before a call that raised, so that retrying its chunks
        is exact: an in-place call (or a write-back) may have advanced some stages, and not others.
        Only the offsets need restoring (no copy on the happy path): a chunk's keys went into the
        ring from its stream's offset, over entries at least a window behind any later query (a
        chunk fits `capacity - context + 1` tokens), which the retry rewrites or the mask hides,
        as it hides a chunk's padding."""
        frames = torch.tensor(self._frames, device=self.codec.device)
        for i, pool in self._pool.items():
            pool.offset.copy_(frames * self._tokens_per_frame[i])

    def _check_ring_fits(self) -> None:
        tokens_per_frame = 1
        for stage in self.codec.decoder:
            if isinstance(stage, Patch):
                tokens_per_frame *= stage.patch_size
            elif self.max_chunk_frames * tokens_per_frame > stage.spec.context:
                raise InvalidRequestError(
                    f"window='ring' needs chunks that fit every window: {self.max_chunk_frames} frames are "
                    f"{self.max_chunk_frames * tokens_per_frame} tokens, a stage's window {stage.spec.context}")


def _tokens_per_frame(codec: MossAudioTokenizer) -> dict[int, int]:
    tokens, out = 1, {}
    for i, stage in enumerate(codec.decoder):
        if isinstance(stage, Patch):
            tokens *= stage.patch_size
        else:
            out[i] = tokens
    return out


def _gather(pool: StageState, slots: torch.Tensor, max_offset: int, tokens: int) -> StageState:
    """The listed rows, with only the ring head they can use (all of it once any has wrapped)."""
    rows = StageState(pool.offset[slots], [], [], pool.capacity, max_offset)
    span = rows.span(tokens)
    rows.keys = [k[:, :, :span].index_select(0, slots) for k in pool.keys]
    rows.values = [v[:, :, :span].index_select(0, slots) for v in pool.values]
    return rows


def _write_back(pool: StageState, slots: torch.Tensor, rows: StageState, start: torch.Tensor, tokens: int) -> None:
    """Copy the ring entries this call wrote (tokens from each row's `start`) into the pool."""
    idx = (start[:, None] + torch.arange(tokens, device=start.device)) % pool.capacity  # (B, tokens)
    # idx < the gathered length: without a wrap, start + tokens <= max_offset + tokens = the span
    batch = torch.arange(len(slots), device=start.device)[:, None]
    for dst, src in zip((*pool.keys, *pool.values), (*rows.keys, *rows.values)):
        dst[slots[:, None], :, idx] = src[batch, :, idx]
    pool.offset[slots] = rows.offset
