"""The web playground: static files shipped in the package, served at `/` (docs/playground.md).

The page is a client of the public API like any other (it calls /v1/models, /v1/audio/speech,
/v1/audio/voices and ws /v1/realtime/speech), so this module only serves files; what the page
needs to know about the loaded model comes from `model_capabilities` in /v1/models.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..api import TTS

PLAYGROUND_DIR = Path(__file__).parent / "playground"


def mount_playground(app: FastAPI) -> None:
    """The page at `/`, its scripts and styles under `/playground/`."""
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")


def model_capabilities(tts: TTS) -> dict:
    """What a client needs to offer the right options: the family (delay, local, realtime, fish), its
    default task, whether it has realtime sessions, and the audio it returns."""
    talker = tts.talker
    return {"family": talker.name,
            "task": getattr(talker, "default_task", None), "sessions": talker.supports_sessions,
            "codebooks": talker.codebooks, "sample_rate": tts.codec.sample_rate, "channels": tts.codec.channels}
