"""MOSS-Audio-Tokenizer ("Cat", v1 24 kHz mono; v2 / Nano multi-channel): encode and decode.

Data flow (spec 5.3): wave -> pad to whole frames -> [interleave channels] -> patch / Transformer
stages -> residual quantizer -> codes; codes -> dequantize -> Transformer / unpatch stages ->
[de-interleave] -> wave. Offline calls see whole sequences with the sliding attention window;
`chunk_duration` calls reproduce the reference's chunked streaming (ring-buffer windows);
`streaming_decoder()` is the engine's multi-stream decoder (exact offline windows by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidRequestError
from .base import finite_audio, finite_latents
from .moss_audio_tokenizer_config import MossAudioTokenizerConfig, PatchSpec
from .moss_quantizer import ResidualQuantizer
from .moss_transformer import Patch, ProjectedTransformer, StageState


@dataclass
class EncodeOutput:
    codes: torch.Tensor  # (n_q, B, T) int64; frames past a row's length hold padding codes
    lengths: torch.Tensor  # (B,) valid frames = floor(samples / samples_per_frame)
    hidden: torch.Tensor  # (B, code_dim, T) encoder output = quantizer input


@dataclass
class DecodeOutput:
    audio: torch.Tensor  # (B, channels, T * samples_per_frame) float32
    lengths: torch.Tensor  # (B,) valid samples per channel


class MossAudioTokenizer(nn.Module):
    def __init__(self, config: MossAudioTokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.ModuleList(_stage(s, down=True) for s in config.encoder)
        self.quantizer = ResidualQuantizer(config.quantizer)
        self.decoder = nn.ModuleList(_stage(s, down=False) for s in config.decoder)
        self.sample_rate = config.sampling_rate
        self.channels = config.number_channels
        self.samples_per_frame = config.downsample_rate
        self.frame_rate = config.frame_rate
        self.num_quantizers = config.quantizer.num_quantizers
        self.codebook_size = config.quantizer.codebook_size

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "MossAudioTokenizer":
        """A checkpoint directory or hub id; dtype None = the config's compute dtype (fp32)."""
        from .moss_audio_tokenizer_loader import load_moss_audio_tokenizer

        return load_moss_audio_tokenizer(name_or_path, device, dtype)

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebooks.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    # ---------------------------------------------------------------- encode

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor, n_quantizers: int | None = None,
               chunk_duration: float | None = None) -> torch.Tensor:
        """One clip, (samples,) or (channels, samples) -> codes (n_q, frames), valid frames only."""
        clip = self._as_clip(wave)
        if chunk_duration is None:
            out = self.encode_padded(clip[None], None, n_quantizers)
        else:
            out = self.encode_chunked(clip, chunk_duration, n_quantizers)
        return out.codes[:, 0, : int(out.lengths[0])]

    @torch.inference_mode()
    def encode_batch(self, waves: list[torch.Tensor], n_quantizers: int | None = None) -> EncodeOutput:
        """Clips of different lengths, zero-padded on the right and encoded together."""
        if not waves:
            raise InvalidRequestError("encode_batch needs at least one clip")
        clips = [self._as_clip(w) for w in waves]
        lengths = torch.tensor([c.shape[-1] for c in clips], device=self.device)
        x = torch.zeros(len(clips), self.channels, int(lengths.max()), device=self.device)
        for i, c in enumerate(clips):
            x[i, :, : c.shape[-1]] = c
        return self.encode_padded(x, lengths, n_quantizers)

    @torch.inference_mode()
    def encode_padded(self, x: torch.Tensor, lengths: torch.Tensor | None = None,
                      n_quantizers: int | None = None) -> EncodeOutput:
        """x (B, channels, N) with valid sample counts `lengths` (default N)."""
        n_q = self.quantizers_to_use(n_quantizers, self.num_quantizers)
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise InvalidRequestError(f"expected audio (B, {self.channels}, samples), got {tuple(x.shape)}")
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[2], dtype=torch.long, device=x.device)
        h, h_lengths = self._to_stream(x.to(self.device), lengths.to(self.device))
        for stage in self.encoder:
            h, h_lengths = stage(h, h_lengths)
        finite_latents(h)
        return EncodeOutput(self.quantizer.encode(h, h_lengths, n_q), h_lengths, h.float())

    @torch.inference_mode()
    def encode_chunked(self, wave: torch.Tensor, chunk_duration: float,
                       n_quantizers: int | None = None) -> EncodeOutput:
        """The reference's `encode(x, chunk_duration=...)` (spec 5.7): pieces of chunk_duration,
        encoded in turn with ring-buffer attention state; valid frames only, B = 1."""
        clip = self._as_clip(wave)
        n_q = self.quantizers_to_use(n_quantizers, self.num_quantizers)
        piece = self._chunk_samples(chunk_duration)
        total = clip.shape[-1]
        if total <= piece:  # one piece: the offline path (its codes keep the partial frame)
            return self.encode_padded(clip[None], None, n_q)
        states = self.stream_states(self.encoder, 1, piece * (self.channels if self.config.interleaved else 1))
        codes, hidden = [], []
        for start in range(0, total, piece):
            x = clip[None, :, start: start + piece]
            n = torch.tensor([x.shape[-1]], device=self.device)
            h, h_len = self._to_stream(x, n)
            h, h_len = self._run_streaming(self.encoder, h, h_len, states, ring=True, all_real=True)
            finite_latents(h)
            frames = int(h_len[0])
            codes.append(self.quantizer.encode(h, h_len, n_q)[:, :, :frames])
            hidden.append(h[:, :, :frames].float())
        codes_t = torch.cat(codes, dim=2)
        return EncodeOutput(codes_t, torch.tensor([codes_t.shape[2]], device=self.device), torch.cat(hidden, dim=2))

    # ---------------------------------------------------------------- decode

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, n_quantizers: int | None = None,
               chunk_duration: float | None = None) -> torch.Tensor:
        """Codes (n_q, frames) of one clip -> audio (channels, frames * samples_per_frame)."""
        if codes.dim() != 2:
            raise InvalidRequestError(f"expected codes (n_quantizers, frames), got {tuple(codes.shape)}")
        if chunk_duration is not None:
            return self.decode_chunked(codes, chunk_duration, n_quantizers)
        return self.decode_padded(codes[:, None], None, n_quantizers).audio[0]

    @torch.inference_mode()
    def decode_batch(self, codes_list: list[torch.Tensor], n_quantizers: int | None = None) -> DecodeOutput:
        """Clips of different lengths (n_q_i, T_i). Without n_quantizers every n_q_i must agree;
        with it, each clip is cut to its first n_quantizers rows (spec 5.8)."""
        if not codes_list:
            raise InvalidRequestError("decode_batch needs at least one code tensor")
        if any(c.dim() != 2 or c.is_floating_point() for c in codes_list):
            raise InvalidRequestError("every clip's codes must be an integer tensor (quantizers, frames)")
        rows = {int(c.shape[0]) for c in codes_list}
        if not n_quantizers and len(rows) > 1:  # None or 0: all of each clip's rows, which must agree
            raise InvalidRequestError(f"clips have different quantizer counts {sorted(rows)}; pass n_quantizers")
        k = self.quantizers_to_use(n_quantizers, min(rows))
        lengths = torch.tensor([c.shape[1] for c in codes_list], device=self.device)
        codes = torch.zeros(k, len(codes_list), int(lengths.max()), dtype=torch.long, device=self.device)
        for i, c in enumerate(codes_list):
            codes[:, i, : c.shape[1]] = c[:k]
        return self.decode_padded(codes, lengths)

    @torch.inference_mode()
    def decode_padded(self, codes: torch.Tensor, lengths: torch.Tensor | None = None,
                      n_quantizers: int | None = None) -> DecodeOutput:
        """Codes (k, B, T), right-padded past `lengths` (padding is decoded, then ignored)."""
        codes = self._check_codes(codes, n_quantizers)
        B, T = codes.shape[1:]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=self.device)
        h, h_lengths = self.quantizer.decode(codes).to(self.dtype), lengths.to(self.device)
        for stage in self.decoder:
            h, h_lengths = stage(h, h_lengths)
        return DecodeOutput(*self._from_stream(h, h_lengths))

    @torch.inference_mode()
    def decode_chunked(self, codes: torch.Tensor, chunk_duration: float,
                       n_quantizers: int | None = None) -> torch.Tensor:
        """The reference's `decode(codes, chunk_duration=...)` (spec 5.7), ring-buffer windows."""
        codes = self._check_codes(codes[:, None], n_quantizers)
        frames = self._chunk_samples(chunk_duration) // self.samples_per_frame
        if codes.shape[2] <= frames:
            return self.decode_padded(codes).audio[0]
        states = self.stream_states(self.decoder, 1, frames)
        pieces = [self.decode_step(codes[:, :, s: s + frames], None, states, ring=True)[0]
                  for s in range(0, codes.shape[2], frames)]
        return torch.cat(pieces, dim=-1)

    def decode_step(self, codes: torch.Tensor, lengths: torch.Tensor | None,
                    states: dict[int, StageState], ring: bool = False) -> torch.Tensor:
        """One streaming step for a batch of rows: codes (k, B, T) right-padded past `lengths`;
        `states` (decoder stage index -> state of these rows, from `stream_states`) advance in place.
        Returns audio (B, channels, T * samples_per_frame), valid up to lengths."""
        B, T = codes.shape[1:]
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=codes.device)
        h = self.quantizer.decode(codes).to(self.dtype)
        h, h_lengths = self._run_streaming(self.decoder, h, lengths, states, ring)
        return self._from_stream(h, h_lengths)[0]

    def streaming_decoder(self, max_streams: int, max_chunk_frames: int, n_quantizers: int | None = None,
                          window: str = "exact"):
        """The multi-stream decoder of the engine (see moss_streaming.MossStreamingDecoder)."""
        from .moss_streaming import MossStreamingDecoder

        return MossStreamingDecoder(self, max_streams, max_chunk_frames, n_quantizers, window)

    # ---------------------------------------------------------------- helpers

    def stream_states(self, stages: nn.ModuleList, batch: int, max_input: int) -> dict[int, StageState]:
        """Fresh streaming state of every Transformer of `stages` (self.encoder or self.decoder)
        for chunks of at most `max_input` input steps (encoder: stream samples; decoder: frames)."""
        states, tokens = {}, max_input
        for i, stage in enumerate(stages):
            if isinstance(stage, Patch):
                tokens = tokens // stage.patch_size if stage.down else tokens * stage.patch_size
            else:
                states[i] = StageState.zeros(stage.spec, batch, tokens, self.device, self.dtype)
        return states

    def _run_streaming(self, stages: nn.ModuleList, h: torch.Tensor, lengths: torch.Tensor,
                       states: dict[int, StageState], ring: bool, all_real: bool = False):
        for i, stage in enumerate(stages):
            if isinstance(stage, Patch):
                h, lengths = stage(h, lengths)
            else:
                # all_real: the reference's chunked encode pushes a piece's zero padding too.
                h = stage.step(h, states[i], torch.full_like(lengths, h.shape[2]) if all_real else lengths, ring)
        return h, lengths

    def _to_stream(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, N) -> whole frames -> the encoder's input stream (B, 1, C*N') if interleaved."""
        x = F.pad(x, (0, -x.shape[-1] % self.samples_per_frame)).to(self.dtype)
        if self.config.interleaved:
            return x.transpose(1, 2).reshape(x.shape[0], 1, -1), lengths * self.channels
        return x, lengths

    def _from_stream(self, y: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.interleaved:
            return y.reshape(y.shape[0], -1, self.channels).transpose(1, 2).float(), lengths // self.channels
        return y.float(), lengths

    def _as_clip(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) or (channels, samples) -> (channels, samples) on the model's device."""
        if not torch.is_tensor(wave) or not wave.is_floating_point():
            raise InvalidRequestError("audio must be a floating-point tensor")
        if wave.dim() == 1 and self.channels == 1:
            wave = wave[None]
        if wave.dim() != 2 or wave.shape[0] != self.channels:
            want = "(samples,) or (1, samples)" if self.channels == 1 else f"({self.channels}, samples)"
            raise InvalidRequestError(f"expected audio {want}, got {tuple(wave.shape)}")
        if wave.shape[1] == 0:
            raise InvalidRequestError("audio is empty")
        return finite_audio(wave.to(self.device, torch.float32))

    def quantizers_to_use(self, n: int | None, available: int) -> int:
        """n checked against the quantizers available; None or 0 = all of them."""
        if n is None or n == 0:  # 0 means "all" in the reference too
            return available
        if not 1 <= n <= available:
            raise InvalidRequestError(f"n_quantizers must be in 1..{available}, got {n}")
        return n

    def _check_codes(self, codes: torch.Tensor, n_quantizers: int | None) -> torch.Tensor:
        if codes.dim() != 3 or codes.shape[0] > self.num_quantizers or 0 in codes.shape:
            raise InvalidRequestError(f"expected codes (<= {self.num_quantizers} quantizers, batch, frames), "
                                      f"got {tuple(codes.shape)}")
        if codes.is_floating_point():
            raise InvalidRequestError("codes must be integers")
        codes = codes[: self.quantizers_to_use(n_quantizers, codes.shape[0])].to(self.device, torch.long)
        if bool(((codes < 0) | (codes >= self.codebook_size)).any()):
            raise InvalidRequestError(f"codes must lie in [0, {self.codebook_size})")
        return codes

    def _chunk_samples(self, chunk_duration: float) -> int:
        """Samples per channel of one chunk; the reference's validation rules (spec 5.7)."""
        if not 0 < chunk_duration <= self.config.context_duration:
            raise InvalidRequestError(f"chunk_duration must be in (0, {self.config.context_duration}] s, "
                                      f"got {chunk_duration}")
        samples = int(round(chunk_duration * self.sample_rate))
        if samples <= 0 or samples % self.samples_per_frame:
            raise InvalidRequestError(f"chunk_duration {chunk_duration} s is not a whole number of "
                                      f"{self.samples_per_frame}-sample frames")
        return samples


def _stage(spec, down: bool) -> nn.Module:
    return Patch(spec.patch_size, down) if isinstance(spec, PatchSpec) else ProjectedTransformer(spec)
