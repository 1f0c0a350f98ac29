"""Audio in and out: read any file, resample, write or stream wav/pcm/flac/mp3/opus."""

from mossserve.audio.formats import EXTENSIONS, FORMATS, MEDIA_TYPES, RATES, format_from_path, output_rate
from mossserve.audio.load import load_audio
from mossserve.audio.read import read_audio
from mossserve.audio.resample import resample
from mossserve.audio.stream import StreamEncoder
from mossserve.audio.write import encode_audio, write_audio

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "MEDIA_TYPES",
    "RATES",
    "StreamEncoder",
    "encode_audio",
    "format_from_path",
    "load_audio",
    "output_rate",
    "read_audio",
    "resample",
    "write_audio",
]
