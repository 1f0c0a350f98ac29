"""The codec seam: what the engine, the CLI and the Python API need from any codec.

A codec turns audio into codes and back, and gives the engine a streaming decoder that keeps
per-stream state, so that decoding a stream in chunks (batched with other streams that join and
leave at any call) equals decoding it at once. Shapes follow the codec's own layout: codes are
(n_quantizers, frames); audio is (channels, samples) float32 at `sample_rate`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ...errors import InvalidRequestError


@runtime_checkable
class StreamingDecoder(Protocol):
    max_streams: int
    max_chunk_frames: int

    def open(self) -> int:
        """Start a stream; returns its id."""

    def close(self, stream_id: int) -> None:
        """End a stream and free its state."""

    @property
    def num_open(self) -> int:
        """Streams open now."""

    def decode(self, stream_ids: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Next chunk (n_q, t_i) of each listed stream (t_i may differ) -> audio
        (channels, t_i * samples_per_frame) each. Streams not listed are untouched; a call that raises
        leaves every stream as it was, so the engine can retry its chunks one at a time."""


@runtime_checkable
class Codec(Protocol):
    sample_rate: int
    channels: int
    samples_per_frame: int  # per channel
    frame_rate: float
    num_quantizers: int
    codebook_size: int

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "Codec":
        """A checkpoint directory, or a Hugging Face hub id fetched when it is not one."""

    def encode(self, wave: torch.Tensor, n_quantizers: int | None = None) -> torch.Tensor:
        """(samples,) or (channels, samples) at sample_rate -> codes (n_q, frames)."""

    def decode(self, codes: torch.Tensor, n_quantizers: int | None = None) -> torch.Tensor:
        """Codes (n_q, frames) -> audio (channels, frames * samples_per_frame)."""

    def streaming_decoder(self, max_streams: int, max_chunk_frames: int,
                          n_quantizers: int | None = None) -> StreamingDecoder:
        """A multi-stream decoder for at most max_streams streams and chunks of max_chunk_frames."""


def finite_latents(latents: torch.Tensor) -> torch.Tensor:
    """`latents` itself, or a clear error: an encoder that overflowed (finite samples far outside
    [-1, 1]) gives NaN, which the quantizer turns into codes of 0 without complaint."""
    if not bool(torch.isfinite(latents).all()):
        raise InvalidRequestError("the codec's encoder overflowed on this audio: its samples lie far outside "
                                  "[-1, 1] (a damaged float file?)")
    return latents


def finite_audio(wave: torch.Tensor) -> torch.Tensor:
    """`wave` itself, or a clear error: an encoder turns NaN or infinite samples into codes
    without complaint (the same check as load_audio's, for audio that did not come through it)."""
    if not bool(torch.isfinite(wave).all()):
        raise InvalidRequestError("audio contains invalid samples (NaN or infinity)")
    return wave
