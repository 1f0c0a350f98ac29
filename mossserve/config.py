"""EngineConfig: the limits, chunk schedule and guards an engine is built for."""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InvalidRequestError


@dataclass(frozen=True)
class ChunkSchedule:
    """Frames per audio chunk: a small first chunk for latency, larger ones after it for efficiency."""

    first: int = 2
    rest: int = 12

    def size(self, index: int) -> int:
        return self.first if index == 0 else self.rest

    def validate(self, max_chunk_frames: int) -> None:
        if not all(_integer(v) for v in (self.first, self.rest)) or not 1 <= self.first <= max_chunk_frames or not 1 <= self.rest <= max_chunk_frames:
            raise InvalidRequestError(f"chunk sizes must lie in 1..{max_chunk_frames} frames, got "
                                      f"first={self.first}, rest={self.rest}")


@dataclass(frozen=True)
class RunawayGuard:
    """Ends a generation that outgrows its text or loops on one frame, and reports it as "runaway".

    The frame bound is `min_frames + frames_per_token * text tokens` (speech runs about 3-4 frames
    per token; the default allows four times that), and at least `duration_factor` times a
    requested duration. A loop is `repeat_frames` frames in a row whose first `repeat_codebooks`
    codes are the same. Both grow by the pauses a text asks for (`[pause 3.2s]`, text/pauses.py).
    Sound effects have no text to bound them, so the guard skips them.
    Frame counts are at `frame_rate` (the MOSS codec's 12.5 Hz); the engine scales them to its
    family's rate (`at_frame_rate`), so that they mean the same seconds of audio for Fish's 21.5 Hz.
    """

    enabled: bool = True
    min_frames: int = 125
    frames_per_token: float = 15.0
    duration_factor: float = 2.0
    repeat_frames: int = 50  # the same frame this many times in a row: stuck (4 s at 12.5 Hz)
    repeat_codebooks: int = 4  # frames count as the same when their first codebooks agree (the fine ones may dither)
    frame_rate: float = 12.5  # the rate the frame counts above are given at

    def at_frame_rate(self, frame_rate: float) -> "RunawayGuard":
        """The same durations in frames of another rate."""
        f = frame_rate / self.frame_rate
        return replace(self, min_frames=round(self.min_frames * f), frames_per_token=self.frames_per_token * f,
                       repeat_frames=max(1, round(self.repeat_frames * f)), frame_rate=frame_rate)

    def frame_bound(self, text_tokens: int | None, duration_frames: int | None,
                    pauses: Sequence[float] = ()) -> int | None:
        """`pauses`: seconds of silence the text asks for (text/pauses.py), added to the bound."""
        if not self.enabled or text_tokens is None:
            return None
        bound = self.min_frames + int(self.frames_per_token * text_tokens) + round(sum(pauses) * self.frame_rate)
        if duration_frames:
            bound = max(bound, int(self.duration_factor * duration_frames) + self.min_frames)
        return bound

    def validate(self) -> None:
        """Each field's type and range (a zero or negative bound ended every request at once)."""
        if not isinstance(self.enabled, (bool, np.bool_)):
            raise InvalidRequestError(f"RunawayGuard.enabled must be True or False, got {self.enabled!r}")
        for name in ("min_frames", "repeat_frames", "repeat_codebooks"):
            value = getattr(self, name)
            if not _integer(value) or value < 1:
                raise InvalidRequestError(f"RunawayGuard.{name} must be an integer >= 1, got {value!r}")
        for name in ("frames_per_token", "duration_factor", "frame_rate"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
                raise InvalidRequestError(f"RunawayGuard.{name} must be a positive number, got {value!r}")

    def repeat_limit(self, pauses: Sequence[float] = ()) -> int:
        """Repeated frames that count as a loop: `repeat_frames` beyond the longest pause asked for."""
        return self.repeat_frames + round(max(pauses, default=0.0) * self.frame_rate)


@dataclass
class EngineConfig:
    max_running: int = 16  # requests decoding at once (KV cache slots)
    max_queued: int = 256  # requests that may wait for a slot: new work is refused past max_running + this
    max_len: int = 8192  # prompt + generated positions per request (capped by the model's limit); sizes the KV cache
    prefill_tokens: int = 512  # prompt tokens prefilled per engine step, so long prompts do not stall decoding
    # A new prompt whose first rows (at least this many) equal a prompt already in the cache copies
    # those rows' keys and values instead of computing them (the shared chat template); 0: never.
    shared_prefix_rows: int = 16
    chunk_schedule: ChunkSchedule = field(default_factory=ChunkSchedule)
    max_chunk_frames: int = 25  # the largest chunk a request's schedule may ask for
    max_sessions: int = 64  # open sessions (multi-turn contexts); idle ones give their slots up when needed
    codec_streams: int | None = None  # concurrent codec streams (default: 2 x max_running)
    runaway: RunawayGuard = field(default_factory=RunawayGuard)
    cuda_graphs: bool = True  # capture decode steps on CUDA
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    threaded: bool = True  # talker and codec on their own threads; False: `Engine.step()` drives both
    # The codec on a thread of its own (threaded only). None: on CUDA, where it overlaps the talker on
    # its own stream; on CPU the talker's thread decodes between steps: one OpenMP pool (docs/performance.md).
    codec_thread: bool | None = None

    def validate(self) -> None:
        """Each field's type and range, the field named in the message."""
        least = {"max_running": 1, "max_queued": 0, "max_len": 2, "prefill_tokens": 1, "shared_prefix_rows": 0,
                 "max_chunk_frames": 1, "max_sessions": 1}
        if self.codec_streams is not None:
            least["codec_streams"] = 0  # 0: the default, as None
        for name, bound in least.items():
            value = getattr(self, name)
            if not _integer(value) or value < bound:
                raise InvalidRequestError(f"EngineConfig.{name} must be an integer >= {bound}, got {value!r}")
        for name in ("threaded", "cuda_graphs") + (("codec_thread",) if self.codec_thread is not None else ()):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InvalidRequestError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name, kind in (("chunk_schedule", ChunkSchedule), ("runaway", RunawayGuard)):
            if not isinstance(getattr(self, name), kind):
                raise InvalidRequestError(f"EngineConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if self.codec_streams and self.codec_streams < self.max_running:
            # A request waiting for more text keeps its decoder stream open: with fewer streams than
            # running requests, waiting ones could hold them all and a finished request's audio never come.
            raise InvalidRequestError(f"EngineConfig.codec_streams must be 0 (the default, 2 x max_running) or at "
                                      f"least max_running ({self.max_running}), got {self.codec_streams}")
        self.chunk_schedule.validate(self.max_chunk_frames)
        self.runaway.validate()


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
