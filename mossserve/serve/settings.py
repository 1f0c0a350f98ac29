"""ServerSettings: everything `mossserve serve` is started with, in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import math

from ..config import EngineConfig
from ..errors import InvalidRequestError

DATA_DIR_ENV = "MOSSSERVE_DATA_DIR"


def default_data_dir() -> Path:
    """$MOSSSERVE_DATA_DIR, else $XDG_DATA_HOME/mossserve, else ~/.local/share/mossserve (voices and
    their database live here). An empty or relative XDG_DATA_HOME is ignored, as the XDG spec says
    (else the voices would land wherever the server was started)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "mossserve"
    try:
        return Path.home() / ".local" / "share" / "mossserve"
    except RuntimeError:  # no $HOME and no passwd entry (a container's user): nowhere to keep voices by default
        raise InvalidRequestError(f"there is no home directory to keep voices in: pass --data-dir or set "
                                  f"${DATA_DIR_ENV}") from None


@dataclass
class ServerSettings:
    model: str | None = None  # checkpoint directory or hub id; None: the bundled demo checkpoint
    codec: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    task: str | None = None  # which MOSS-TTS Delay model `model` is, where its name does not say
    model_name: str | None = None  # the id clients send as `model` (default: from `model`)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer token required on /v1/* when set
    data_dir: Path = field(default_factory=default_data_dir)
    cors_origins: tuple[str, ...] = ()  # allowed browser origins ("*" for any); none: CORS off
    max_input_chars: int = 4096  # OpenAI's limit; longer text is refused, never cut
    max_body_bytes: int = 25 * 1024 * 1024  # request bodies (voice uploads, inline reference audio)
    max_voice_seconds: float = 60.0  # reference audio, uploaded or inline
    request_timeout_s: float = 300.0  # a request still running after this is aborted
    retry_after_s: int = 1  # what a refused request is told to wait
    playground: bool = True  # the web page at `/` (docs/playground.md)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        """Refuse settings no request could work under, before the server starts (on Ray, before any
        replica loads). The device is checked where the model loads: a head node may have no GPU."""
        from ..loader import DTYPES
        from ..models.presets import check_task

        if self.dtype not in (*DTYPES, "auto"):
            raise InvalidRequestError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}, auto")
        check_task(self.task)
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"port must lie in 0..65535, got {self.port}")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise InvalidRequestError("the API key (--api-key, else $MOSSSERVE_API_KEY) must be non-empty, without "
                                      "spaces around it (an empty key would leave the server open; clients send "
                                      "it after 'Bearer ')")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            raise InvalidRequestError("the API key (--api-key, else $MOSSSERVE_API_KEY) must be printable ASCII: "
                                      "clients send it in an HTTP header, where other characters do not arrive as "
                                      "typed")
        if self.max_input_chars < 1:
            raise InvalidRequestError(f"max_input_chars must be at least 1, got {self.max_input_chars}")
        if self.max_body_bytes < 1:
            raise InvalidRequestError(f"the body limit must be positive, got {self.max_body_bytes} bytes")
        for name in ("max_voice_seconds", "request_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise InvalidRequestError(f"{name} must be a positive number of seconds, got {value}")
        self.engine.validate()
