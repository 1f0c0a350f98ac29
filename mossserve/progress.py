"""A one-line progress bar on stderr for long CLI work (only when stderr is a terminal)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool | None = None, interval: float = 0.2) -> None:
        self.total, self.done, self.audio_seconds = total, 0, 0.0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval, self._shown, self._start = interval, 0.0, time.monotonic()

    def update(self, audio_seconds: float = 0.0, finished: int = 0) -> None:
        self.audio_seconds += audio_seconds
        self.done += finished
        now = time.monotonic()
        if self.enabled and (now - self._shown >= self.interval or self.done == self.total):
            self._shown = now
            elapsed = max(now - self._start, 1e-9)
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} requests, "
                             f"{self.audio_seconds:.1f} s audio, {self.audio_seconds / elapsed:.2f}x real time")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
