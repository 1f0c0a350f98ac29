"""What every route shares: the engine, the voice store, the metrics and the settings."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from ..api import TTS
from ..engine.async_engine import AsyncEngine
from ..errors import EngineClosedError
from ..models.registry import checkpoint_name
from .metrics import Metrics
from .references import VoiceResolver
from .settings import ServerSettings
from .voices import VoiceStore

DEMO_MODEL_NAME = "moss-tts-demo"
# Model ids OpenAI clients send, with or without a snapshot's date or number (gpt-4o-mini-tts-2025-03-20,
# tts-1-1106); they mean the loaded model, so unmodified clients work.
OPENAI_MODELS = re.compile(r"(tts-1|tts-1-hd|gpt-4o-mini-tts)(-[0-9]+)*")


@dataclass
class ServerState:
    settings: ServerSettings
    tts: TTS
    engine: AsyncEngine
    voices: VoiceStore
    metrics: Metrics
    resolver: VoiceResolver
    model_name: str
    owns_tts: bool
    closing: bool = False

    @classmethod
    def create(cls, settings: ServerSettings, tts: TTS | None = None, voices: VoiceStore | None = None) -> ServerState:
        """Open the voice library (a damaged one is reported before minutes of model loading), load
        the model (unless given one) and bring up the codec, speaker cache and engine now, so the first
        request pays for none of it."""
        voices = VoiceStore(Path(settings.data_dir)) if voices is None else voices
        owns_tts = tts is None
        if tts is None:
            tts = TTS.from_pretrained(settings.model, settings.codec, device=settings.device, dtype=settings.dtype,
                                      engine_config=settings.engine, task=settings.task)
        tts.speakers.max_seconds = settings.max_voice_seconds
        tts.engine  # noqa: B018 - starts the engine threads
        engine = AsyncEngine(tts)
        talker = tts.talker
        resolver = VoiceResolver(voices, engine, voice_codes_id(tts), talker.codebooks,
                                 talker.voice_needs_transcript, settings.max_voice_seconds, talker.check_transcript,
                                 settings.max_input_chars,
                                 dialogue=getattr(talker, "default_task", None) == "dialogue")
        metrics = Metrics(functools.partial(stats_while_open, tts))
        return cls(settings, tts, engine, voices, metrics, resolver, served_name(settings, tts), owns_tts)

    def accepts_model(self, name: str | None) -> bool:
        return name is None or name == self.model_name or OPENAI_MODELS.fullmatch(name) is not None

    def close(self) -> None:
        self.closing = True
        self.voices.close()
        if self.owns_tts:
            self.tts.close()


def voice_codes_id(tts: TTS) -> str:
    """What a stored voice's codes depend on, which servers sharing a data directory must agree on to
    share them: the codec, the codebooks kept, and whether the reference was brought to -20 dBFS
    first (the MOSS-TTS processors do; the Realtime and Fish references do not)."""
    raw = "" if tts.talker.normalizes_reference_loudness else "+unnormalized"
    return f"{tts.codec_source}@{tts.talker.codebooks}{raw}"


def served_name(settings: ServerSettings, tts: TTS) -> str:
    """`--model-name`, else the model's hub id (without an @revision), else the checkpoint the model was
    loaded from as the registry names it (a snapshot in the hub's cache: its repository)."""
    if settings.model_name:
        return settings.model_name
    if tts.is_demo:
        return DEMO_MODEL_NAME
    if settings.model is not None and not Path(settings.model).expanduser().is_dir():  # loaded, so a hub id
        return str(settings.model).split("@")[0]
    source = tts.talker.source
    return tts.talker.name if source is None else checkpoint_name(source, source)


def stats_while_open(tts: TTS) -> dict | None:
    """The engine's figures for the metrics, None once it is closed (no metrics then)."""
    try:
        return tts.stats()
    except EngineClosedError:
        return None
