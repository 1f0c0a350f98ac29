"""Streaming writers: bytes to send as soon as each chunk of audio is generated."""

import struct

import numpy as np

from mossserve.audio.av_encoder import AVEncoder
from mossserve.audio.formats import check_format, output_rate
from mossserve.audio.samples import as_channels_first, to_s16

_UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF and data sizes of a wav whose length is not known yet


def streaming_wav_header(sample_rate: int, channels: int) -> bytes:
    """A 16-bit PCM wav header whose sizes say "until the end of the data".

    0xFFFFFFFF is what FFmpeg writes to a pipe; soundfile, FFmpeg and Python's wave module read
    the data that follows up to its real end.
    """
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    return (
        b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", _UNKNOWN_SIZE)
    )


class StreamEncoder:
    """Encode audio chunk by chunk; the concatenation of every write() and close() is one file.

    `sample_rate` here is the rate of the chunks; `self.sample_rate` is the rate of the output
    (they differ only where the format cannot store the input rate, see formats.RATES).
    wav and pcm bytes equal encode_audio's samples exactly; flac is lossless; mp3, opus and aac
    emit frames/pages as they complete.
    """

    def __init__(self, format: str, sample_rate: int, channels: int = 1):
        self.format = check_format(format)
        self.channels = channels
        self.sample_rate = output_rate(self.format, sample_rate)
        self._encoder = None
        self._pending = b""
        if self.format in ("mp3", "opus", "flac", "aac"):
            self._encoder = AVEncoder(self.format, sample_rate, channels)
        elif self.format == "wav":
            self._pending = streaming_wav_header(sample_rate, channels)

    def write(self, chunk: np.ndarray) -> bytes:
        """Encode `(channels, n)` or `(n,)` float32; return what can be sent now (may be b"")."""
        if self._encoder is not None:
            return self._encoder.write(chunk)
        x = as_channels_first(chunk)
        if x.shape[0] != self.channels:
            raise ValueError(f"expected {self.channels}-channel audio, got shape {x.shape}")
        data, self._pending = self._pending + to_s16(x).T.astype("<i2").tobytes(), b""
        return data

    @property
    def audio_out(self) -> bool:
        """Whether the bytes written so far hold audio, not only a container's headers."""
        return self._encoder is None or self._encoder.audio_out

    def close(self) -> bytes:
        """The tail of the file (the wav header too, when nothing was written)."""
        if self._encoder is not None:
            return self._encoder.close()
        data, self._pending = self._pending, b""
        return data
