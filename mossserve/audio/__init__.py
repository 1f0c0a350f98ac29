"""Audio in and out: read any file, resample, write or stream wav/pcm/flac/mp3/opus/aac.

The names load on first use (see mossserve.lazy): `mossserve.audio.formats` is imported by the
CLI's parser, which should not pay for PyAV and soxr.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mossserve.lazy import lazy_exports

_HOMES = {
    "EXTENSIONS": "formats", "FORMATS": "formats", "MEDIA_TYPES": "formats", "RATES": "formats",
    "format_from_path": "formats", "output_rate": "formats",
    "load_audio": "load",
    "read_audio": "read",
    "resample": "resampler",
    "StreamEncoder": "stream",
    "change_tempo": "tempo", "TempoChange": "tempo",
    "encode_audio": "write", "write_audio": "write",
}

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "MEDIA_TYPES",
    "RATES",
    "StreamEncoder",
    "TempoChange",
    "change_tempo",
    "encode_audio",
    "format_from_path",
    "load_audio",
    "output_rate",
    "read_audio",
    "resample",
    "write_audio",
]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)

if TYPE_CHECKING:
    from mossserve.audio.formats import EXTENSIONS, FORMATS, MEDIA_TYPES, RATES, format_from_path, output_rate
    from mossserve.audio.load import load_audio
    from mossserve.audio.read import read_audio
    from mossserve.audio.resampler import resample
    from mossserve.audio.stream import StreamEncoder
    from mossserve.audio.tempo import TempoChange, change_tempo
    from mossserve.audio.write import encode_audio, write_audio
