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


def test_on_idle_runs_on_the_thread_when_the_work_runs_out_before_wait_idle_returns() -> None:
    owner = Owner()
    calls: list[tuple[str, int]] = []

    def on_idle() -> None:
        calls.append((threading.current_thread().name, owner.todo))

    owner.worker = Worker("test-worker", owner.cond, owner.has_work, owner.work, owner.crashed, on_idle)
    owner.release.set()
    owner.worker.start()
    owner.worker.wait_idle()
    assert calls == []  # started with no work: nothing ran out
    with owner.cond:  # two rounds of work at once: it runs out once
        owner.todo += 2
        owner.cond.notify_all()
    owner.worker.wait_idle()
    assert owner.log == ["round ended", "round ended"] and calls == [("test-worker", 0)]
    owner.add()
    owner.worker.wait_idle()
    assert calls == [("test-worker", 0)] * 2
    owner.worker.stop()


class FailingOwner(Owner):
    """Its first round raises, and so does its crash handler."""

    def __init__(self) -> None:
        super().__init__()
        self.release.set()
        self.rounds = 0
        self.second_round = threading.Event()

    def work(self) -> None:
        with self.cond:
            self.todo -= 1
        self.rounds += 1
        if self.rounds == 1:
            raise RuntimeError("round")
        self.log.append("round ended")
        self.second_round.set()

    def crashed(self, error: Exception) -> None:
        self.log.append(f"crashed: {error}")
        raise RuntimeError("clean-up")


def test_a_crash_handler_that_raises_leaves_the_thread_serving() -> None:
    """A round that raises, then a clean-up that raises too (a double release, a device error):
    the thread logs both and takes the next round."""
    owner = FailingOwner()
    owner.worker.start()
    owner.add()
    owner.add()
    assert owner.second_round.wait(timeout=60), "the thread ended with the failed clean-up"
    assert owner.log == ["crashed: round", "round ended"]
    owner.worker.stop()


def test_ended_only_once_started_and_as_soon_as_the_loop_fails() -> None:
    """`ended` is False before start (an engine not yet started takes requests it runs once started),
    and True while a dying thread's crash handler still runs: work added then must be refused, as
    nobody would run it (the handler fails only what it found)."""
    class Dying(Owner):
        def has_work(self) -> bool:
            raise RuntimeError("a bug in has_work")

        def crashed(self, error: Exception) -> None:
            self.ended_in_handler = self.worker.ended
            self.started.set()
            self.release.wait()

    owner = Dying()
    assert not owner.worker.ended
    owner.worker.start()
    assert owner.started.wait(timeout=30)
    assert owner.ended_in_handler and owner.worker.ended and owner.worker.failure == "RuntimeError: a bug in has_work"
    owner.release.set()
    owner.worker.stop()
    assert owner.worker.ended


def test_a_stopped_worker_has_ended() -> None:
    owner = Owner()
    owner.worker.start()
    assert not owner.worker.ended
    owner.worker.stop()
    assert owner.worker.ended and owner.worker.failure is None
