"""The web playground: static files shipped in the package, served at `/` (docs/playground.md).

The page is a client of the public API like any other (it calls /v1/models, /v1/audio/speech,
/v1/audio/voices and ws /v1/realtime/speech), so this module only serves files; what the page
needs to know about the loaded model comes from `model_capabilities` in /v1/models.
"""
from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

from ..api import TTS
from ..text.delay_requests import TASK_FIELDS
from .schemas import body_fields

PLAYGROUND_DIR = Path(__file__).parent / "playground"
NO_CACHE = {"Cache-Control": "no-cache"}


class RevalidatedFiles(StaticFiles):
    """Static files a browser revalidates on every load: without it, it runs modules cached before an
    upgrade (heuristic freshness) with the new index.html."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(NO_CACHE)
        return response


def mount_playground(app: FastAPI) -> None:
    """The page at `/`, its scripts and styles under `/playground/`."""
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html", headers=NO_CACHE)

    app.mount("/playground", RevalidatedFiles(directory=PLAYGROUND_DIR), name="playground")


def model_capabilities(tts: TTS) -> dict:
    """What a client needs to offer the right options: the family (delay, local, realtime, fish), its
    default task and the body fields that task reads (the Delay prompt builder's own table in the
    API's names, so the page cannot offer a field the task refuses), whether it has realtime
    sessions, and the audio it returns."""
    talker = tts.talker
    task = getattr(talker, "default_task", None)
    return {"family": talker.name, "task": task,
            "task_fields": body_fields(TASK_FIELDS[task]) if task else None, "sessions": talker.supports_sessions,
            "codebooks": talker.codebooks, "sample_rate": tts.codec.sample_rate, "channels": tts.codec.channels}
