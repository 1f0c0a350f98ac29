"""Whole audio files: wav, pcm, flac, mp3, opus, aac (and .npy for files)."""

import io
import numbers
from os import PathLike

import numpy as np
import soundfile as sf

from mossserve.audio.av_encoder import AVEncoder
from mossserve.audio.formats import check_format, format_from_path
from mossserve.audio.samples import as_channels_first, to_s16
from mossserve.errors import AudioError
from mossserve.whole_file import whole_file


def encode_audio(samples: np.ndarray, sample_rate: int, format: str, wav_float: bool = False) -> bytes:
    """The bytes of a whole file in `format` (one of FORMATS).

    wav is 16-bit PCM (`wav_float=True`: 32-bit float, unclipped); pcm is raw s16le, channels
    interleaved; flac is 16-bit. mp3, opus and aac may be written at another rate than `sample_rate`
    (see formats.RATES). Integer formats clip to [-1, 1] and round. No samples give a wav or pcm of
    none and a flac, mp3 or opus of one silent sample: those formats have no file without a frame.
    aac is padded with silence to 1025 samples (three ADTS frames, what FFmpeg needs to know it).
    """
    format = check_format(format)
    sample_rate = check_rate(sample_rate)
    x = as_channels_first(samples)
    if format == "pcm":
        return to_s16(x).T.astype("<i2").tobytes()
    if format == "flac" and x.shape[1] == 0:
        x = np.zeros((x.shape[0], 1), np.float32)  # libsndfile writes no header for no samples
    if format in ("wav", "flac"):
        buffer = io.BytesIO()
        if format == "wav" and wav_float:
            sf.write(buffer, x.T, sample_rate, format="WAV", subtype="FLOAT")
        else:
            sf.write(buffer, to_s16(x).T, sample_rate, format=format.upper(), subtype="PCM_16")
        return buffer.getvalue()
    encoder = AVEncoder(format, sample_rate, x.shape[0], seekable=True)
    encoder.write(x)
    return encoder.close()


def check_rate(sample_rate: object) -> int:
    """A positive whole number of Hz (24000.0 too: soundfile and FFmpeg take only ints)."""
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, numbers.Real) or (
            not float(sample_rate).is_integer() or sample_rate < 1):
        raise AudioError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    return int(sample_rate)


def write_audio(
    path: str | PathLike, samples: np.ndarray, sample_rate: int, format: str | None = None, wav_float: bool = False
) -> None:
    """Write a file, whole or not at all (`whole_file`); the format comes from the extension unless given.

    `.npy` holds the raw float32 samples, unclipped: `(n,)` for mono, `(channels, n)` otherwise.
    """
    format = format_from_path(path) if format is None else format.lower().lstrip(".")
    if format == "npy":
        x = as_channels_first(samples)
        with whole_file(path) as f:
            np.save(f, x[0] if x.shape[0] == 1 else x)
        return
    data = encode_audio(samples, sample_rate, format, wav_float=wav_float)
    with whole_file(path) as f:
        f.write(data)
