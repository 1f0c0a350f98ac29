"""`mossserve serve`: load the model, then answer HTTP on one uvicorn worker (one engine per process)."""
from __future__ import annotations

from .app import create_app
from .settings import ServerSettings


def serve(settings: ServerSettings, log_level: str = "info") -> None:
    import uvicorn

    app = create_app(settings)  # loads the model first: a bad --model fails before the port opens
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5)
