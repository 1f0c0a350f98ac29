"""mossserve: inference and serving for the MOSS-TTS family and Fish Audio S2 Pro."""
__version__ = "0.1.0"

from .api import TTS, Audio
from .config import ChunkSchedule, EngineConfig, RunawayGuard
from .engine.async_engine import AsyncEngine, RequestStream
from .engine.request import AudioChunk, Generation
from .errors import (AudioError, CheckpointError, EngineClosedError, EngineFullError, InvalidRequestError,
                     MossServeError, RequestAborted)
from .sampling import SamplingParams
from .speech_request import Speaker, SpeechRequest

__all__ = [
    "AsyncEngine",
    "Audio",
    "AudioChunk",
    "AudioError",
    "CheckpointError",
    "ChunkSchedule",
    "EngineClosedError",
    "EngineConfig",
    "EngineFullError",
    "Generation",
    "InvalidRequestError",
    "MossServeError",
    "RequestAborted",
    "RequestStream",
    "RunawayGuard",
    "SamplingParams",
    "Speaker",
    "SpeechRequest",
    "TTS",
]
