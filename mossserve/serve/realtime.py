"""`ws /v1/realtime/speech`: a voice agent's speech session on a model with sessions (Realtime).

The client streams the assistant's text as it is written; the server streams audio back as soon
as it exists, turn after turn, in one engine session whose context (earlier turns' text, user
audio and generated audio) stays in the KV cache. JSON messages, one per frame:

client -> server
  session.update  {"session": {voice | voice_codes, response_format, speed, seed, temperature, top_p,
                   top_k, repetition_penalty, initial_chunk_frames, include_codes}, "new_context"}
  turn.start      {user_text, user_audio (base64 / data URL / stored voice) | user_audio_codes}
  text.delta      {"delta": "..."} or {"tokens": [ids]}  (starts a turn with no user turn if none is open;
                  a turn's text is all deltas or all tokens; an empty one changes nothing)
  text.done       the turn's text is complete (more text before its audio.done: turn_in_progress)
  turn.cancel     stop the turn now (the session goes on; the next message may follow at once)
server -> client
  session.created {session_id, model, sample_rate, response_format}
  turn.started    {turn_id}
  audio.delta     {turn_id, audio: base64 bytes of response_format[, codes]}
  audio.done      {turn_id, finish_reason, frames}  (the turn is over: after its text.done or turn.cancel
                  once it has text, even when the model stopped first)
  error           {error: {message, type, code}}  (the session goes on; `type` as the HTTP status's)

Sessions on one model are batched together by the engine like any other requests.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import Field, ValidationError

from ..audio import StreamEncoder
from ..errors import ContextFullError, InvalidRequestError, MossServeError, SessionLimitError
from ..text.realtime_session import RealtimeTurn
from .errors import APIError, describe_validation, error_event, from_mossserve
from .origins import origin_allowed
from .references import PRESET_VOICES
from .schemas import (
    Body,
    FirstChunkFrames,
    RepetitionPenalty,
    ResponseFormat,
    Seed,
    Speed,
    Temperature,
    TopK,
    TopP,
)
from .speech import at_speed, check_text_length, outcome_for, sampling_for, schedule_for, shutting_down, tempo_for
from .state import ServerState
from .voices import is_voice_name

router = APIRouter()
Codes = list[list[int]]


class SessionSettings(Body):
    voice: Annotated[str, Field(min_length=1)] | None = None  # a stored voice, base64 or a data URL
    voice_codes: Codes | None = None  # (T, 16) time-major
    response_format: ResponseFormat = "pcm"
    seed: Seed | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    initial_chunk_frames: FirstChunkFrames | None = None
    include_codes: bool = False
    speed: Speed = 1.0


class SessionUpdate(Body):
    type: Literal["session.update"]
    session: SessionSettings = SessionSettings()
    new_context: bool = False


class TurnStart(Body):
    type: Literal["turn.start"]
    user_text: Annotated[str, Field(min_length=1)] | None = None
    user_audio: Annotated[str, Field(min_length=1)] | None = None
    user_audio_codes: Codes | None = None


class TextDelta(Body):
    type: Literal["text.delta"]
    delta: str | None = None
    tokens: list[int] | None = None


class Simple(Body):
    type: Literal["text.done", "turn.cancel"]


KEY_PROTOCOL = "mossserve-api-key."  # + the key, where it is an HTTP token
KEY_B64_PROTOCOL = "mossserve-api-key-b64."  # + the key's UTF-8 as base64url without padding: any key
KINDS = {"session.update": SessionUpdate, "turn.start": TurnStart, "text.delta": TextDelta,
         "text.done": Simple, "turn.cancel": Simple}


ENDPOINT = "/v1/realtime/speech"


@router.websocket(ENDPOINT)
async def realtime_speech(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.server
    if not origin_allowed(websocket.headers, state.settings.cors_origins, "a realtime socket"):
        await websocket.close(code=1008, reason=f"origin {websocket.headers['origin']!r} may not open a realtime "
                                                "session here (--cors-origin)")
        return
    if not _authorized(state, websocket):
        await websocket.close(code=1008, reason="missing or invalid API key (Authorization: Bearer <key>, "
                                                f"or the subprotocol {KEY_PROTOCOL}<key>)")
        return
    await websocket.accept(subprotocol=_key_protocol(websocket))
    if not state.tts.talker.supports_sessions:
        await websocket.send_json(_error(f"{state.model_name} has no realtime sessions; use /v1/audio/speech",
                                         "unsupported_model"))
        await websocket.close(code=1003)
        return
    await RealtimeSession(state, websocket).run()


class RealtimeSession:
    def __init__(self, state: ServerState, websocket: WebSocket) -> None:
        self.state, self.ws = state, websocket
        self.settings = SessionSettings()
        self.voice = None  # (T, 16) codes of the session's voice
        self.id = f"ws-{uuid.uuid4().hex}"  # the engine session's, kept by new_context (a fresh one of the same id)
        self.first = True  # the next turn opens the context (system prompt, voice)
        self.turn_id: str | None = None  # the open turn
        self.request_id: str | None = None
        self.sender: asyncio.Task | None = None
        self.sending: str | None = None  # the turn whose sender has started (it counts its turn's outcome)
        self.turns = 0
        self.pushed = 0  # characters (or ids) of text the turn has been given
        self.tokens = False  # the turn's text came as ids (text.delta tokens), not as text
        self.text_done = False  # the turn's text is complete
        self.client_ended = asyncio.Event()  # the client is done with the turn: text.done, turn.cancel or timeout
        self.last_input = 0.0  # monotonic time of the turn's latest text
        self.watchdog: asyncio.Task | None = None
        self.ended_by: str | None = None  # the open turn's outcome when the server or client ends it early

    async def run(self) -> None:
        await self.send({"type": "session.created", "session_id": self.id, "model": self.state.model_name,
                         "sample_rate": self.state.tts.codec.sample_rate,
                         "response_format": self.settings.response_format})
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    if message.get("text") is None:
                        raise APIError(400, "messages are JSON text frames, not binary ones", code="bad_message")
                    await self.handle(await _parsed(message["text"]))
                except SessionLimitError:  # the engine's message names a Python call a socket cannot make
                    await self.refused(APIError(503, f"the server holds as many realtime sessions as it takes "
                                                     f"({self.state.tts.engine.config.max_sessions}): "
                                                     "retry the turn when another socket has closed",
                                                code="queue_full"))
                except MossServeError as e:
                    await self.refused(from_mossserve(e, self.state.settings.retry_after_s))
                except APIError as e:
                    await self.refused(e)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client left (RuntimeError: a send after the close)
        finally:
            if self.turn_id is not None and self.sending != self.turn_id:
                self.count("disconnected")  # the socket left before the turn's sender ever ran: it counts none
            for task in (self.sender, self.watchdog):
                if task is not None:
                    task.cancel()
            self.state.engine.close_session(self.id)

    async def refused(self, error: APIError) -> None:
        """A message refused: counted by its status and answered with an error event."""
        self.count(outcome_for(error.status_code))
        await self.send(_error(error.message, error.code, error.status_code))

    async def handle(self, data: object) -> None:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in KINDS:
            raise APIError(400, f"unknown message type {kind!r}; expected one of {', '.join(KINDS)}", code="bad_message")
        self.refuse_long_codes(data)
        try:
            message = KINDS[kind].model_validate(data)
        except ValidationError as e:
            raise APIError(400, describe_validation(e.errors())[0], code="bad_message") from None
        if isinstance(message, SessionUpdate):
            await self.update(message)
        elif isinstance(message, TurnStart):
            await self.start_turn(message)
        elif isinstance(message, TextDelta):
            await self.text(message)
        elif message.type == "text.done":
            await self.settle()
            self.refuse_after_text_done()
            if self.turn_id is not None and not self.pushed:  # the engine would fail the turn: nothing to say
                raise APIError(400, "the turn has no text yet: send text.delta before text.done (or turn.cancel)",
                               code="no_text")
            self.push(None, end=True)
            self.text_done = True
            self.client_ended.set()
        else:
            self.cancel()

    async def settle(self) -> None:
        """A turn that was cancelled or timed out is over for the client, but the engine ends it at
        its next step: wait for that (and its audio.done), so that what the client sends next (a
        barge-in's new text, say) goes to a new turn instead of into the ending one."""
        if self.turn_id is not None and self.ended_by is not None and self.sender is not None:
            await asyncio.wait({self.sender})

    def refuse_after_text_done(self) -> None:
        if self.turn_id is not None and self.text_done:
            raise APIError(400, "the turn's text is complete (text.done): send more after its audio.done, as the "
                                "next turn, or turn.cancel", code="turn_in_progress")

    async def update(self, message: SessionUpdate) -> None:
        await self.settle()
        if self.turn_id is not None:
            raise APIError(400, "a turn is in progress: update the session between turns", code="turn_in_progress")
        settings = message.session
        given = settings.model_fields_set
        updated = self.settings.model_copy(update={k: getattr(settings, k) for k in given})
        try:  # refused now (nothing changes), not at every later turn
            sampling_for(self.state, updated)
            schedule_for(self.state, updated, code="bad_message")
        except InvalidRequestError as e:
            raise APIError(400, str(e), code="bad_message") from None
        if given & {"voice", "voice_codes"} and not (self.first or message.new_context):
            raise APIError(400, "the voice is set before the context's first turn (send new_context to change it)",
                           code="voice_fixed")
        if "seed" in given and settings.seed != self.settings.seed and not (self.first or message.new_context):
            raise APIError(400, "the seed is set before the context's first turn, which seeds the whole context as "
                                "the reference does (send new_context to change it)", code="seed_fixed")
        voice = self.voice
        if given & {"voice", "voice_codes"}:
            voice = await self.codes(settings.voice, settings.voice_codes, "voice")
            if voice is not None:
                await self.check_voice_fits(voice, "voice_codes" if "voice_codes" in given else "voice")
        if message.new_context:  # the next turn opens the id's session afresh (engine.close_session)
            self.state.engine.close_session(self.id)
            self.first = True
        self.voice, self.settings = voice, updated

    async def check_voice_fits(self, voice: np.ndarray, name: str) -> None:
        """A voice no turn could run with is refused with the update (every turn after it failed): past
        --max-voice-seconds, as an uploaded voice would be, or with a first turn past the engine's length."""
        talker, max_len = self.state.tts.talker, self.state.tts.engine.max_len
        self.check_seconds(voice, name, "voice")
        prompt = await asyncio.to_thread(talker.open_turn_prompt, RealtimeTurn(), True, voice.T)
        if len(prompt.rows) >= max_len:
            raise APIError(400, f"{name}: a first turn with this voice holds {len(prompt.rows)} positions before "
                                f"any text; this engine allows {max_len}", code="bad_message")

    async def start_turn(self, message: TurnStart | None) -> None:
        await self.settle()
        if self.turn_id is not None:
            raise APIError(400, "a turn is in progress: send text.done and wait for audio.done, or turn.cancel",
                           code="turn_in_progress")
        if self.state.closing:
            raise shutting_down(self.state)
        user_audio = None
        if message is not None:
            check_text_length(self.state, "user_text", message.user_text)
            user_audio = await self.codes(message.user_audio, message.user_audio_codes, "user_audio")
            if message.user_audio_codes is not None:  # audio that long is refused when it is encoded
                self.check_seconds(user_audio, "user_audio_codes", "audio")
            if user_audio is not None and message.user_text is None:
                raise APIError(400, "user_audio needs user_text (the user turn has both)", code="bad_message")
        turn = RealtimeTurn(user_text=message.user_text if message else None,
                            user_audio=None if user_audio is None else user_audio.T)  # (16, T): unambiguous
        talker, s = self.state.tts.talker, self.settings
        prompt = await asyncio.to_thread(talker.open_turn_prompt, turn, self.first,
                                         None if self.voice is None else self.voice.T)
        try:
            stream = await self.state.engine.submit(prompt, sampling_for(self.state, s), session=self.id,
                                                    schedule=schedule_for(self.state, s, code="bad_message"))
        except ContextFullError as e:
            raise _context_full(e) from None
        self.first, self.turns, self.pushed, self.text_done = False, self.turns + 1, 0, False
        self.turn_id, self.request_id, self.ended_by = f"turn-{self.turns}", stream.request_id, None
        self.client_ended = asyncio.Event()
        self.last_input = time.monotonic()
        await self.send({"type": "turn.started", "turn_id": self.turn_id})
        self.sender = asyncio.create_task(self.send_audio(stream, self.turn_id))
        if self.watchdog is not None:  # the last turn's, over by now
            self.watchdog.cancel()
        self.watchdog = asyncio.create_task(self.end_if_text_stops(self.turn_id, self.request_id, self.client_ended))

    async def end_if_text_stops(self, turn_id: str, request_id: str, client_ended: asyncio.Event) -> None:
        """A turn whose text stops coming holds a batch slot while it waits: after --request-timeout
        seconds without text (and no text.done) it is ended, as an HTTP request would be (`client_ended`:
        this turn's, which the next turn's replaces while the error is being sent)."""
        timeout = self.state.settings.request_timeout_s
        while self.turn_id == turn_id and not client_ended.is_set():  # text.done, turn.cancel
            wait = self.last_input + timeout - time.monotonic()
            if wait <= 0:
                self.ended_by = "timeout"
                await self.send(_error(f"no text for {timeout:g} s: the turn is ended", "turn_timeout", 504))
                self.state.engine.abort(request_id)
                client_ended.set()
                return
            try:  # woken by the client's end of the turn: each turn's watchdog ends with its turn
                await asyncio.wait_for(client_ended.wait(), wait)
            except TimeoutError:
                pass

    async def text(self, message: TextDelta) -> None:
        if (message.delta is None) == (message.tokens is None):
            raise APIError(400, "text.delta carries delta (text) or tokens (ids), one of them", code="bad_message")
        piece = message.delta if message.delta is not None else message.tokens
        if not piece:  # no text: opens no turn (an LLM's stream often begins with an empty delta)
            return
        await self.settle()
        self.refuse_after_text_done()
        limit = self.state.settings.max_input_chars
        if (self.pushed if self.turn_id is not None else 0) + len(piece) > limit:  # --max-input-chars
            raise APIError(400, f"a turn takes at most {limit} characters (or ids) of text; end it and send "
                                "the rest in the next", code="text_too_long")
        try:  # before a turn opens for it: a refused piece changes nothing
            self.state.tts.talker.check_input(piece)
        except InvalidRequestError as e:
            raise APIError(400, str(e), code="bad_message") from None
        self.refuse_mixed(message)
        if self.turn_id is None:
            await self.start_turn(None)
        self.push(piece, end=False)  # the engine checks the seam with the turn's earlier text
        self.pushed, self.last_input = self.pushed + len(piece), time.monotonic()
        self.tokens = message.tokens is not None

    def refuse_mixed(self, message: TextDelta) -> None:
        """A turn's text comes as text or as ids, not both: the family holds text back until its
        segmenter cuts it and appends ids at once (the reference's push_text_tokens), so ids after
        text would be spoken before it."""
        if self.turn_id is None or not self.pushed or self.tokens == (message.tokens is not None):
            return
        given, other = ("tokens", "delta") if self.tokens else ("delta", "tokens")
        raise APIError(400, f"this turn's text came as {given}: a turn's text is all delta (text) or all tokens "
                            "(ids), since ids sent after text would be spoken before the text the segmenter still "
                            f"holds; send the rest as {given}, or {other} in the next turn", code="mixed_text")

    def push(self, piece, end: bool) -> None:
        """Text for the open turn; once the engine has ended it (until_client_ends) the engine takes
        no more and the piece is dropped, as the reference's push_text after a stop."""
        if self.request_id is None:
            raise APIError(400, "no turn is taking text (start one with turn.start or text.delta)", code="no_turn")
        try:
            self.state.engine.push_input(self.request_id, piece, end)
        except InvalidRequestError as e:  # a special token spelled across deltas; the turn goes on
            raise APIError(400, str(e), code="bad_message") from None

    def cancel(self) -> None:
        if self.request_id is None:
            raise APIError(400, "no turn to cancel", code="no_turn")
        self.ended_by = self.ended_by or "cancelled"
        self.state.engine.abort(self.request_id)
        self.client_ended.set()

    async def send_audio(self, stream, turn_id: str) -> None:
        """The turn's audio as it is produced, then audio.done once the client is done with the turn too;
        the session is then free for the next turn."""
        self.sending = turn_id
        encoder, final, outcome = None, None, None  # outcome: once the engine has ended the turn
        tempo = tempo_for(self.state, self.settings.speed)
        try:
            async for chunk in stream:
                if tempo is not None:  # off the event loop, as the encoder is
                    chunk = await asyncio.to_thread(at_speed, chunk, tempo)
                final = chunk
                samples = chunk.audio.shape[-1] if chunk.audio is not None else 0
                if not samples and not (self.settings.include_codes and len(chunk.codes)):
                    continue  # a slowed turn's first chunk may leave the tempo filter no audio yet
                # audio counted, not timed: a turn's pace is its text's (the latency histograms are HTTP's)
                self.state.metrics.audio_seconds.inc(samples / chunk.sample_rate)
                encoder = encoder or StreamEncoder(self.settings.response_format, chunk.sample_rate,
                                                   self.state.tts.codec.channels)
                data = await asyncio.to_thread(encoder.write, chunk.audio) if samples else b""
                event = {"type": "audio.delta", "turn_id": turn_id, "audio": base64.b64encode(data).decode()}
                if self.settings.include_codes and len(chunk.codes):  # none on a final tail of audio
                    event["codes"] = chunk.codes.tolist()
                await self.send(event)
            outcome = (self.ended_by or "disconnected") if final.finish_reason == "aborted" else "ok"
            self.count(outcome)  # before audio.done: metrics read after it include the turn
            if encoder is not None and (tail := await asyncio.to_thread(encoder.close)):
                await self.send({"type": "audio.delta", "turn_id": turn_id, "audio": base64.b64encode(tail).decode()})
            await self.until_client_ends()
            await self.send({"type": "audio.done", "turn_id": turn_id, "finish_reason": final.finish_reason,
                             "frames": final.frame_end})
        except MossServeError as e:
            error = _turn_failure(e, self.state.settings.retry_after_s)
            outcome = outcome_for(error.status_code)
            self.count(outcome)
            await self.send(_error(error.message, error.code, error.status_code))
            await self.until_client_ends()
            await self.send({"type": "audio.done", "turn_id": turn_id, "finish_reason": "error", "frames": 0})
        finally:
            if outcome is None:  # the socket left while the turn ran
                self.count("disconnected")
            if self.turn_id == turn_id:
                self.turn_id = self.request_id = None
                # a turn that fed nothing (cancelled or failed before it spoke) leaves no context, nor
                # does one that failed after (the engine drops the session): the next turn starts it
                if outcome is not None:
                    self.first = self.state.engine.session_context(self.id) == 0

    async def until_client_ends(self) -> None:
        """A turn the engine ended while its text was still coming (the model's EOS, the cache's length,
        the runaway guard, a failure) stays open until the client ends it, as the reference's turn does:
        the rest of its text is dropped (push) and its audio.done follows the client's text.done (or
        turn.cancel, or the timeout). So audio.done always closes the turn for the client, and its
        remaining text can never open another."""
        if self.pushed:
            await self.client_ended.wait()

    def refuse_long_codes(self, data: dict) -> None:
        """Codes past --max-voice-seconds refused by their frame count before pydantic and numpy turn
        each of a million frames into objects (seconds on the event loop, and gigabytes)."""
        session = data.get("session")
        if data["type"] == "session.update" and isinstance(session, dict):
            codes, name, what = session.get("voice_codes"), "voice_codes", "voice"
        else:
            codes, name, what = data.get("user_audio_codes"), "user_audio_codes", "audio"
        if data["type"] in ("session.update", "turn.start") and isinstance(codes, list):
            self.check_seconds(codes, name, what)

    def check_seconds(self, codes: np.ndarray | list, name: str, what: str) -> None:
        """Codes given as codes past --max-voice-seconds."""
        limit = self.state.settings.max_voice_seconds
        if (seconds := len(codes) / self.state.tts.talker.frame_rate) > limit:
            raise APIError(400, f"{name}: {seconds:.1f} s of {what}, more than the {limit:g} s this server takes "
                                "(--max-voice-seconds)", code="bad_message")

    async def codes(self, audio: str | None, codes: Codes | None, name: str):
        """A voice as (T, 16) codes: given codes, or audio (stored voice / base64) through the codec."""
        if audio is not None and codes is not None:
            raise APIError(400, f"give {name} as audio or as codes, not both", code="bad_message")
        if codes is not None:
            try:
                array = np.asarray(codes, dtype=np.int64)
            except (ValueError, OverflowError, TypeError):
                raise APIError(400, f"{name} must be a rectangular array of integer codes (frames, 16)",
                               code="bad_message") from None
            return self.state.tts.talker.builder.check_codes(array, name)
        if audio is None:
            return None
        if is_voice_name(audio):  # a name, never base64 audio (VoiceResolver.audio)
            return await self.stored_codes(audio, name)
        return (await self.state.resolver.audio(audio, name)).codes  # a realtime voice has no transcript

    async def stored_codes(self, audio: str, name: str) -> np.ndarray | None:
        """A stored voice's codes; an OpenAI preset `voice` name that is not stored means the model's
        own voice (None), as on /v1/audio/speech."""
        stored = await self.state.resolver.stored(audio, name)
        if stored is not None:
            return stored.codes
        if name == "voice" and audio in PRESET_VOICES:
            return None
        if name == "voice":
            raise self.state.resolver.not_found(audio, name)
        raise APIError(400, f"{name} {audio!r} names no stored voice: send the user's audio as base64 or a data "
                            "URL, or the name of a voice stored at /v1/audio/voices", code="voice_not_found")

    def count(self, outcome: str) -> None:
        """A turn's outcome, or a refused message's, in `mossserve_requests_total`."""
        self.state.metrics.requests.labels(ENDPOINT, outcome).inc()

    async def send(self, event: dict) -> None:
        await self.ws.send_json(event)


def _context_full(e: ContextFullError) -> APIError:
    """The engine's words are a Python caller's ("start a new session"); a socket starts a fresh context."""
    return APIError(400, f"the context is full: it holds {e.held} of the {e.max_len} positions this engine allows, "
                         f"and the turn needs {e.rows} more; send less text per turn, or session.update "
                         '{"new_context": true} to start a fresh context (the settings and voice stay)',
                    code="context_full")


def _turn_failure(e: MossServeError, retry_after_s: int) -> APIError:
    """A running turn's failure: its own input's fault (text pushed past the context) is the client's;
    what the engine failed, the server's."""
    if isinstance(e, ContextFullError):
        return _context_full(e)
    if isinstance(e, InvalidRequestError):
        return from_mossserve(e, retry_after_s)
    return APIError(500, str(e), code="generation_failed")


PARSED_ON_LOOP = 64 * 1024  # characters: a larger message is parsed in a worker thread


async def _parsed(text: str) -> object:
    """A message's JSON; a large one (voice codes, base64 audio) off the event loop, where a 30 MB one
    would hold every session for a second."""
    return _json(text) if len(text) <= PARSED_ON_LOOP else await asyncio.to_thread(_json, text)


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise APIError(400, "a message must be one JSON object per text frame", code="bad_message") from None


def _error(message: str, code: str | None, status: int = 400) -> dict:
    """An error event, its type the one an HTTP response of `status` has (a server's failure is no
    invalid request); always with a code a client can switch on (bad_message when the refusal has
    none of its own: codes out of range, ...)."""
    return error_event(status, message, code or "bad_message")


def _key_protocol(websocket: WebSocket) -> str | None:
    """The offered subprotocol that carries an API key, if any: a browser cannot set headers on a
    websocket, so it sends the key as `mossserve-api-key-b64.<base64url>` (a subprotocol must be an
    HTTP token, which a key with `/`, `+` or `=` is not) or, where the key is a token, as
    `mossserve-api-key.<key>`. The server must select it back."""
    offered = (p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(","))
    return next((p for p in offered if p.startswith((KEY_PROTOCOL, KEY_B64_PROTOCOL))), None)


def _authorized(state: ServerState, websocket: WebSocket) -> bool:
    key = state.settings.api_key
    if not key:
        return True
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        protocol = _key_protocol(websocket) or ""
        token = protocol.removeprefix(KEY_PROTOCOL)
        if protocol.startswith(KEY_B64_PROTOCOL):
            encoded = protocol.removeprefix(KEY_B64_PROTOCOL)
            try:
                token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except ValueError:  # not base64 (binascii.Error) or not UTF-8 (UnicodeDecodeError)
                return False
    return bool(token) and hmac.compare_digest(token.strip().encode(), key.encode())
