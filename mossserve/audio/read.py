"""Decode audio files: libsndfile (soundfile) first, FFmpeg (PyAV) for everything else."""

import io
from os import PathLike
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import soundfile as sf

from mossserve.errors import AudioError

AudioSource = str | PathLike | bytes | bytearray | memoryview | BinaryIO

# libsndfile reports this many frames when a stream does not say its length (a streamed FLAC).
_UNKNOWN_LENGTH = 2**62


class _NotForLibsndfile(Exception):
    """libsndfile cannot read this stream; FFmpeg should."""


class _NoAudioStream(Exception):
    """FFmpeg opened the file, and it holds no audio (a picture, subtitles)."""


def read_audio(source: AudioSource, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode a whole file to float32 `(channels, n)` and its sample rate, as stored.

    `source` is a path, the file's bytes, or a binary file object. wav, flac, ogg (vorbis, opus)
    and mp3 go through libsndfile (so mp3 sample counts are mpg123's); m4a/aac and anything else
    FFmpeg knows go through PyAV. `max_seconds` stops decoding as soon as the audio is known to
    be longer, so a long file costs no more than the limit.
    """
    label, data = _open(source)
    try:
        return _read_soundfile(data if isinstance(data, str) else io.BytesIO(data), max_seconds)
    except (sf.LibsndfileError, _NotForLibsndfile):
        pass
    try:
        return _read_av(data if isinstance(data, str) else io.BytesIO(data), max_seconds)
    except _NoAudioStream:
        raise AudioError(f"{label} holds no audio stream") from None
    except av.FFmpegError as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise AudioError(
            f"cannot decode {label}: not a supported audio format, or the file is damaged ({reason})"
        ) from None


def _open(source: AudioSource) -> tuple[str, str | bytes]:
    """A label for messages and either a path string or the bytes."""
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"audio file not found: {str(source)!r}")
        if not path.is_file():
            raise AudioError(f"{str(source)!r} is not a regular file (a directory, device or pipe)")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file {str(source)!r} is empty (0 bytes)")
        return f"audio file {str(source)!r}", str(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError("read_audio needs a binary file object (opened with 'rb')")
    else:
        raise TypeError(f"read_audio takes a path, bytes or a binary file object, not {type(source).__name__}")
    if not data:
        raise AudioError("audio data is empty (0 bytes)")
    return "the audio data", data


def _check_length(frames: int, sample_rate: int, max_seconds: float | None) -> None:
    if max_seconds is not None and frames > max_seconds * sample_rate:
        raise AudioError(
            f"audio is too long: {frames / sample_rate:.1f} s or more, the limit is {max_seconds:g} s"
        )


def _read_soundfile(file: str | BinaryIO, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(file) as f:
        if f.frames >= _UNKNOWN_LENGTH:
            raise _NotForLibsndfile
        _check_length(f.frames, f.samplerate, max_seconds)
        x = f.read(dtype="float32", always_2d=True)
        return np.ascontiguousarray(x.T), f.samplerate


def _read_av(file: str | BinaryIO, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with av.open(file, mode="r") as container:
        if not container.streams.audio:
            raise _NoAudioStream
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # any sample format → planar float32
        chunks, frames, rate = [], 0, stream.rate
        for frame in container.decode(stream):
            for out in to_float.resample(frame):  # keeps the first frame's rate and layout
                chunks.append(out.to_ndarray())
                frames, rate = frames + out.samples, out.sample_rate
            _check_length(frames, rate, max_seconds)
        chunks += [out.to_ndarray() for out in to_float.resample(None)]
    if not chunks:
        return np.zeros((stream.channels, 0), np.float32), rate
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate
