"""Sessions: turns of one conversation that continue a single context (a voice agent's dialogue).

A session's turns are ordinary requests that share a KV cache slot: a turn's prompt is prefilled
after everything the earlier turns fed, so the model sees the whole conversation without paying
for it again. Between turns the session keeps its slot while slots are free; when a waiting
request needs one, the least recently used idle session gives its slot up and keeps the rows it
had fed (`context`) and the family's per-session state, so that its next turn prefills the
context again into a fresh slot and continues exactly as if it had never left.

`Sessions` keeps the table and moves slots between sessions and their turns; the engine calls it
under its lock, from its talker thread (but `open`, from add_request's caller).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidRequestError, SessionLimitError
from ..models.family import Prompt, TalkerFamily
from .request import EngineRequest, Status
from .talker_runner import TalkerRunner


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
    def __init__(self, max_sessions: int, runner: TalkerRunner, family: TalkerFamily) -> None:
        self.max_sessions = max_sessions
        self.runner = runner
        self.family = family
        self.by_id: dict[str, Session] = {}

    def open(self, session_id: str) -> Session:
        """The session (created on its first turn); refuses a second turn while one is in flight."""
        session = self.by_id.get(session_id)
        if session is None:
            if len(self.by_id) >= self.max_sessions:
                raise SessionLimitError(f"the engine holds {len(self.by_id)} sessions (max_sessions="
                                        f"{self.max_sessions}); close one (close_session) or retry later")
            session = self.by_id[session_id] = Session(session_id)
        if session.turn is not None:
            raise InvalidRequestError(f"session {session_id!r} already has a turn in flight ({session.turn.id}); "
                                      "send the next turn when it ends, or abort it")
        return session

    def drop(self, session: Session) -> None:
        """Forget `session`, unless its id already names a newer one (it was closed and reopened)."""
        if self.by_id.get(session.id) is session:
            del self.by_id[session.id]

    def free_a_slot(self) -> bool:
        """Have the least recently used idle session give its slot up; False if none holds one idle."""
        idle = [s for s in self.by_id.values() if s.idle_slot]
        if not idle:
            return False
        session = min(idle, key=lambda s: s.last_used)
        session.saved = self.family.save_session(self.runner.state, session.slot)
        self.runner.release(session.slot)
        session.slot = -1
        return True

    def start_turn(self, request: EngineRequest) -> list[np.ndarray]:
        """Admit a session's turn: in its warm slot, or in a new one after its context is prefilled
        again; returns the family's admission prefix."""
        session: Session = request.session
        if session.slot >= 0:
            request.slot = session.slot
            return self.family.continue_session(self.runner.state, request.slot, request.prompt, request.sampling)
        if not session.started:
            request.slot = session.slot = self.runner.allocate()
            session.started = True
            return self.family.admit(self.runner.state, request.slot, request.prompt, request.sampling)
        slot = self.runner.allocate()
        try:
            self.family.restore_session(self.runner.state, slot, session.saved)
        except BaseException:  # the turn fails unadmitted, which ends the session (end_turn)
            self.runner.release(slot)
            raise
        request.slot = session.slot = slot
        prompt = request.prompt
        request.prompt = Prompt(np.concatenate(session.context + [prompt.rows]), prompt.start_length, prompt.info)
        request.context_rows = session.fed
        session.context, session.fed, session.saved = [], 0, None
        return self.family.continue_session(self.runner.state, request.slot, request.prompt, request.sampling)

    def end_turn(self, request: EngineRequest, status: Status) -> bool:
        """A session's turn leaves the talker; True if the session keeps the slot (the caller must not free it)."""
        session: Session = request.session
        session.turn, session.last_used = None, time.monotonic()
        if request.slot < 0:  # never admitted: the session is as it was, unless this turn failed
            if status is Status.FAILED:  # (the engine crashed): then the session cannot go on
                self.drop(session)
                if session.slot >= 0:
                    self.runner.release(session.slot)
                session.slot = -1
            return False
        if not request.rows:
            return self._unfeed_turn(request)
        if status is Status.FAILED:  # its cache may hold half a step: the session cannot go on
            self.drop(session)
            session.slot = -1
            return False
        fed = [request.prompt.rows[: request.prefilled]]
        if len(request.rows) > 1:  # every row the request emitted but the last went back in
            fed.append(np.stack(request.rows[:-1]))
        session.context.extend(fed)
        session.fed += sum(len(rows) for rows in fed)
        return self._still_open(session)

    def _unfeed_turn(self, request: EngineRequest) -> bool:
        """A turn that ended before its first step (cancelled or failed while its text had not come, or
        text that was empty) feeds nothing, as in the reference, where a turn's input goes in with its
        text: the slot's cache goes back to the context of the turns before it."""
        session: Session = request.session
        context = request.prompt.rows[: request.context_rows]  # earlier turns, being fed again into a new slot
        if request.prefilled < len(context):  # only part of them is back in the cache: keep them as rows
            session.context, session.fed = [context], len(context)
            session.saved = self.family.save_session(self.runner.state, request.slot)
            session.slot = -1
            return False
        if len(context):
            session.context.append(context)
            session.fed += len(context)
        if session.fed == 0:  # nothing was ever fed: the session starts afresh (its next turn seeds it)
            session.started, session.slot = False, -1
            return False
        self.runner.cache.lengths[request.slot] = session.fed
        return self._still_open(session)

    def _still_open(self, session: Session) -> bool:
        """Whether an ending turn's session keeps its slot: not when it was closed meanwhile (the close
        left it for the turn's ending to free, which the caller does)."""
        if self.by_id.get(session.id) is session:
            return True
        session.slot = -1
        return False
