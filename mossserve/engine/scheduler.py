"""Admission and continuous batching: who waits, who prefills, who decodes this step.

Requests join whenever a slot is free and leave the moment they end; the waiting queue is
bounded so that an overloaded engine refuses new work instead of growing without limit.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..errors import EngineFullError
from .request import EngineRequest, Status


class Scheduler:
    def __init__(self, max_running: int, max_queued: int, prefill_tokens: int) -> None:
        self.max_running, self.max_queued, self.prefill_tokens = max_running, max_queued, prefill_tokens
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []  # admission order

    @property
    def full(self) -> bool:
        """Whether `add` would refuse a request now."""
        return len(self.waiting) + len(self.running) >= self.max_running + self.max_queued

    def add(self, request: EngineRequest) -> None:
        """Queue a request; refused once `max_running + max_queued` are in (every request waits here
        until the next step, also one that a free slot will start at once)."""
        if self.full:
            raise EngineFullError(f"the engine is full: {len(self.running)} running and {len(self.waiting)} "
                                  f"queued (max_running={self.max_running}, max_queued={self.max_queued}); "
                                  "retry later")
        self.waiting.append(request)

    def admit(self, free: int, holds_slot: Callable[[EngineRequest], bool]) -> list[EngineRequest]:
        """Waiting requests that start now, oldest first: those that need a slot while `free` slots
        last, and every one that brings its own (a session's next turn, which may stand behind a
        request waiting for a slot: it must not wait for that slot, which it may be keeping taken)."""
        admitted, waiting = [], deque()
        for request in self.waiting:
            own = holds_slot(request)
            if own or free > 0:
                free -= not own
                request.status = Status.PREFILL
                self.running.append(request)
                admitted.append(request)
            else:
                waiting.append(request)
        self.waiting = waiting
        return admitted

    def prefill_batch(self, held: frozenset[str] = frozenset()) -> list[tuple[EngineRequest, int]]:
        """(request, prompt rows to prefill now) within the step's token budget, oldest first.

        The budget counts padded tokens (rows x the longest piece), so one long prompt is
        prefilled over several steps while the running batch keeps decoding between them.
        Requests in `held` (ids) wait this step: they will copy a prefix another request computes now.
        """
        batch: list[tuple[EngineRequest, int]] = []
        for request in self.running:
            if request.status is not Status.PREFILL or request.id in held:
                continue
            remaining = request.prompt_length - request.prefilled
            if remaining == 0:  # an open prompt, all prefilled, waiting for its input
                continue
            width = max([n for _, n in batch] + [min(remaining, self.prefill_tokens)])
            if batch and width * (len(batch) + 1) > self.prefill_tokens:
                break
            batch.append((request, min(remaining, self.prefill_tokens)))
        return batch

    def decoding(self) -> list[EngineRequest]:
        return [r for r in self.running if r.status is Status.DECODING]

    def remove(self, request: EngineRequest) -> bool:
        """Take a request out of the queue or the batch; False if it was in neither."""
        if request in self.running:
            self.running.remove(request)
            return True
        try:
            self.waiting.remove(request)
            return True
        except ValueError:
            return False
