"""One voice store for replicas on several machines.

SQLite's WAL mode needs every process that opens the database on one host, so replicas spread
over machines cannot share a data directory through a network file system. Instead one
VoiceService replica owns the data directory (on the head node) and every SpeechServer replica
reaches it through RemoteVoiceStore, which has VoiceStore's methods. The server calls them off
its event loop (asyncio.to_thread), so they may block on the handle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..serve.voices import Voice, VoiceStore

HEAD_NODE = {"node:__internal_head__": 0.001}  # the data directory stays on one machine across restarts


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": HEAD_NODE},
                  logging_config={"enable_access_log": False})
class VoiceService:
    def __init__(self, data_dir: str) -> None:
        self.store = VoiceStore(Path(data_dir))

    def call(self, method: str, *args, **kwargs) -> tuple[bool, object]:
        """(True, result) or (False, the exception), so callers see the store's own errors and messages."""
        try:
            return True, getattr(self.store, method)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed back to the caller as is
            return False, e


class RemoteVoiceStore:
    """VoiceStore's methods, run by the VoiceService."""

    def __init__(self, service: DeploymentHandle) -> None:
        self.service = service

    def add(self, name: str, audio: np.ndarray, sample_rate: int, codes: np.ndarray, transcript: str | None,
            codec: str, sha256: str) -> Voice:
        return self._call("add", name, audio, sample_rate, codes, transcript, codec, sha256)

    def get(self, name: str) -> Voice | None:
        return self._call("get", name)

    def list(self) -> list[Voice]:
        return self._call("list")

    def codes(self, name: str, codec: str | None = None) -> np.ndarray | None:
        return self._call("codes", name, codec)

    def replace_codes(self, name: str, codes: np.ndarray, codec: str, sha256: str | None = None) -> Voice:
        return self._call("replace_codes", name, codes, codec, sha256)

    def delete(self, name: str) -> str | None:
        return self._call("delete", name)

    def audio(self, name: str) -> bytes:
        return self._call("audio", name)

    def close(self) -> None:
        pass

    def _call(self, method: str, *args, **kwargs):
        ok, value = self.service.call.remote(method, *args, **kwargs).result()
        if not ok:
            raise value
        return value
