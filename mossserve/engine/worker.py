"""A daemon thread that does one round of work whenever there is some, and sleeps on a condition otherwise."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("mossserve")


class Worker:
    def __init__(self, name: str, condition: threading.Condition, has_work: Callable[[], bool],
                 work: Callable[[], object], on_crash: Callable[[Exception], None]) -> None:
        """`has_work` is checked with `condition` held; whoever adds work notifies `condition`.
        `on_crash` gets an exception that escaped a round (a bug), so that the requests in flight
        end with an error instead of waiting forever; the thread goes on."""
        self.name, self._condition, self._has_work, self._work = name, condition, has_work, work
        self._on_crash = on_crash
        self._thread: threading.Thread | None = None
        self._stop = False

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the round in progress, then end the thread."""
        with self._condition:
            self._stop = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._stop or self._has_work())
                if self._stop:
                    return
            try:
                self._work()
            except Exception as e:  # noqa: BLE001 - a bug must not silently stop serving
                log.exception("%s: a round failed", self.name)
                self._on_crash(e)
