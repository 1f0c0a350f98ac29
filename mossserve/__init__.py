"""mossserve: inference and serving for the MOSS-TTS family and Fish Audio S2 Pro.

The public names load on first use (PEP 562), so `mossserve --help`, argument errors and Ctrl-C
during start-up answer at once instead of after torch has imported.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_HOMES = {
    "TTS": "api", "Audio": "api",
    "ChunkSchedule": "config", "EngineConfig": "config", "RunawayGuard": "config",
    "AsyncEngine": "engine.async_engine", "RequestStream": "engine.async_engine",
    "AudioChunk": "engine.request", "Generation": "engine.request",
    "Prompt": "models.family",
    "AudioError": "errors", "CheckpointError": "errors", "EngineClosedError": "errors", "EngineFullError": "errors",
    "InvalidRequestError": "errors", "MossServeError": "errors", "RequestAborted": "errors", "SessionLimitError": "errors",
    "SamplingParams": "sampling",
    "Speaker": "speech_request", "SpeechRequest": "speech_request",
    "SessionScript": "text.realtime_session",
}

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
    "Prompt",
    "RequestAborted",
    "RequestStream",
    "RunawayGuard",
    "SamplingParams",
    "SessionLimitError",
    "SessionScript",
    "Speaker",
    "SpeechRequest",
    "TTS",
]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)

if TYPE_CHECKING:
    from .api import TTS, Audio
    from .config import ChunkSchedule, EngineConfig, RunawayGuard
    from .engine.async_engine import AsyncEngine, RequestStream
    from .engine.request import AudioChunk, Generation
    from .errors import (AudioError, CheckpointError, EngineClosedError, EngineFullError, InvalidRequestError,
                         MossServeError, RequestAborted, SessionLimitError)
    from .models.family import Prompt
    from .sampling import SamplingParams
    from .speech_request import Speaker, SpeechRequest
    from .text.realtime_session import SessionScript
