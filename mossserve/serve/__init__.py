"""The HTTP server: OpenAI's speech API plus voices, metrics and health (needs the `serve` extra)."""
from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
