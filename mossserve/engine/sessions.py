"""Sessions: turns of one conversation that continue a single context (a voice agent's dialogue).

A session's turns are ordinary requests that share a KV cache slot: a turn's prompt is prefilled
after everything the earlier turns fed, so the model sees the whole conversation without paying
for it again. Between turns the session keeps its slot while slots are free; when a waiting
request needs one, the least recently used idle session gives its slot up and keeps the rows it
had fed (`context`) and the family's per-session state, so that its next turn prefills the
context again into a fresh slot and continues exactly as if it had never left.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import EngineFullError, InvalidRequestError
from .request import EngineRequest


@dataclass
class Session:
    id: str
    slot: int = -1  # the slot whose cache holds the context; -1: none (not started, or given up)
    context: list[np.ndarray] = field(default_factory=list)  # the rows fed so far, when the slot was given up
    fed: int = 0  # rows in the context
    saved: object = None  # the family's state for the session while it holds no slot
    started: bool = False  # a turn has been admitted
    turn: EngineRequest | None = None  # the turn in flight
    last_used: float = field(default_factory=time.monotonic)

    @property
    def idle_slot(self) -> bool:
        return self.slot >= 0 and self.turn is None


class Sessions:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.by_id: dict[str, Session] = {}

    def open(self, session_id: str) -> Session:
        """The session (created on its first turn); refuses a second turn while one is in flight."""
        session = self.by_id.get(session_id)
        if session is None:
            if len(self.by_id) >= self.max_sessions:
                raise EngineFullError(f"the engine holds {len(self.by_id)} sessions (max_sessions="
                                      f"{self.max_sessions}); close one or retry later")
            session = self.by_id[session_id] = Session(session_id)
        if session.turn is not None:
            raise InvalidRequestError(f"session {session_id!r} already has a turn in flight ({session.turn.id}); "
                                      "send the next turn when it ends, or abort it")
        return session

    def drop(self, session: Session) -> None:
        """Forget `session`, unless its id already names a newer one (it was closed and reopened)."""
        if self.by_id.get(session.id) is session:
            del self.by_id[session.id]

    def least_recently_used_idle(self) -> Session | None:
        idle = [s for s in self.by_id.values() if s.idle_slot]
        return min(idle, key=lambda s: s.last_used) if idle else None
