"""`mossserve serve`: load the model, then answer HTTP on one uvicorn worker (one engine per process)."""
from __future__ import annotations

import copy
import logging.config
import math
import socket
import sys

import uvicorn

from ..errors import MossServeError
from .app import create_app
from .settings import ServerSettings

WS_JSON_SLACK_BYTES = 64 * 1024  # a realtime message's JSON around its base64 audio (a data URL's prefix, settings)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app as shutting down the moment a signal asks it to stop: while
    open requests drain (up to `--shutdown-timeout`), new requests on connections already open are
    refused with 503 (uvicorn closes the listening socket at once, and ends the app only after the drain)."""

    def handle_exit(self, sig: int, frame) -> None:
        self.config.app.state.server.closing = True
        super().handle_exit(sig, frame)


def log_config(log_level: str) -> dict:
    """uvicorn's logging set-up plus the `mossserve` logger (failed requests, cut streams, a dead
    engine), in uvicorn's format and at `--log-level`."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["mossserve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return config


def check_can_listen(host: str, port: int) -> None:
    """Bind the address as uvicorn will, and let it go: a port already taken (or a host this machine
    does not have) is reported before the model loads, which takes minutes for a large one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # uvicorn's choice
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closing port is free
            probe.bind((host, port))
    except OSError as e:
        raise MossServeError(f"cannot listen on {host}:{port}: {e.strerror or e} (--host, --port)") from None


def ws_max_size(max_body_bytes: int) -> int:
    """The largest websocket message: a realtime session.update or turn.start carries its audio as
    base64 (4 characters per 3 bytes) in JSON, so audio as large as the body limit lets an upload be
    fits in one message (uvicorn's default, 16 MiB, closed the socket with 1009 on a voice that
    POST /v1/audio/voices takes)."""
    return 4 * math.ceil(max_body_bytes / 3) + WS_JSON_SLACK_BYTES


def server_config(app, settings: ServerSettings, log_level: str, shutdown_timeout_s: float,
                  logging_config: dict | None = None) -> uvicorn.Config:
    """uvicorn's settings for `app` (`logging_config`: None leaves logging as it is)."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level, log_config=logging_config,
                          timeout_graceful_shutdown=shutdown_timeout_s,
                          ws_max_size=ws_max_size(settings.max_body_bytes))


def serve(settings: ServerSettings, log_level: str, shutdown_timeout_s: float) -> None:
    check_can_listen(settings.host, settings.port)
    logging_config = log_config(log_level)
    logging.config.dictConfig(logging_config)  # now: loading the model logs too
    app = create_app(settings)  # loads the model first: a bad --model fails before the port opens
    server = DrainingServer(server_config(app, settings, log_level, shutdown_timeout_s, logging_config))
    server.run()
    if not server.started:  # the port was taken after check_can_listen (uvicorn.run's own rule)
        sys.exit(3)
