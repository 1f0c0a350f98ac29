"""mp3, ogg/opus, flac and aac through FFmpeg (PyAV), chunk by chunk.

The muxer writes into a pipe-like object that hands its bytes out after every chunk. A pipe is
unseekable, so FFmpeg writes a streamable file: mp3 without the Xing/LAME header (decoders then keep
the encoder delay, about 1,100 samples, and the last frame's padding), flac with an unknown length
in STREAMINFO (FFmpeg reads it; libsndfile cannot), and one 20 ms opus packet per ogg page: FFmpeg's
ogg muxer holds the newest page back until the next (so it can flag the last one), and small pages
keep that to 20 ms at a cost of about 11 kbit/s of page headers. Given a seekable buffer instead
(whole files), FFmpeg goes back at the end and fills the headers in: gapless mp3 of the exact
length, flac with its length; whole opus files keep FFmpeg's default one-second pages. aac is ADTS
(OpenAI's `aac`): self-contained frames, the same bytes streamed or whole, with no place for the
encoder's 1024-sample priming, which decoders therefore keep.

Audio with no samples is written as one sample of silence: an mp3 or ogg/opus file without a single
packet is one FFmpeg and browsers refuse to open. An aac stream is padded with silence to at least
1025 samples (43 ms at 24 kHz): FFmpeg recognises raw ADTS by three frames in a row, and with the
encoder's 1024-sample priming, fewer samples make two frames, which it often takes for another
format and refuses.

What stays inside the encoders between writes: under 20 ms for opus (plus the page above), one
flac block (1152 samples when streamed, 26 ms at 44.1 kHz: FFmpeg's default block, 4608 samples at
44.1 kHz, was more than a first chunk of two Fish frames, which then sent only the header), and about
3000 samples inside LAME for mp3 (0.13 s at 24 kHz).
"""

import io
from fractions import Fraction

import av
import numpy as np

from mossserve.audio.formats import output_rate
from mossserve.audio.resampler import StreamResampler
from mossserve.audio.samples import as_channels_first, clip, to_s16
from mossserve.errors import AudioError

# container, encoder, the sample format it is fed, bit rate per channel (None: lossless)
_CODECS = {
    "mp3": ("mp3", "libmp3lame", "fltp", 64_000),
    "opus": ("ogg", "libopus", "flt", 48_000),
    "flac": ("flac", "flac", "s16", None),
    "aac": ("adts", "aac", "fltp", 64_000),
}
_LAYOUTS = {1: "mono", 2: "stereo"}
_AAC_MIN_SAMPLES = 1025  # with the encoder's 1024 samples of priming: three ADTS frames
_FLAC_STREAM_BLOCK = 1152  # samples per flac block of a stream (see above)


class _Pipe:
    """A write-only, unseekable file whose contents are taken out as they arrive."""

    def __init__(self):
        self._buffer = bytearray()
        self.written = 0  # bytes ever written

    def write(self, data) -> int:
        self._buffer += data
        self.written += len(data)
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class AVEncoder:
    """Encode float32 chunks at `sample_rate` to `format` ("mp3", "opus", "flac" or "aac")."""

    def __init__(self, format: str, sample_rate: int, channels: int, seekable: bool = False):
        if channels not in _LAYOUTS:
            raise AudioError(f"{format} output supports 1 or 2 channels, not {channels}")
        container_format, codec, self._sample_format, bit_rate = _CODECS[format]
        self.channels = channels
        self._min_samples = _AAC_MIN_SAMPLES if format == "aac" else 1
        self.sample_rate = output_rate(format, sample_rate)
        self._resample = None
        if self.sample_rate != sample_rate:
            self._resample = StreamResampler(sample_rate, self.sample_rate, channels)
        self._out = io.BytesIO() if seekable else _Pipe()
        options = {"flush_packets": "1"}
        if format == "flac":
            options["metadata_header_padding"] = "0"
        if format == "opus" and not seekable:
            options["page_duration"] = "20000"  # µs: one 20 ms packet per page
        self._container = av.open(self._out, mode="w", format=container_format, container_options=options)
        codec_options = {"frame_size": str(_FLAC_STREAM_BLOCK)} if format == "flac" and not seekable else None
        self._stream = self._container.add_stream(codec, rate=self.sample_rate, layout=_LAYOUTS[channels],
                                                  options=codec_options)
        self._stream.codec_context.format = self._sample_format
        if bit_rate:
            self._stream.codec_context.bit_rate = bit_rate * channels
        self._container.start_encoding()  # headers now, so even an empty stream is a valid file
        self._pts = 0
        self._header_bytes = self._written()

    def write(self, chunk: np.ndarray) -> bytes:
        """Encode `(channels, n)` or `(n,)`; return the bytes the muxer has written so far."""
        x = as_channels_first(chunk)
        if x.shape[0] != self.channels:
            raise ValueError(f"expected {self.channels}-channel audio, got shape {x.shape}")
        if self._resample is not None:
            x = self._resample(x)
        self._encode(x)
        return self._take()

    @property
    def audio_out(self) -> bool:
        """Whether the muxer has written more than the container's headers: an audio packet it has been
        given may still be held (ogg keeps its newest page back), so packets are not counted."""
        return self._written() > self._header_bytes

    def close(self) -> bytes:
        """Flush the resampler, the encoder and the muxer; return the rest of the file."""
        if self._resample is not None:
            self._encode(self._resample(np.zeros((self.channels, 0), np.float32), last=True))
        if self._pts < self._min_samples:  # players refuse an mp3 or ogg without a packet, a too short aac
            self._encode(np.zeros((self.channels, self._min_samples - self._pts), np.float32))
        self._mux(self._stream.encode(None))
        self._container.close()
        if isinstance(self._out, io.BytesIO):
            return self._out.getvalue()
        return self._out.take()

    def _encode(self, x: np.ndarray) -> None:
        if x.shape[1] == 0:
            return
        x = to_s16(x) if self._sample_format == "s16" else clip(x)
        if not self._sample_format.endswith("p"):  # packed formats interleave the channels
            x = x.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(x), format=self._sample_format, layout=_LAYOUTS[self.channels]
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.sample_rate)
        self._pts += frame.samples
        self._mux(self._stream.encode(frame))

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _written(self) -> int:
        return self._out.tell() if isinstance(self._out, io.BytesIO) else self._out.written

    def _take(self) -> bytes:
        # A seekable buffer is only read at close: the muxer may still go back and patch headers.
        return b"" if isinstance(self._out, io.BytesIO) else self._out.take()
