"""The engine: continuous batching of talker steps, streaming frames through the codec.

One engine step admits waiting requests into free slots, runs one batched decode row for every
decoding request and a budgeted piece of prefill for new ones, lets the family turn all the
resulting hidden states into next rows and frames at once, and hands finished frames to the
pipeline. With `threaded` (the default) the talker loop and the codec runner each run on
their own thread; otherwise `step()` drives both, which tests use to place events exactly.

Locks: `_lock` guards the queue, the live-request table and closing; the codec runner has its
own. The engine never calls into the codec runner while holding `_lock` (the codec runner
calls back into the engine while holding its own), so the two cannot deadlock.
"""
from __future__ import annotations

import itertools
import threading
from typing import Callable

import numpy as np
import torch

from ..config import ChunkSchedule, EngineConfig
from ..errors import (
    ContextFullError,
    EngineBrokenError,
    EngineClosedError,
    InvalidRequestError,
    MossServeError,
    PromptTooLongError,
)
from ..models.codecs.base import Codec
from ..models.family import Prompt, TalkerFamily
from ..sampling import SamplingParams
from .codec_runner import CodecRunner
from ..openmp import release_openmp_pool
from .pipeline import Pipeline, frame_width
from .request import AudioChunk, EngineRequest, Sink, Status
from .scheduler import Scheduler
from .prefixes import PrefixSharing, plain_prompt
from .sessions import Session, Sessions
from .talker_runner import TalkerRunner
from .worker import Worker

SEAM_CHARS = 64  # longer than any special token's spelling (`push_input` checks where two pieces meet)
# This many failing rounds in a row (`FailingRounds`) mean the engine can no longer serve.
FAILING_ROUNDS = 5


class FailingRounds:
    """Counts the engine's rounds (steps) in a row that failed a request and ran no model call that
    succeeded. A sticky CUDA error fails every round, so a few in a row mean the engine is broken
    (`Engine.problem`); one bad request failing alone is a single such round, and any round whose
    model work succeeds starts the count again. Written on the engine's thread only."""

    def __init__(self) -> None:
        self.count, self.error = 0, None  # the rounds in a row, and the last one's error
        self._succeeded, self._error = False, None  # the round in progress

    def begin(self) -> None:
        self._succeeded, self._error = False, None

    def succeeded(self) -> None:
        self._succeeded = True

    def failed(self, error: str | None) -> None:
        self._error = error or "unknown error"

    def end(self) -> None:
        if self._succeeded:
            self.count, self.error = 0, None
        elif self._error is not None:
            self.count, self.error = self.count + 1, self._error


class Engine:
    def __init__(self, family: TalkerFamily, get_codec: Callable[[], Codec] | None = None,
                 config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        config.validate()
        self.family = family
        self.max_len = min(config.max_len, family.backbone_config.max_position_embeddings)
        device = next(family.model.parameters()).device
        mode = "graphs" if device.type == "cuda" and config.cuda_graphs else "eager"
        self._on_cpu = device.type == "cpu"
        codec_thread = config.codec_thread if config.codec_thread is not None else device.type == "cuda"
        self._codec_between_steps = not (config.threaded and codec_thread)
        self.runner = TalkerRunner(family, config.max_running, self.max_len, config.prefill_tokens, mode,
                                   config.graph_batch_sizes)
        self.scheduler = Scheduler(config.max_running, config.max_queued, config.prefill_tokens)
        self._get_codec = get_codec
        self.guard = config.runaway.at_frame_rate(family.frame_rate)
        self._repeat_codebooks = self.guard.repeat_codebooks
        self.codec = CodecRunner(get_codec or _no_codec, config.codec_streams or 2 * config.max_running,
                                 config.max_chunk_frames, family.codebooks, self._codec_done, self._codec_failed)
        self.pipeline = Pipeline(self.codec.submit, family.codebooks, family.sample_rate,
                                 config.max_chunk_frames)
        self._lock = threading.Condition()
        self._live: dict[str, EngineRequest] = {}
        self._endings: list[tuple[EngineRequest, Status, str, str | None]] = []  # asked from other threads
        self.sessions = Sessions(config.max_sessions, self.runner, family)
        self._session_closes: list[Session] = []  # closed from other threads, their slots freed at the next step
        self._ids = itertools.count()
        self._closing = False  # set by shutdown(): no request is taken after it
        # On CPU an idle talker thread frees its OpenMP pool, which would otherwise throttle whatever
        # runs torch on another thread meanwhile (two pools on two cores; docs/performance.md).
        self._worker = Worker("mossserve-engine", self._lock, self.has_work, self.step, self._crashed,
                              release_openmp_pool if self._on_cpu else None)
        # Prompt rows run through prefill, and rows started from keys and values already in the cache.
        self.counts = {"finished": 0, "aborted": 0, "failed": 0, "steps": 0, "prompt_rows_prefilled": 0,
                       "prompt_rows_reused": 0}
        self.prefixes = PrefixSharing(self.runner, config.shared_prefix_rows, self.counts)
        self.failing = FailingRounds()

    # ---- the caller's side (any thread) --------------------------------------------------
    def add_request(self, prompt: Prompt, sampling: SamplingParams, sink: Sink, *, request_id: str | None = None,
                    max_new_frames: int | None = None, schedule: ChunkSchedule | None = None,
                    decode_audio: bool = True, guard: bool = True, session: str | None = None) -> EngineRequest:
        """Queue a request; its chunks go to `sink` (from the engine's threads), the last one `final`.
        With `session`, the request is the next turn of that session (engine/sessions.py): its prompt
        continues the context of the session's earlier turns.

        Raises InvalidRequestError for a request that cannot run and EngineFullError when the
        queue is full; nothing is queued then."""
        self.check_settings(sampling, max_new_frames, schedule, session, decode_audio)
        schedule = schedule or self.config.chunk_schedule
        if not isinstance(prompt.rows, np.ndarray):
            raise InvalidRequestError(f"prompt rows must be an array (positions, {self.family.columns}), got "
                                      f"{type(prompt.rows).__name__}")
        self.family.check_prompt(prompt)  # shape, ids and codes the model can embed
        length = len(prompt.rows) + prompt.later_rows
        if length >= self.max_len:
            raise PromptTooLongError(f"the prompt has {length} positions; this engine allows {self.max_len} "
                                      "(prompt and generated audio together)")
        if max_new_frames is None:  # a session's turn has no step cap: the runaway guard and the cache bound it
            max_new_frames = self.max_len if prompt.info.get("uncapped") else self.family.max_new_frames
        cap = max_new_frames
        guard = guard and self.guard.enabled and prompt.info.get("runaway_guard", True)
        request = EngineRequest(
            id=request_id or f"req-{next(self._ids)}",
            prompt=prompt, sampling=sampling, sink=sink,
            max_new_frames=min(cap, self.max_len - length),
            length_limit=self.max_len if self.max_len - length < cap else None,
            frame_bound=self.guard.frame_bound(prompt.info.get("text_tokens"), prompt.info.get("duration_frames"),
                                               prompt.info.get("pauses", ())) if guard else None,
            text_tokens=int(prompt.info.get("text_tokens") or 0),
            repeat_limit=self.guard.repeat_limit(prompt.info.get("pauses", ())) if guard else None,
            schedule=schedule, decode_audio=decode_audio, open=bool(prompt.info.get("open", False)),
            plain=plain_prompt(prompt),
        )
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine has shut down")
            if (stopped := self._thread_problem()) is not None:  # nothing would ever run the request
                raise EngineBrokenError(stopped)
            if request.id in self._live:
                raise InvalidRequestError(f"request id {request.id!r} is already in use")
            new_session = session is not None and session not in self.sessions.by_id
            try:
                if session is not None:
                    request.session = self._join_session(session, request)
                self.scheduler.add(request)
            except MossServeError:  # refused: the session is as it was (a new one is not kept)
                if request.session is not None:
                    request.session.turn = None
                if new_session:
                    self.sessions.by_id.pop(session, None)
                raise
            self._live[request.id] = request
            self._lock.notify()
        return request

    def check_settings(self, sampling: SamplingParams, max_new_frames: int | None = None,
                       schedule: ChunkSchedule | None = None, session: str | None = None,
                       decode_audio: bool = True) -> None:
        """Raise InvalidRequestError for settings no prompt could run under (`add_request`'s checks that
        do not depend on the prompt)."""
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        sampling.validate(self.family.codebooks)
        self.family.check_sampling(sampling)
        if max_new_frames is not None:
            if isinstance(max_new_frames, bool) or not isinstance(max_new_frames, (int, np.integer)):
                raise InvalidRequestError(f"max_new_frames must be an integer, got {max_new_frames!r}")
            if max_new_frames < 1:
                raise InvalidRequestError(f"max_new_frames must be at least 1, got {max_new_frames}")
        if schedule is not None and not isinstance(schedule, ChunkSchedule):
            raise InvalidRequestError(f"schedule must be a ChunkSchedule, got {type(schedule).__name__}"
                                      + ("; write ChunkSchedule(**...)" if isinstance(schedule, dict) else ""))
        (schedule or self.config.chunk_schedule).validate(self.config.max_chunk_frames)
        if session is not None and not self.family.supports_sessions:
            raise InvalidRequestError("this model does not keep sessions (multi-turn contexts)")
        if decode_audio and self._get_codec is None:
            raise InvalidRequestError("this engine has no codec: ask for codes only")

    def _join_session(self, session_id: str, request: EngineRequest):
        """The session `request` is the next turn of (the caller holds the lock)."""
        session = self.sessions.open(session_id)
        self._check_room(request, session.fed)
        session.turn = request
        return session

    def push_input(self, request_id: str, piece: object = None, end: bool = False) -> bool:
        """Input for a running request whose prompt is open (text arriving while it speaks), in order;
        `end=True` says no more comes. False if the request is unknown, over or being aborted, takes
        no input, or its input has ended; InvalidRequestError for a piece the family refuses (the
        request goes on)."""
        self.family.check_input(piece)
        with self._lock:
            request = self._live.get(request_id)
            if (request is None or request.status.done or request.ending or request.input_ended
                    or not request.prompt.info.get("open")):
                return False
            if isinstance(piece, str) and piece:
                if request.input_tail:  # a special token spelled across two pieces lies in their seam
                    self.family.check_input(request.input_tail + piece[:SEAM_CHARS])
                request.input_tail = (request.input_tail + piece)[-SEAM_CHARS:]
            request.inputs.append((piece, end))
            request.input_ended = end
            self._lock.notify()
        return True

    def _apply_inputs(self, request: EngineRequest) -> None:
        """Hand the request's pushed input to its family (engine thread, in order)."""
        with self._lock:
            inputs, request.inputs = request.inputs, []
        try:
            for piece, end in inputs:
                update = self.family.push_input(self.runner.state, request.slot, piece, end)
                if update.text_tokens and request.frame_bound is not None:
                    request.text_tokens += update.text_tokens
                    request.frame_bound = self.guard.frame_bound(request.text_tokens,
                                                                 request.prompt.info.get("duration_frames"),
                                                                 request.prompt.info.get("pauses", ()))
                if update.prompt_rows is not None:
                    prompt = request.prompt
                    request.prompt = Prompt(np.concatenate([prompt.rows, update.prompt_rows]), prompt.start_length,
                                            prompt.info)
                    self._check_room(request, request.session.fed if request.session is not None else 0)
                if update.seal:
                    request.open = False
                if update.next_row is not None:
                    self.runner.next_rows[request.slot] = torch.as_tensor(update.next_row, device=self.runner.next_rows.device)
                    request.rows[-1] = np.asarray(update.next_row)
                    request.waiting_input = False
        except Exception as e:  # noqa: BLE001 - bad input fails its request only
            self._failed_alone(request, e)

    def _check_room(self, request: EngineRequest, fed: int) -> None:
        """The request's prompt after the `fed` rows its session holds must leave the cache room for a
        step (a session's turn as it joins, and whenever pushed input adds prompt rows); its step cap
        is what room is left."""
        used = fed + request.prompt_length
        if used >= self.max_len and fed:
            raise ContextFullError(fed, request.prompt_length, self.max_len)
        if used >= self.max_len:
            raise InvalidRequestError(f"the prompt needs {used} positions; this engine allows {self.max_len}: "
                                      "send less text")
        if self.max_len - used < request.max_new_frames:
            request.max_new_frames, request.length_limit = self.max_len - used, self.max_len

    def _can_progress(self, request: EngineRequest) -> bool:
        if request.inputs:
            return True
        if request.status is Status.PREFILL:
            return request.prefilled < request.prompt_length or not request.open
        return request.status is Status.DECODING and not request.waiting_input

    def session_context(self, session_id: str) -> int:
        """The rows a session's earlier turns fed (0 for an unknown session, or one whose turns fed
        nothing): its next turn continues them, or, at 0, starts the context (a system prompt)."""
        with self._lock:
            session = self.sessions.by_id.get(session_id)
            return 0 if session is None else session.fed

    def close_session(self, session_id: str) -> bool:
        """Forget a session: its turn in flight is aborted and its slot freed (at the next step); a turn
        added after this call starts a new session. False if unknown."""
        with self._lock:
            session = self.sessions.by_id.pop(session_id, None)
            if session is None:
                return False
            self._session_closes.append(session)
            self._lock.notify()
        return True

    def abort(self, request_id: str) -> bool:
        """End a request now, wherever it is; False if it is unknown or already over."""
        with self._lock:
            request = self._live.get(request_id)
            if request is None:
                return False
            request.ending = True
            self._endings.append((request, Status.ABORTED, "aborted", None))
            self._lock.notify()
        return True

    def problem(self) -> str | None:
        """Why this engine, not shut down, cannot serve (None while it can): its talker thread has ended
        (a request would wait forever), or its last FAILING_ROUNDS rounds or more all failed."""
        if self._closing:
            return None
        if (stopped := self._thread_problem()) is not None:
            return stopped
        if self.failing.count >= FAILING_ROUNDS:
            return (f"the engine's last {self.failing.count} rounds all failed, none succeeded in between "
                    f"(the last: {self.failing.error})")
        return None

    def _thread_problem(self) -> str | None:
        if not self.config.threaded or not self._worker.ended:
            return None
        failure = self._worker.failure
        return "the engine's thread has stopped" + (f" ({failure})" if failure else "")

    def stats(self) -> dict:
        with self._lock:
            return {
                "running": len(self.scheduler.running),
                "queued": len(self.scheduler.waiting),
                "live": len(self._live),
                "cache_slots_used": self.runner.slots_in_use,
                "cache_slots": self.config.max_running,
                "cache_slots_kept": len(self.runner.cache.kept),
                "outputs_open": len(self.pipeline),
                "codec_streams_open": self.codec.open_streams,
                "codec_chunks_queued": self.codec.queued,
                "sessions": len(self.sessions.by_id),
                "sessions_holding_slots": sum(x.slot >= 0 for x in self.sessions.by_id.values()),
                **self.counts,
            }

    # ---- threads -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the talker loop on its own thread (with `threaded`), and the codec runner on another
        where `codec_thread` asks for it (by default on CUDA only; else it decodes between steps)."""
        if self.config.threaded:
            if not self._codec_between_steps:
                self.codec.start()
            if self._on_cpu:
                release_openmp_pool()  # this thread's, made while the model loaded (docs/performance.md)
            self._worker.start()

    def shutdown(self) -> None:
        """Stop the threads; every request still live ends with an error chunk (its caller stops
        waiting), and later requests are refused."""
        with self._lock:
            self._closing = True
        self._worker.stop()
        self.codec.stop()
        with self._lock:
            stranded = [r for r in self._live.values() if not r.closed]
        for request in stranded:
            self._close_as(request, Status.ABORTED, "aborted", "the engine shut down")

    def wait_idle(self) -> None:
        """Block until the talker and codec threads are between rounds with nothing to do. Call it
        once the requests you care about have ended (a graceful drain, or before dropping the
        engine: a thread in a round holds its owner until the round ends)."""
        self._worker.wait_idle()
        self.codec.wait_idle()

    def _crashed(self, error: Exception) -> None:
        """A step failed outside the per-request guards (a bug): end every request in the talker with
        the error, so that no caller waits forever, and keep serving. Taken from the live table, not
        the scheduler's lists: the failed step may have left a request half ended (out of the batch,
        never closed); one whose ending fails again is closed as it is."""
        message = _message(error)
        self.failing.failed(message)
        with self._lock:
            requests = [r for r in self._live.values() if not r.status.done]
        for request in requests:
            try:
                self._end(request, Status.FAILED, "error", message)
            except Exception:  # noqa: BLE001
                self._close_as(request, Status.FAILED, "error", message)
        self.failing.end()  # the round that raised never reached its own end

    def has_work(self) -> bool:
        """Whether a step would make progress (what the talker thread waits for)."""
        if self._endings or self._session_closes:
            return True
        if (self.scheduler.waiting and len(self.scheduler.running) < self.config.max_running
                and self._codec_room() > 0):
            return True
        return any(self._can_progress(r) for r in self.scheduler.running)

    def is_full(self) -> bool:
        """Whether `add_request` would refuse a request now for want of room (EngineFullError): a caller
        that was refused asks again before it concludes that nothing will make room."""
        with self._lock:
            return self.scheduler.full

    def _codec_room(self) -> int:
        """How many more finished requests the codec may have to drain. With the codec on a thread of
        its own, a talker faster than the codec would pile finished requests' audio up without bound
        (and their streams would hold new requests' first chunks back): a request starts only while
        fewer than `max_running` wait on it, and new requests wait in the queue meanwhile (the
        caller holds the lock)."""
        if self._codec_between_steps:  # every step drains what it made
            return self.config.max_running
        return self.config.max_running - sum(r.status is Status.FINISHED and not r.closed for r in self._live.values())

    def run_until_idle(self) -> None:
        """Unthreaded: step while anything can progress (requests waiting for input stay)."""
        while self.has_work():
            self.step()

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> None:
        self.failing.begin()
        with self._lock:
            endings, self._endings = self._endings, []
            closes, self._session_closes = self._session_closes, []
        for request, status, reason, error in endings:
            self._end(request, status, reason, error)
        for session in closes:
            self._close_session(session)
        with self._lock:
            room = self._codec_room()
            admitted = self.scheduler.admit(min(self._free_slots(), room) if room > 0 else 0, self._holds_slot)
        for request in admitted:
            self._admit(request)
        for request in list(self.scheduler.running):
            if request.inputs and request.slot >= 0 and not request.status.done:
                self._apply_inputs(request)
        ready, hidden = self._forward()
        if ready:
            self._advance(ready, hidden)
        self.counts["steps"] += 1
        if self._codec_between_steps:
            while self.codec.run_once():
                pass
        self.failing.end()

    # ---- sessions ---------------------------------------------------------------------------
    def _holds_slot(self, request: EngineRequest) -> bool:
        return request.session is not None and request.session.slot >= 0

    def _free_slots(self) -> int:
        """Slots for waiting requests: those no request and no session holds (a session's slot stays
        taken while its next turn waits to be admitted); idle sessions give theirs up (least recently
        used first) when the request next in line needs one (the caller holds the lock)."""
        free = self.config.max_running - self.runner.slots_in_use
        if free <= 0 and self.scheduler.waiting and not self._holds_slot(self.scheduler.waiting[0]):
            free += self.sessions.free_a_slot()
        return free

    def _close_session(self, session: Session) -> None:
        # Taken out of `sessions` by close_session, under the lock, as a turn joins a session
        # (add_request): the turn that joined before is aborted here, one after started a new session;
        # the warm slot is nobody's after.
        with self._lock:
            turn, slot = session.turn, session.slot
            session.slot = -1
        running = turn is not None and turn.slot >= 0  # in the session's slot, which its ending frees
        if turn is not None:
            self._end(turn, Status.ABORTED, "aborted")
        if slot >= 0 and not running:
            self.runner.release(slot)

    def _admit(self, request: EngineRequest) -> None:
        try:
            if request.session is not None:
                prefix = self.sessions.start_turn(request)
            else:
                donor, length = self.prefixes.kept(request)
                request.slot = self.runner.allocate()
                prefix = self.family.admit(self.runner.state, request.slot, request.prompt, request.sampling)
                if length:  # now, before a later admission may hand the donor slot out
                    self.prefixes.copy(donor, request, length)
            prefix = [clip[:, : frame_width(request)] for clip in prefix]
            for clip in prefix:
                request.segment_lengths.append(len(clip))
                request.frames.extend(clip)
            self.pipeline.start(request, prefix)
        except Exception as e:  # noqa: BLE001 - this request fails, the engine goes on
            self._failed_alone(request, e)

    def _failed_alone(self, request: EngineRequest, error: Exception) -> None:
        """A request whose own admission or input failed. Its input's fault (a MossServeError) is no
        sign of a broken engine; anything else is a device write that failed (admission writes the slot's
        state: where a sticky CUDA error fails every new request), which `failing` counts."""
        if not isinstance(error, MossServeError):
            self.failing.failed(_message(error))
        if isinstance(error, InvalidRequestError):
            request.refusal = error
        self._end(request, Status.FAILED, "error", _message(error))

    def _forward(self) -> tuple[list[EngineRequest], torch.Tensor | None]:
        """Decode rows for the decoding requests and a prefill piece for new ones; returns the
        requests that now have a hidden state to step from, and those states."""
        parts, ready = [], []
        # In slot order: when the rows' slots are consecutive (a full batch always is), attention
        # reads the cache as a view instead of gathering every row's keys (layers/attention.py).
        decoding = sorted((r for r in self.scheduler.decoding() if not r.waiting_input), key=lambda r: r.slot)
        if decoding:
            try:
                parts.append(self.runner.decode([r.slot for r in decoding]))
                ready.extend(decoding)
            except Exception as e:  # noqa: BLE001
                self._fail_all(decoding, e)
        prefill = self.scheduler.prefill_batch(self.prefixes.share(self.scheduler.running))
        if prefill:
            requests = [r for r, _ in prefill]
            try:
                hidden = self.runner.prefill([r.slot for r in requests],
                                             [r.prompt.rows[r.prefilled : r.prefilled + n] for r, n in prefill])
            except Exception as e:  # noqa: BLE001
                self._fail_all(requests, e)
            else:
                done = []
                self.counts["prompt_rows_prefilled"] += sum(n for _, n in prefill)
                for row, (request, n) in enumerate(prefill):
                    request.prefilled += n
                    if request.prefilled == request.prompt_length and not request.open:
                        request.status = Status.DECODING
                        done.append(row)
                if done:
                    parts.append(hidden[done])
                    ready.extend(requests[row] for row in done)
        return ready, torch.cat(parts) if parts else None

    def _advance(self, ready: list[EngineRequest], hidden: torch.Tensor) -> None:
        try:
            out = self.runner.step(hidden, [r.slot for r in ready])
        except Exception as e:  # noqa: BLE001
            self._fail_all(ready, e)
            return
        rows, frames = out.rows.cpu().numpy(), out.frames.cpu().numpy()
        self.failing.succeeded()  # after the copy: an asynchronous device error surfaces there
        has_frame, new_segment, finished = out.has_frame.tolist(), out.new_segment.tolist(), out.finished.tolist()
        waiting = out.waiting.tolist() if out.waiting is not None else [False] * len(ready)
        more = out.prompt_rows if out.prompt_rows is not None else [None] * len(ready)
        rewound = out.rewound if out.rewound is not None else [0] * len(ready)
        for i, request in enumerate(ready):
            # The row before this one went into the cache this step; `rows[:-1]` is what a request
            # has fed, so the new row is kept even when the request now ends (a session's context).
            request.rows.append(rows[i])
            request.steps += 1
            if request.sink_broken:  # its consumer went away
                self._end(request, Status.ABORTED, "aborted")
                continue
            if has_frame[i]:
                self._add_frame(request, frames[i][: frame_width(request)], new_segment[i])
            reason = self._finish_reason(request, finished[i])
            if reason is not None:
                self._end(request, Status.FINISHED, reason)
            elif more[i] is not None:  # back to prefill: the family continues the prompt
                self.runner.cache.lengths[request.slot] -= rewound[i]
                prompt = request.prompt
                request.prompt = Prompt(np.concatenate([prompt.rows, more[i]]), prompt.start_length, prompt.info)
                request.status = Status.PREFILL
            elif waiting[i]:
                request.waiting_input = True
                self.pipeline.flush_waiting(request)

    def _add_frame(self, request: EngineRequest, frame: np.ndarray, new_segment: bool) -> None:
        starts_clip = new_segment or not request.segment_lengths
        k = self._repeat_codebooks
        same = bool(request.frames) and np.array_equal(frame[:k], request.frames[-1][:k])
        request.repeats = request.repeats + 1 if same and not starts_clip else 0
        if starts_clip:
            request.segment_lengths.append(0)
        request.segment_lengths[-1] += 1
        request.frames.append(frame)
        self.pipeline.push(request, frame, starts_clip)

    def _finish_reason(self, request: EngineRequest, stopped: bool) -> str | None:
        if stopped:
            return "stop"
        if request.frame_bound is not None and request.steps >= request.frame_bound:
            return "runaway"
        if request.repeat_limit is not None and request.repeats + 1 >= request.repeat_limit:
            return "runaway"
        if request.steps >= request.max_new_frames:
            return "length"
        return None

    # ---- endings ---------------------------------------------------------------------------
    def _end(self, request: EngineRequest, status: Status, reason: str, error: str | None = None) -> None:
        """Take `request` out of the talker; a finished one's output drains through the codec,
        an aborted or failed one is dropped and closed at once."""
        if request.status.done:  # out of the talker, maybe still draining through the codec
            if status is not Status.FINISHED and not request.closed:
                self.codec.drop(request)
                self._close_as(request, status, reason, error)
            return
        running = request.status in (Status.PREFILL, Status.DECODING)
        with self._lock:
            self.scheduler.remove(request)
            keeps_slot = request.session is not None and self.sessions.end_turn(request, status)
        if running and request.slot >= 0 and not keeps_slot:
            self.runner.release(request.slot, self.prefixes.rows_to_keep(request, status))
        request.slot = -1
        request.status, request.finish_reason = status, reason
        if status is Status.FINISHED:
            self.pipeline.finish(request)
            if not request.decode_audio:
                self._close(request)
            return
        if running:
            self.pipeline.drop(request)
            self.codec.drop(request)
        self._close(request, error)

    def _fail_all(self, requests: list[EngineRequest], error: Exception) -> None:
        """A model call failed: so do the requests in it (bad input that fails its own request does not
        count toward `failing`: a client could make the server look broken)."""
        message = _message(error)
        self.failing.failed(message)
        for request in requests:
            self._end(request, Status.FAILED, "error", message)

    def _codec_done(self, request: EngineRequest) -> None:
        self._close(request)

    def _codec_failed(self, request: EngineRequest, message: str) -> None:
        """A chunk of `request` failed to decode (the codec has dropped it): end it at the next step."""
        with self._lock:
            request.ending = True
            self._endings.append((request, Status.FAILED, "error", message))
            self._lock.notify()

    def _close_as(self, request: EngineRequest, status: Status, reason: str, error: str | None) -> None:
        """Close a request that will not go through `_end`'s talker path, with this ending (unless the
        codec thread closed it first: its final chunk went out with the ending it had)."""
        with self._lock:
            if request.closed:
                return
            request.status, request.finish_reason = status, reason
        self._close(request, error)

    def _close(self, request: EngineRequest, error: str | None = None) -> None:
        with self._lock:
            if request.closed:
                return
            request.closed, request.error = True, error
            self._live.pop(request.id, None)
            self._lock.notify()  # room for a request the codec's backlog held back
            self.counts[{"aborted": "aborted", "error": "failed"}.get(request.finish_reason, "finished")] += 1
        n, width = len(request.frames), frame_width(request) or self.family.codebooks  # a reduced depth's K
        request.emit(AudioChunk(request.id, None, self.family.sample_rate, n, n,
                                np.zeros((0, width), dtype=np.int64), final=True,
                                finish_reason=request.finish_reason, error=error, refusal=request.refusal,
                                generation=request.generation(width, self.family.columns)))


def _message(error: Exception) -> str:
    return str(error) if isinstance(error, InvalidRequestError) else f"{type(error).__name__}: {error}"


def _no_codec() -> Codec:
    raise InvalidRequestError("this engine has no codec")
