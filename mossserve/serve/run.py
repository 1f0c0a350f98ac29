"""`mossserve serve`: load the model, then answer HTTP on one uvicorn worker (one engine per process)."""
from __future__ import annotations

import sys

import uvicorn

from .app import create_app
from .settings import ServerSettings


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app as shutting down the moment a signal asks it to stop: while
    open requests drain (up to `--shutdown-timeout`), new requests on connections already open are
    refused with 503 (uvicorn closes the listening socket at once, and ends the app only after the drain)."""

    def handle_exit(self, sig: int, frame) -> None:
        self.config.app.state.server.closing = True
        super().handle_exit(sig, frame)


def serve(settings: ServerSettings, log_level: str, shutdown_timeout_s: float) -> None:
    app = create_app(settings)  # loads the model first: a bad --model fails before the port opens
    server = DrainingServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                                           timeout_graceful_shutdown=shutdown_timeout_s))
    server.run()
    if not server.started:  # the port could not be bound (uvicorn.run's own rule)
        sys.exit(3)
