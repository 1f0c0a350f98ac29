"""`POST /v1/audio/speech`: OpenAI's speech API on the engine, whole, streamed or as SSE events.

A request is checked and queued before any byte is sent, so bad input and a full queue get a
proper status. After that, audio flows as the engine produces it; a client that goes away
aborts its request at once (a watcher listens for the disconnect instead of waiting for the
next write to fail), and so does the per-request timeout.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, replace

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from ..audio import MEDIA_TYPES, StreamEncoder, encode_audio, output_rate
from ..audio.tempo import TempoChange
from ..config import ChunkSchedule
from ..engine.async_engine import RequestStream
from ..engine.request import AudioChunk
from ..errors import MossServeError
from ..sampling import SamplingParams
from ..speech_request import SpeechRequest
from ..text.delay_requests import TASK_FIELDS
from .errors import APIError, error_event, from_mossserve, naming_field
from .metrics import StreamClock
from .references import PRESET_VOICES
from .schemas import BODY_FIELDS, SamplingFields, SpeechBody
from .state import ServerState

log = logging.getLogger("mossserve")

router = APIRouter()
ENDPOINT = "/v1/audio/speech"


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


@router.post(ENDPOINT)
async def speech(body: SpeechBody, request: Request) -> Response:
    state: ServerState = request.app.state.server
    clock = StreamClock(state.metrics, streamed=body.streamed)
    deadline = time.monotonic() + state.settings.request_timeout_s
    tempo = tempo_for(state, body.speed)
    stream = await submit(state, body)
    run = Run(state, stream, deadline, clock, watch_disconnect(request, state, stream), tempo, body.response_format)
    if body.stream_format == "sse":
        return StreamingResponse(run.sse(), media_type="text/event-stream",
                                 headers={**run.audio_headers(), "Cache-Control": "no-cache"})
    if body.streamed:
        return StreamingResponse(run.audio(), media_type=MEDIA_TYPES[body.response_format],
                                 headers=run.audio_headers())
    return await run.whole()


async def submit(state: ServerState, body: SpeechBody) -> RequestStream:
    """Check everything, resolve voices, and queue the request (or raise the APIError to send)."""
    if state.closing:
        raise shutting_down(state)
    if not state.accepts_model(body.model):
        raise APIError(404, f"model {body.model!r} is not served here; this server runs {state.model_name!r}",
                       param="model", code="model_not_found")
    texts = [("input", body.input), ("instructions", body.instructions), ("ref_text", body.ref_text)]
    texts += [(f"speakers[{i}].ref_text", s.ref_text) for i, s in enumerate(body.speakers or [])]
    for name, text in texts:  # before any tokenizing: a huge text holds the interpreter for seconds
        check_text_length(state, name, text)
    refuse_unused(state, body)
    try:
        speech_request = await to_speech_request(state, body)
        stream = state.engine.submit(speech_request, sampling_for(state, body), max_new_frames=body.max_new_tokens,
                                     schedule=schedule_for(state, body))
        return await stream
    except MossServeError as e:
        raise naming_field(from_mossserve(e, state.settings.retry_after_s), SpeechBody.model_fields) from None


def shutting_down(state: ServerState) -> APIError:
    """What new work is told once a stop signal came (serve/run.py): open requests drain, no new ones start."""
    return APIError(503, "the server is shutting down", code="shutting_down",
                    headers={"Retry-After": str(state.settings.retry_after_s)})


def check_text_length(state: ServerState, name: str, text: str | None) -> None:
    """--max-input-chars bounds every text field of a request, not only `input`."""
    limit = state.settings.max_input_chars
    if text is not None and len(text) > limit:
        raise APIError(400, f"{name} has {len(text)} characters; this server takes at most {limit} per field"
                            + (" (split longer text)" if name == "input" else ""),
                       param=name, code="input_too_long" if name == "input" else "text_too_long")


def refuse_unused(state: ServerState, body: SpeechBody) -> None:
    """A field the Delay model's task does not read, refused in the body's own name (the prompt builder
    speaks of SpeechRequest's: `voice` for ref_audio, `duration_tokens` for duration_seconds) and
    before any voice is resolved (ref_audio would go through the codec first). An OpenAI preset voice
    name means no voice, so every task takes it."""
    task = getattr(state.tts.talker, "default_task", None)
    if task is None:  # not a Delay model: its prompt builder names the fields it refuses
        return
    for field, names in BODY_FIELDS.items():
        if field in TASK_FIELDS[task]:
            continue
        for name in names:
            if getattr(body, name) is not None and not (name == "voice" and body.voice in PRESET_VOICES):
                per_speaker = task == "dialogue" and field in ("voice", "reference_text")
                hint = " (give voices per speaker in speakers)" if per_speaker else ""
                raise APIError(400, f"{name} is not used by the {task} task{hint}", param=name)


async def to_speech_request(state: ServerState, body: SpeechBody) -> SpeechRequest:
    voice, transcript = await state.resolver.main_voice(body)
    speakers = await state.resolver.speakers(body.speakers) if body.speakers is not None else None
    reference_text = body.ref_text
    if reference_text is None and state.tts.talker.voice_needs_transcript:
        reference_text = transcript
    return SpeechRequest(input=body.input, voice=voice, reference_text=reference_text, instructions=body.instructions,
                         duration_tokens=body.duration_tokens, duration_seconds=body.duration_seconds,
                         speakers=speakers, language=body.language, depth=body.depth,
                         chunk_length=body.chunk_length)


def sampling_for(state: ServerState, body: SamplingFields) -> SamplingParams:
    """The model's settings with the request's overrides on the audio heads; temperature 0 is greedy
    everywhere (the text head too), so it means what it says."""
    return state.tts.sampling(body.temperature == 0, audio_temperature=body.temperature, audio_top_p=body.top_p,
                              audio_top_k=body.top_k, audio_repetition_penalty=body.repetition_penalty, seed=body.seed)


def schedule_for(state: ServerState, body: SamplingFields, code: str | None = None) -> ChunkSchedule | None:
    """The engine's chunk schedule with the request's first chunk size (`code`: the error's code)."""
    if body.initial_chunk_frames is None:
        return None
    config = state.tts.engine_config
    if body.initial_chunk_frames > config.max_chunk_frames:
        raise APIError(400, f"initial_chunk_frames must lie in 1..{config.max_chunk_frames}, "
                            f"got {body.initial_chunk_frames}", param="initial_chunk_frames", code=code)
    return ChunkSchedule(first=body.initial_chunk_frames, rest=config.chunk_schedule.rest)


def tempo_for(state: ServerState, speed: float) -> TempoChange | None:
    """`speed` other than 1: the models speak at their own pace, so their audio is time-stretched."""
    codec = state.tts.codec
    return TempoChange(speed, codec.sample_rate, codec.channels) if speed != 1.0 else None


def at_speed(chunk: AudioChunk, tempo: TempoChange) -> AudioChunk:
    """The chunk's audio through the request's tempo change; the final chunk also carries its tail."""
    audio = tempo.write(chunk.audio if chunk.audio is not None else np.zeros((tempo.channels, 0), np.float32))
    if chunk.final:
        audio = np.concatenate([audio, tempo.close()], axis=-1)
    return replace(chunk, audio=audio)


def watch_disconnect(request: Request, state: ServerState, stream: RequestStream) -> asyncio.Task:
    """Abort the request the moment its client disconnects (the body has been read, so the next
    ASGI message can only be the disconnect)."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        state.engine.abort(stream.request_id)

    return asyncio.create_task(watch())


@dataclass
class Run:
    """One queued request on its way to the client."""

    state: ServerState
    stream: RequestStream
    deadline: float
    clock: StreamClock
    watcher: asyncio.Task
    tempo: TempoChange | None  # `speed` other than 1
    format: str  # the response_format
    counted: bool = False  # its outcome is in the metrics
    final: AudioChunk | None = None  # its final chunk, once it came

    def headers(self) -> dict[str, str]:
        return {"X-Request-Id": self.stream.request_id}

    def audio_headers(self) -> dict[str, str]:
        """An audio response's headers: X-Sample-Rate, which raw pcm has no other way to say (OpenAI's
        clients assume 24 kHz; Fish S2 Pro's is 44.1 kHz)."""
        rate = output_rate(self.format, self.state.tts.codec.sample_rate)
        return {**self.headers(), "X-Sample-Rate": str(rate)}

    async def chunks(self, count_ok: bool = True):
        """The request's chunks until the final one; raises ClientGone, or APIError on timeout or failure.
        Without `count_ok` a request that ends well is left for the caller to count (its body may still fail)."""
        try:
            while True:
                left = self.deadline - time.monotonic()
                # Past the deadline a chunk already made is still sent: the timeout stops work still
                # running, not a reader that fell behind (a timeout <= 0 raised before looking).
                try:
                    chunk: AudioChunk = await asyncio.wait_for(anext(self.stream),
                                                               None if left <= 0 and self.stream.ready() else left)
                except (TimeoutError, asyncio.TimeoutError):
                    raise self.failed(504, f"the request ran past the server's "
                                           f"{self.state.settings.request_timeout_s:g} s timeout and was stopped",
                                      "timeout") from None
                except MossServeError as e:
                    raise self.failed(500, str(e), "generation_failed") from None
                if self.tempo is not None:  # off the event loop, as the encoders are (ms per second of audio)
                    chunk = await asyncio.to_thread(at_speed, chunk, self.tempo)
                if chunk.final:
                    self.final = chunk
                yield chunk
                if chunk.final:
                    if chunk.finish_reason == "aborted":
                        if not self.watcher.done():  # not its client: the server aborted it (shutting down)
                            log.warning("request %s: aborted by the server", self.stream.request_id)
                        self.count("disconnected" if self.watcher.done() else "error")
                        raise ClientGone()
                    if count_ok:
                        self.count("ok")
                    return
        finally:
            self.watcher.cancel()
            await self.stream.aclose()

    def failed(self, status: int, message: str, code: str) -> APIError:
        """The error that ends the request, logged in one line; it names the request, as its headers do."""
        log.warning("request %s: %d %s: %s", self.stream.request_id, status, code, message)
        return APIError(status, message, code=code, headers=self.headers())

    def bug(self, error: Exception) -> APIError:
        """A bug (an unexpected exception) while the request runs: logged with its traceback, answered as 500."""
        log.error("request %s: internal error", self.stream.request_id, exc_info=error)
        return APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error",
                        headers=self.headers())

    def ended_by(self, error: Exception) -> APIError:
        """A streamed response's failure after its headers, counted: an APIError (logged where raised),
        or a bug."""
        error = error if isinstance(error, APIError) else self.bug(error)
        self.count(outcome_for(error.status_code))
        return error

    def count(self, outcome: str) -> None:
        """Count the request's outcome, once (a stream the server cancels may end through two paths)."""
        if not self.counted:
            self.counted = True
            self.state.metrics.requests.labels(ENDPOINT, outcome).inc()

    async def whole(self) -> Response:
        pieces = []
        try:
            async for chunk in self.chunks(count_ok=False):  # counted once its body is made: that may fail
                if chunk.audio is not None:
                    pieces.append(chunk.audio)
            final = self.final
            channels = self.state.tts.codec.channels
            samples = np.concatenate(pieces, axis=-1) if pieces else np.zeros((channels, 0), np.float32)
            data = await asyncio.to_thread(encode_audio, samples, final.sample_rate, self.format)
            self.count("ok")
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except asyncio.CancelledError:  # a front that cancels when its client leaves (Ray's proxy)
            self.count("disconnected")
            raise
        except APIError:
            raise
        except Exception as e:
            raise self.bug(e) from None
        seconds = samples.shape[-1] / final.sample_rate
        self.clock.sent(data, seconds)  # the body goes out as this returns
        self.clock.finish()
        return Response(data, media_type=MEDIA_TYPES[self.format],
                        headers={**self.audio_headers(), "X-Finish-Reason": final.finish_reason or "stop",
                                 "X-Audio-Seconds": f"{seconds:.3f}"})

    async def audio(self):
        """Encoded bytes as they are produced; a failure mid-stream ends the connection without
        the final chunk, so the client sees an incomplete body rather than a short file."""
        try:
            async for data in self.encoded():
                yield data
        except ClientGone:
            return
        except (asyncio.CancelledError, GeneratorExit):  # the server saw the client go and stopped the stream
            self.count("disconnected")
            raise
        except Exception as e:  # after the headers: only dropping the connection tells the client
            raise StreamCut(self.ended_by(e).message) from None
        self.clock.finish()

    async def encoded(self):
        """The request's audio encoded as it comes (off the event loop), then the encoder's tail; each
        piece is sent as it is yielded, so it is timed and counted then (an encoder may hold audio back)."""
        encoder = None
        async for chunk in self.chunks():
            encoder = encoder or StreamEncoder(self.format, chunk.sample_rate, self.state.tts.codec.channels)
            if chunk.audio is not None and chunk.audio.shape[-1]:
                data = await asyncio.to_thread(encoder.write, chunk.audio)
                self.clock.sent(data, chunk.audio.shape[-1] / chunk.sample_rate, encoder.audio_out)
                if data:
                    yield data
        if encoder is not None and (tail := await asyncio.to_thread(encoder.close)):
            self.clock.sent(tail, 0.0, encoder.audio_out)
            yield tail

    async def sse(self):
        """OpenAI's `speech.audio.delta` events (base64 of the encoded bytes), then `speech.audio.done`."""
        try:
            async for data in self.encoded():
                yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        except ClientGone:
            return
        except (asyncio.CancelledError, GeneratorExit):  # the server saw the client go and stopped the stream
            self.count("disconnected")
            raise
        except Exception as e:
            error = self.ended_by(e)
            yield _event(error_event(error.status_code, error.message, error.code))
            return
        self.clock.finish()
        final = self.final
        # the frames generated: a continuation's prompt audio comes first in the request's frames
        frames = max(final.frame_end - final.generation.start_length, 0) if final is not None else 0
        prompt = self.stream.prompt  # as queued: a Fish request's later text batches are its later_rows
        prompt_rows = len(prompt.rows) + prompt.later_rows
        yield _event({"type": "speech.audio.done", "finish_reason": final.finish_reason,
                      "usage": {"input_tokens": prompt_rows, "output_tokens": frames,
                                "total_tokens": prompt_rows + frames}})


class StreamCut(Exception):
    """Raised out of a streamed body to drop its connection (the client then sees an incomplete body);
    the server logs it in one line (above), so `quiet_stream_cuts` keeps uvicorn from logging it again
    as an application error with its traceback."""


class _NoStreamCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        while error is not None and not isinstance(error, StreamCut):  # Starlette may wrap it (raise ... from)
            error = error.__cause__
        return error is None


def quiet_stream_cuts(server_logger: str = "uvicorn.error") -> None:
    """The server's logger (uvicorn's; a Ray replica's is Serve's) leaves out a StreamCut's traceback:
    the cut request has its own line in the mossserve log."""
    server_log = logging.getLogger(server_logger)
    if not any(isinstance(f, _NoStreamCuts) for f in server_log.filters):
        server_log.addFilter(_NoStreamCuts())


def outcome_for(status: int) -> str:
    """The metrics label of a request refused or failed with `status`."""
    if status == 499:  # the client closed the connection (nginx's code)
        return "disconnected"
    if status in (429, 503):
        return "rejected"
    if status == 504:
        return "timeout"
    return "client_error" if status < 500 else "error"


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
