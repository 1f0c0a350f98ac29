"""A daemon thread that does one round of work whenever there is some, and sleeps on a condition otherwise.

It holds its owner's methods weakly: a running thread never keeps an engine (and its model, KV
cache and codec) alive, and once the owner is collected the thread ends. So a `TTS` that goes out
of scope, or is created again in a notebook, frees its memory without an explicit `close()`.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger("mossserve")


class Worker:
    def __init__(self, name: str, condition: threading.Condition, has_work: Callable[[], bool],
                 work: Callable[[], object], on_crash: Callable[[Exception], None],
                 on_idle: Callable[[], object] | None = None) -> None:
        """Three bound methods of one owner. `has_work` is checked with `condition` held; whoever
        adds work notifies `condition`. `on_crash` gets an exception that escaped a round (a bug),
        so that the requests in flight end with an error instead of waiting forever; the thread
        goes on. An exception that escapes the loop itself (not a round) ends the thread: `failure`
        says why, `ended` turns True (so its owner can refuse work nobody would do), and `on_crash`
        gets it too. `on_idle`, a plain function (not the owner's), runs on the thread each time the work
        runs out, before `wait_idle` returns."""
        self.name, self._condition, self._on_idle = name, condition, on_idle
        self._has_work, self._work, self._on_crash = (weakref.WeakMethod(m) for m in (has_work, work, on_crash))
        self._thread: threading.Thread | None = None
        self._stop = False
        self._busy = False  # in a round, holding a strong reference to the owner
        self.failure: str | None = None  # why the thread died: an exception escaped the loop (a bug)
        self._started = False
        weakref.finalize(has_work.__self__, self._halt)

    def start(self) -> None:
        if self._thread is None:
            self._stop, self._started = False, True
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    @property
    def ended(self) -> bool:
        """Whether the thread, once started, is gone or going: stopped, or an exception escaped its loop
        (`failure` is set before its clean-up runs, so work added meanwhile is not left to nobody)."""
        thread = self._thread
        return self._started and (self.failure is not None or thread is None or not thread.is_alive())

    def stop(self) -> None:
        """Finish the round in progress, then end the thread."""
        self._halt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def wait_idle(self) -> None:
        """Block until the thread is between rounds with no work left (or not running), so that it
        holds no reference to its owner. With work arriving all the time this waits for a gap."""
        with self._condition:
            while self._busy or (self._thread is not None and not self._stop and self._pending()):
                self._condition.wait()

    def _pending(self) -> bool | None:
        """Whether the owner has work; None once it is gone. Holds no reference past the call."""
        has_work = self._has_work()
        return None if has_work is None else has_work()

    def _halt(self) -> None:
        with self._condition:
            self._stop = True
            self._condition.notify_all()

    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                work = self._work()
                if work is None:
                    return
                try:
                    work()
                except Exception as e:  # noqa: BLE001 - a bug must not silently stop serving
                    log.exception("%s: a round failed", self.name)
                    self._report(e)
                del work  # hold no reference to the owner while waiting
        except BaseException as e:  # noqa: BLE001 - the thread ends here: say why, and fail what waits on it
            self.failure = f"{type(e).__name__}: {e}"
            log.critical("%s: the thread died", self.name, exc_info=e)
            if isinstance(e, Exception):
                self._report(e)
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()

    def _report(self, error: Exception) -> None:
        crashed = self._on_crash()
        if crashed is not None:
            try:
                crashed(error)
            except Exception:  # noqa: BLE001 - a failing clean-up must not end the thread
                log.exception("%s: handling a failed round failed", self.name)

    def _wait_for_work(self) -> bool:
        """True when there is work; False when stopped or the owner is gone. No strong reference
        to the owner is held while waiting."""
        idled = False
        with self._condition:
            while not self._stop:
                pending = self._pending()
                if pending is None:
                    return False
                if pending:
                    self._busy = True
                    return True
                if self._busy:
                    if self._on_idle is not None and not idled:
                        idled = True
                        self._condition.release()
                        try:
                            self._on_idle()
                        except Exception:  # noqa: BLE001 - housekeeping must not stop serving
                            log.exception("%s: on_idle failed", self.name)
                        finally:
                            self._condition.acquire()
                        continue  # work may have come while the condition was free
                    self._busy = False
                    self._condition.notify_all()
                self._condition.wait()
            return False
