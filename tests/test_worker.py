"""The engine's worker thread: rounds on demand, weak hold on its owner, and wait_idle."""
from __future__ import annotations

import gc
import threading
import weakref

from mossserve.engine.worker import Worker


class Owner:
    """Work is a counter of rounds to run; each round may block on `release`."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.todo = 0
        self.log: list[str] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.worker = Worker("test-worker", self.cond, self.has_work, self.work, self.crashed)

    def has_work(self) -> bool:
        return self.todo > 0

    def work(self) -> None:
        self.started.set()
        self.release.wait()
        with self.cond:
            self.todo -= 1
        self.log.append("round ended")

    def crashed(self, error: Exception) -> None:
        self.log.append(f"crashed: {error}")

    def add(self) -> None:
        with self.cond:
            self.todo += 1
            self.cond.notify_all()


def test_wait_idle_returns_only_after_the_round_in_flight() -> None:
    owner = Owner()
    owner.worker.start()
    owner.add()
    owner.started.wait()
    waiter = threading.Thread(target=lambda: (owner.worker.wait_idle(), owner.log.append("idle")))
    waiter.start()
    owner.release.set()
    waiter.join()
    assert owner.log == ["round ended", "idle"]
    owner.worker.stop()


def test_wait_idle_on_an_idle_or_stopped_worker_returns() -> None:
    owner = Owner()
    owner.worker.wait_idle()  # never started
    owner.worker.start()
    owner.worker.wait_idle()  # started, no work
    owner.worker.stop()
    owner.worker.wait_idle()


def test_a_dropped_owner_ends_its_thread() -> None:
    owner = Owner()
    owner.release.set()
    owner.worker.start()
    owner.add()
    owner.worker.wait_idle()
    assert owner.log == ["round ended"]
    thread, ref = owner.worker._thread, weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
    thread.join(timeout=30)
    assert not thread.is_alive()
