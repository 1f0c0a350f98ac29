"""The formats mossserve writes, their media types, and the sample rates each can store."""

from os import PathLike
from pathlib import Path

from mossserve.errors import AudioError

FORMATS = ("wav", "pcm", "flac", "mp3", "opus", "aac")

MEDIA_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}

# The rates mp3 (MPEG-1/2/2.5 layer III), opus and aac (MPEG-4 AAC-LC) can store. Any other rate is resampled to the
# lowest listed rate at or above it (the highest when none is), so no content is lost:
# 44.1 kHz opus becomes 48 kHz, 96 kHz mp3 becomes 48 kHz. wav, pcm and flac keep any rate.
RATES = {
    "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    "opus": (8000, 12000, 16000, 24000, 48000),
    "aac": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000),
}

EXTENSIONS = {
    ".wav": "wav",
    ".pcm": "pcm",
    ".raw": "pcm",
    ".flac": "flac",
    ".mp3": "mp3",
    ".opus": "opus",
    ".ogg": "opus",
    ".aac": "aac",
    ".npy": "npy",
}


def check_format(format: str) -> str:
    """The canonical name of an output format, or an AudioError that lists the supported ones."""
    name = format.lower().lstrip(".")
    if name not in FORMATS:
        raise AudioError(f"unknown audio format {format!r}; supported formats: {', '.join(FORMATS)}")
    return name


def output_rate(format: str, sample_rate: int) -> int:
    """The rate `format` is written at when given audio at `sample_rate` (see RATES)."""
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    rates = RATES.get(format)
    if rates is None or sample_rate in rates:
        return sample_rate
    return next((rate for rate in rates if rate >= sample_rate), rates[-1])


def format_from_path(path: str | PathLike) -> str:
    """The format a file name asks for, from its extension (`.npy` included)."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise AudioError(
            f"cannot tell the audio format of {str(path)!r} from its extension; "
            f"use one of {', '.join(EXTENSIONS)}"
        )
    return EXTENSIONS[suffix]
