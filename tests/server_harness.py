"""A live mossserve HTTP server on 127.0.0.1 for tests: uvicorn in a thread on a socket bound
before it starts (connections wait in the backlog, so no test polls for readiness)."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` until the block ends, with the uvicorn settings `mossserve serve` gives it
    (serve/run.py: server_config); yields its base URL."""
    from mossserve.serve.run import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(server_config(app, app.state.server.settings, "warning", shutdown_timeout_s=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@contextmanager
def serve_model(tts, data_dir, **settings) -> Iterator[str]:
    """A live server for an already loaded `tts` (kept open after the block), its voices under
    `data_dir`; `settings`: other ServerSettings fields. Yields its base URL."""
    from mossserve.serve import ServerSettings, create_app

    with live_server(create_app(ServerSettings(data_dir=data_dir, **settings), tts=tts)) as url:
        yield url


class StepGate:
    """Holds a family's decode step so a test can act while a request is certainly running.

    Once armed, the step after the next one that completes a frame blocks (signalling `held`)
    until `release()`. The frame has been handed on by then, so its audio reaches the client
    while the request can neither advance nor finish."""

    def __init__(self, family) -> None:
        self.family, self._step = family, family.step
        self.armed = threading.Event()
        self.held = threading.Event()
        self._release = threading.Event()
        self._hold_next = False
        self.frames_seen = 0  # steps that completed a frame, for failure messages
        family.step = self.step

    def step(self, state, hidden, slots):
        if self._hold_next:
            self._hold_next = False
            self.armed.clear()
            self.held.set()
            self._release.wait(timeout=60)
        out = self._step(state, hidden, slots)
        self.frames_seen += bool(out.has_frame.any())
        if self.armed.is_set() and bool(out.has_frame.any()):
            self._hold_next = True
        return out

    def release(self) -> None:
        self._release.set()

    def remove(self) -> None:
        self.release()
        self.family.step = self._step
