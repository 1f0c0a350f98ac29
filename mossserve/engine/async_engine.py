"""`AsyncEngine`: the engine for asyncio callers (the HTTP server, voice agents).

    engine = AsyncEngine.from_pretrained("OpenMOSS-Team/MOSS-TTS", device="cuda", dtype="bfloat16")
    async with engine.submit(SpeechRequest(input="Hello.", voice="me.wav")) as stream:
        async for chunk in stream:
            ...     # AudioChunk: audio, sample_rate, frame range, codes; the last one is `final`

`await engine.submit(...)` (or entering `async with`) returns the stream once the request is
queued, so bad input and a full queue raise there (before a server has sent a byte); reference
voices are encoded through the speaker cache first, where concurrent requests with the same voice
share one encode and cold voices arriving together are encoded in one batch. Leaving the `async
with` block, or `stream.aclose()`, aborts a request that has not ended. A `break` out of `async for`
alone does not: a stream is an async iterator, not a generator, so nothing closes it, and its
request runs on until the stream is collected (at once for `async for chunk in engine.submit(...)`,
whose stream nothing else holds).
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from ..config import ChunkSchedule, EngineConfig
from ..errors import EngineClosedError, MossServeError
from ..models.family import Prompt
from ..sampling import SamplingParams
from ..speech_request import SpeechRequest
from .request import AudioChunk


class RequestStream:
    """The chunks of one request, in order; raises MossServeError if the request fails. An aborted
    request (`AsyncEngine.abort`, `close_session`) is no failure here: its final chunk says "aborted"
    and carries the generation so far (`TTS.stream` raises RequestAborted instead; docs/engine.md).

    `async for chunk in engine.submit(...)`, `stream = await engine.submit(...)` and `async with
    engine.submit(...) as stream` all work; awaiting (or entering) first raises bad input or a full
    queue before any chunk is read, and leaving the `async with` block aborts the request."""

    def __init__(self, engine: "AsyncEngine", loop: asyncio.AbstractEventLoop) -> None:
        self.request_id: str | None = None
        self.prompt: Prompt | None = None  # set once the request is queued
        self._engine, self._chunks, self._done = engine, asyncio.Queue(), False
        self._loop = loop  # the engine's threads hand chunks to this loop only
        self._started: asyncio.Future | None = None

    def __await__(self):
        yield from self._started.__await__()
        return self

    def __aiter__(self) -> "RequestStream":
        return self

    async def __aenter__(self) -> "RequestStream":
        """`async with engine.submit(...) as stream:` (`await` before it is optional): queued on entry."""
        return await self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()  # a request left before its end is aborted

    async def __anext__(self) -> AudioChunk:
        if asyncio.get_running_loop() is not self._loop:  # its chunks would never come: not a silent hang
            raise RuntimeError("a stream is read in the event loop that submitted it (this one is another)")
        await self._started
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._engine.next_chunk(self._chunks, bool(self.prompt.info.get("open")))
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if chunk.final:
            self._done = True
            if chunk.error is not None:
                raise chunk.failure()
        return chunk

    def ready(self) -> bool:
        """Whether the next chunk is made already (reading it waits for no engine work)."""
        return not self._chunks.empty()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            if self.request_id is not None:  # else `_start` aborts it once queued
                self._engine.abort(self.request_id)

    def __del__(self) -> None:
        # Breaking out of `async for` closes nothing on an async iterator that is not a generator:
        # a stream collected before its end aborts its request.
        if not self._done and self.request_id is not None:
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, tts) -> None:
        """`tts`: a `mossserve.TTS`, whose talker, codec, speaker cache and engine this one drives."""
        self.tts = tts

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, codec: str | Path | None = None, device: str = "cpu",
                        dtype: str = "float32", config: EngineConfig | None = None,
                        task: str | None = None) -> "AsyncEngine":
        """As `TTS.from_pretrained` (`task`: which Delay model a checkpoint whose name does not say is)."""
        from ..api import TTS

        return cls(TTS.from_pretrained(model, codec, device=device, dtype=dtype, engine_config=config, task=task))

    def submit(self, request: SpeechRequest | Prompt | str, sampling: SamplingParams | None = None, *,
               request_id: str | None = None, max_new_frames: int | None = None,
               schedule: ChunkSchedule | None = None, decode_audio: bool = True,
               session: str | None = None) -> RequestStream:
        """Queue a request (from a running event loop); iterate the result for its chunks. With
        `session`, the request is that session's next turn (docs/engine.md, "Sessions")."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("AsyncEngine.submit must be called from a running event loop (async code); "
                               "synchronous code calls TTS.stream or TTS.synthesize") from None
        stream = RequestStream(self, loop)
        stream._started = loop.create_task(self._start(stream, request, sampling, request_id, max_new_frames,
                                                       schedule, decode_audio, session))
        # A refused request raises when the stream is iterated; one never iterated logs nothing.
        stream._started.add_done_callback(lambda task: task.cancelled() or task.exception())
        return stream

    async def _start(self, stream: RequestStream, request: SpeechRequest | Prompt | str, sampling: SamplingParams | None,
                     request_id: str | None, max_new_frames: int | None, schedule: ChunkSchedule | None,
                     decode_audio: bool, session: str | None) -> None:
        prompt = request if isinstance(request, Prompt) else await self.prompt(request)
        stream.prompt = prompt
        loop, chunks = stream._loop, stream._chunks

        def sink(chunk: AudioChunk) -> None:  # called on an engine thread
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        default = self.tts.talker.default_sampling()
        handle = self.tts.engine.add_request(prompt, default if sampling is None else sampling, sink,
                                             request_id=request_id, max_new_frames=max_new_frames,
                                             schedule=schedule, decode_audio=decode_audio, session=session)
        stream.request_id = handle.id
        if stream._done:  # closed while it was being queued
            self.abort(handle.id)

    async def next_chunk(self, chunks: asyncio.Queue, open_prompt: bool = False) -> AudioChunk:
        """The next chunk of a stream. An unthreaded engine (`EngineConfig(threaded=False)`) runs only
        when stepped: its streams step it (on a worker thread) until their chunk comes. With nothing to
        step, an open prompt waits for its input (`push_input`, which nothing here can await)."""
        while not self.tts.engine_config.threaded and chunks.empty():
            # A step's chunks reach `chunks` through this loop (before the step's own result does).
            stepped = await asyncio.to_thread(self.tts.step_until, lambda: not chunks.empty())
            if not stepped and chunks.empty():
                if not open_prompt:
                    raise MossServeError("the engine has nothing left to run, but the request has not ended")
                await asyncio.sleep(0.02)
        return await chunks.get()

    async def prompt(self, request: SpeechRequest | str) -> Prompt:
        """The request's prompt (a plain string is `SpeechRequest(input=...)`), its audio voices
        encoded through the speaker cache (all at once)."""
        from ..api import as_speech_request

        request = as_speech_request(request)
        paths = voice_paths(request)
        codes = dict(zip(paths, await asyncio.gather(*(self.encode_voice(p) for p in paths))))
        return await asyncio.to_thread(self.tts.talker.build_prompt, request, lambda path: codes[Path(path)])

    async def encode_voice(self, source: str | Path | bytes) -> np.ndarray:
        """Reference audio -> codes (frames, codebooks), cached by content."""
        future = await asyncio.to_thread(self.tts.speakers.request, source)
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> bool:
        """End a request now; False if it is unknown or over (or the engine is closed: all are over)."""
        try:
            return self.tts.engine.abort(request_id)
        except EngineClosedError:
            return False

    def problem(self) -> str | None:
        """Why the engine cannot serve although it is open (`Engine.problem`); None while it can, or once
        it is closed (a shutdown, which callers tell apart)."""
        try:
            return self.tts.engine.problem()
        except EngineClosedError:
            return None

    def push_input(self, request_id: str, piece: object = None, end: bool = False) -> bool:
        """Input for a running request whose prompt is open (a turn's text arriving while it speaks)."""
        return self.tts.engine.push_input(request_id, piece, end)

    def close_session(self, session_id: str) -> bool:
        return self.tts.engine.close_session(session_id)

    def session_context(self, session_id: str) -> int:
        return self.tts.engine.session_context(session_id)

    def stats(self) -> dict:
        """Running and queued requests, cache slots in use, codec streams, speaker cache."""
        return self.tts.stats()

    def close(self) -> None:
        self.tts.close()

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.close)  # joining the engine's threads must not stall the event loop


def voice_paths(request: SpeechRequest) -> list[Path]:
    """The audio files a request's voices point at (codes need no encoding)."""
    voices = [request.voice] + [s.voice for s in request.speakers or []]
    return list(dict.fromkeys(Path(v) for v in voices if isinstance(v, (str, Path))))
