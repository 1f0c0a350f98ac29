"""Stage 0 -> stage 1: frames leave the talker in chunks that follow each request's schedule.

A request's frames are grouped into chunks (a small first one for latency, larger ones after
it) and handed to the codec runner, which decodes every active stream's next chunk in one batch.
A clip that follows an all-pad gap starts a new codec stream, as the offline decode splits it.
In continuation, the prompt's own audio (the prefix) runs through the codec first, for its
context, and its samples are cut from the output.
Codes-only requests skip the codec: their chunks carry codes alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .request import AudioChunk, EngineRequest


@dataclass
class CodecWork:
    """One chunk of one request for the codec; `final` closes the request after it."""

    request: EngineRequest
    segment: int
    codes: np.ndarray  # (frames, codebooks), may be empty for a bare final
    frame_start: int
    trim: int  # frames whose audio is cut from the front of this chunk (continuation prefix)
    end_segment: bool = False
    final: bool = False


@dataclass
class OutputStream:
    pending: list[np.ndarray] = field(default_factory=list)
    pending_start: int = 0
    sent: int = 0  # frames handed on
    chunks: int = 0  # scheduled chunks handed on (the prefix does not count)
    segment: int = -1
    trim_left: int = 0  # prefix frames still to cut


def frame_width(request: EngineRequest) -> int | None:
    """Codebooks a request's frames hand on (`Prompt.info["codebooks"]`, e.g. a reduced depth,
    decoded with that many quantizers); None: all of the family's."""
    return request.prompt.info.get("codebooks")


class Pipeline:
    def __init__(self, submit, codebooks: int, sample_rate: int, max_chunk_frames: int) -> None:
        """submit(CodecWork) queues codec work; codes-only chunks go straight to the request."""
        self._submit, self.codebooks = submit, codebooks
        self.sample_rate, self.max_chunk_frames = sample_rate, max_chunk_frames
        self._streams: dict[str, OutputStream] = {}

    def __len__(self) -> int:
        """Requests whose output is open."""
        return len(self._streams)

    def start(self, request: EngineRequest, prefix: list[np.ndarray]) -> None:
        """Open the request's output; `prefix` holds the clips complete in its prompt."""
        # README 3.8 cuts the first waveform only for start_length > 0 (a prompt may give less)
        stream = self._streams[request.id] = OutputStream(trim_left=max(request.prompt.start_length, 0))
        for clip in prefix:
            for i, frame in enumerate(clip):
                self._add(request, stream, frame, new_segment=i == 0)
                if len(stream.pending) == self.max_chunk_frames:
                    self._flush(request, stream)
        if stream.pending:
            self._flush(request, stream)

    def push(self, request: EngineRequest, frame: np.ndarray, new_segment: bool) -> None:
        stream = self._streams[request.id]
        self._add(request, stream, frame, new_segment or stream.segment < 0)
        if len(stream.pending) >= request.schedule.size(stream.chunks):
            stream.chunks += 1
            self._flush(request, stream)

    def flush_waiting(self, request: EngineRequest) -> None:
        """The request waits for input (text still streaming in): hand on what it has, as a chunk
        of the schedule, rather than hold audio that exists until more text comes."""
        stream = self._streams[request.id]
        if stream.pending:
            stream.chunks += 1
            self._flush(request, stream)

    def finish(self, request: EngineRequest) -> None:
        """The talker is done with `request`: flush what is pending; with audio, the codec
        runner closes the request after its last chunk (codes only: the caller closes it)."""
        stream = self._streams.pop(request.id)
        self._flush(request, stream, final=True)

    def drop(self, request: EngineRequest) -> None:
        self._streams.pop(request.id, None)

    def _add(self, request: EngineRequest, stream: OutputStream, frame: np.ndarray, new_segment: bool) -> None:
        if new_segment:
            if stream.pending or stream.segment >= 0:
                self._flush(request, stream, end_segment=True)
            stream.segment += 1
            if stream.segment > 0:
                stream.trim_left = 0  # only the first clip holds the prefix
        if not stream.pending:
            stream.pending_start = stream.sent
        stream.pending.append(frame)

    def _flush(self, request: EngineRequest, stream: OutputStream, end_segment: bool = False, final: bool = False) -> None:
        codes = np.stack(stream.pending) if stream.pending else np.zeros((0, self.codebooks), dtype=np.int64)
        start = stream.pending_start if stream.pending else stream.sent
        stream.sent += len(stream.pending)
        stream.pending = []
        if not request.decode_audio:
            if len(codes):
                request.emit(AudioChunk(request.id, None, self.sample_rate, start, start + len(codes),
                                               codes.astype(np.int64), max(stream.segment, 0)))
            return
        if not len(codes) and not final:
            return
        trim = min(stream.trim_left, len(codes))
        stream.trim_left -= trim
        self._submit(CodecWork(request, max(stream.segment, 0), codes.astype(np.int64), start, trim,
                               end_segment=end_segment or final, final=final))
