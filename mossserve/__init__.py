"""mossserve: inference and serving for the MOSS-TTS family and Fish Audio S2 Pro."""
from .api import TTS, Audio
from .errors import AudioError, CheckpointError, InvalidRequestError, MossServeError
from .sampling import SamplingParams
from .speech_request import Speaker, SpeechRequest

__all__ = [
    "Audio",
    "TTS",
    "AudioError",
    "CheckpointError",
    "InvalidRequestError",
    "MossServeError",
    "SamplingParams",
    "Speaker",
    "SpeechRequest",
]
