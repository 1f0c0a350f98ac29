"""A request's life in the engine: waiting -> prefill -> decoding -> finished | aborted | failed."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import ChunkSchedule
from ..errors import InvalidRequestError, MossServeError
from ..models.family import Prompt
from ..sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (Status.FINISHED, Status.ABORTED, Status.FAILED)


@dataclass
class Generation:
    """What the talker produced for one request."""

    rows: np.ndarray  # (steps, columns): every row emitted, the stop row included
    frames: np.ndarray  # (F, codebooks): frames complete in the prompt, then generated ones
    segment_lengths: list[int]  # frames splits into clips decoded separately
    stopped: bool  # ended by the model, not by a cap or guard
    start_length: int  # prompt rows that belong to the audio (continuation prefix)
    finish_reason: str = "stop"  # stop | length | runaway | aborted | error
    error: str | None = None
    length_limit: int | None = None  # "length" at the engine's max_len (positions), not at the cap asked for


@dataclass
class AudioChunk:
    """A piece of one request's output, in order. `audio` is None for codes-only requests.

    frame_start..frame_end index the request's frames (continuation prefix frames first); the
    last chunk has `final` set, carries the finish reason and the whole `generation`, and may
    hold no frames.
    """

    request_id: str
    audio: np.ndarray | None  # float32 (channels, samples)
    sample_rate: int
    frame_start: int
    frame_end: int
    codes: np.ndarray  # (frame_end - frame_start, codebooks) int64
    segment: int = 0  # clips (split at all-pad gaps) are decoded separately
    final: bool = False
    finish_reason: str | None = None
    error: str | None = None
    refusal: InvalidRequestError | None = None  # a failed request's own input at fault
    generation: Generation | None = None

    def failure(self) -> MossServeError:
        """What a caller raises for this failed final chunk: its own input's refusal as itself (text
        pushed past the context, a piece its family refuses), so a front can tell the client's fault
        from the engine's; anything else as a MossServeError naming the request."""
        return self.refusal or MossServeError(f"request {self.request_id} failed: {self.error}")


Sink = Callable[[AudioChunk], None]


@dataclass
class EngineRequest:
    id: str
    prompt: Prompt
    sampling: SamplingParams
    sink: Sink
    max_new_frames: int
    length_limit: int | None = None  # the engine's max_len, when the room it leaves is the step cap
    frame_bound: int | None = None  # runaway guard on generated frames (None: off)
    repeat_limit: int | None = None  # runaway guard on one frame repeated (None: off)
    schedule: ChunkSchedule = field(default_factory=ChunkSchedule)
    decode_audio: bool = True
    status: Status = Status.WAITING
    slot: int = -1
    prefilled: int = 0  # prompt rows already in the cache
    steps: int = 0
    rows: list[np.ndarray] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # one (codebooks,) array per frame
    segment_lengths: list[int] = field(default_factory=list)
    repeats: int = 0  # how many times the newest frame repeats the one before it
    finish_reason: str | None = None
    error: str | None = None  # why it failed
    refusal: InvalidRequestError | None = None  # the fault, where its own input (admission, a pushed piece) failed it
    dropped: bool = False  # the codec delivers nothing more for it
    closed: bool = False  # its final chunk went out
    sink_broken: bool = False  # its consumer raised (went away): abort it
    session: object = None  # the Session (engine/sessions.py) this request is a turn of
    context_rows: int = 0  # leading prompt rows that are its session's earlier turns, fed again into a new slot
    text_tokens: int = 0  # text ids it speaks so far (pushed input adds to them): the runaway bound's measure
    open: bool = False  # its prompt may still grow (input streams in): it cannot start decoding yet
    inputs: list = field(default_factory=list)  # (piece, end) pushed, not yet handed to the family
    input_ended: bool = False  # its last input (end=True) was pushed: it takes no more
    input_tail: str = ""  # the end of its pushed text, to check the next piece's seam (Engine.push_input)
    ending: bool = False  # asked to end (abort) from another thread: it takes no more input
    waiting_input: bool = False  # its next row needs input that has not come yet
    plain: bool = False  # its cache positions 0.. will be its prompt rows 0.. (prefixes.plain_prompt, at admission)

    def emit(self, chunk: AudioChunk) -> None:
        """Hand a chunk to the consumer; a consumer that raises never takes an engine thread down."""
        try:
            self.sink(chunk)
        except Exception:  # noqa: BLE001 - the consumer's problem; the engine aborts the request
            self.sink_broken = True

    @property
    def prompt_length(self) -> int:
        return len(self.prompt.rows)

    def generation(self, codebooks: int, columns: int) -> Generation:
        return Generation(
            rows=np.stack(self.rows) if self.rows else np.zeros((0, columns), dtype=np.int64),
            frames=np.stack(self.frames).astype(np.int64) if self.frames else np.zeros((0, codebooks), dtype=np.int64),
            segment_lengths=list(self.segment_lengths),
            stopped=self.finish_reason == "stop",
            start_length=self.prompt.start_length,
            finish_reason=self.finish_reason or "stop",
            error=self.error,
            length_limit=self.length_limit if self.finish_reason == "length" else None,
        )
