"""The voice library: upload a reference once, use it by name in every request after.

An upload is decoded and checked (format, length, silence) the way a request's inline reference
is, encoded once by the engine's codec through the speaker cache, and stored with its audio so a
server loaded with another codec can re-encode it.
"""
from __future__ import annotations

import asyncio
import hashlib

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from ..audio import load_audio
from ..errors import AudioError, MossServeError
from .errors import APIError, from_mossserve
from .origins import origin_allowed
from .speech import check_text_length, shutting_down
from .state import ServerState
from .voices import Voice, VoiceExistsError, VoiceNotFoundError, validate_voice_name

router = APIRouter()


def voice_json(voice: Voice) -> dict:
    """A voice as clients see it: OpenAI's `audio.voice` (made from an audio sample, created_at in whole
    seconds) with our fields; not the codec's identity, which is a path on the server."""
    fields = voice.to_json()
    del fields["codec"]
    return {"id": voice.name, "object": "audio.voice", "type": "audio_sample", **fields,
            "created_at": int(voice.created_at)}


@router.post("/v1/audio/voices", status_code=201)
async def upload_voice(request: Request, name: str = Form(...), file: UploadFile | None = None,
                       audio_sample: UploadFile | None = None, transcript: str | None = Form(None)) -> JSONResponse:
    """multipart: `name`, the audio as `file` (or `audio_sample`, OpenAI's field name), `transcript`."""
    state: ServerState = request.app.state.server
    if not origin_allowed(request.headers, state.settings.cors_origins, "a voice upload"):
        raise APIError(403, f"a page of {request.headers['origin']} may not store voices here (--cors-origin)",
                       code="origin_not_allowed")
    if state.closing:
        raise shutting_down(state)
    form = await request.form()  # the form FastAPI parsed: it keeps only the last of repeated fields
    if len(form.getlist("file")) + len(form.getlist("audio_sample")) > 1:
        raise APIError(400, "send the reference audio as exactly one multipart file field: file (or audio_sample)",
                       param="file")
    upload = _one_file(file, audio_sample)
    name = _checked_name(name)
    if transcript is not None and not transcript.strip():
        transcript = None
    check_text_length(state, "transcript", transcript)  # it becomes the ref_text of requests that use it
    if transcript is not None:
        try:
            state.tts.talker.check_transcript(transcript, "transcript")  # refused now, not at every use
        except MossServeError as e:
            raise APIError(400, str(e), param="transcript") from None
    if await asyncio.to_thread(state.voices.get, name) is not None:
        raise APIError(409, f"a voice named {name!r} already exists (delete it first to replace it)",
                       param="name", code="voice_exists")
    data = await upload.read()
    if not data:
        raise APIError(400, "the uploaded audio file is empty", param="file", code="invalid_audio")
    codec = state.tts.codec
    try:
        audio = await asyncio.to_thread(load_audio, data, codec.sample_rate, codec.channels,
                                        state.settings.max_voice_seconds)
        codes = await state.engine.encode_voice(data)
        voice = await asyncio.to_thread(state.voices.add, name, audio, codec.sample_rate, codes, transcript,
                                        state.resolver.codec_id, hashlib.sha256(data).hexdigest())
    except VoiceExistsError as e:
        raise APIError(409, str(e), param="name", code="voice_exists") from None
    except MossServeError as e:
        raise _upload_error(e, state.settings.retry_after_s) from None
    return JSONResponse(voice_json(voice), status_code=201)


@router.get("/v1/audio/voices")
async def list_voices(request: Request) -> dict:
    state: ServerState = request.app.state.server
    voices = await asyncio.to_thread(state.voices.list)
    return {"object": "list", "data": [voice_json(v) for v in voices]}


@router.get("/v1/audio/voices/{name}")
async def get_voice(name: str, request: Request) -> dict:
    return voice_json(await _stored(request, name))


@router.get("/v1/audio/voices/{name}/audio")
async def get_voice_audio(name: str, request: Request) -> Response:
    """The stored reference audio (as the codec heard it), for listening back. Read whole while the
    store is locked, so a voice deleted meanwhile is a 404, not a response cut off."""
    state: ServerState = request.app.state.server
    try:
        audio = await asyncio.to_thread(state.voices.audio, _checked_name(name))
    except VoiceNotFoundError:
        raise _not_found(name) from None
    return Response(audio, media_type="audio/wav")


@router.delete("/v1/audio/voices/{name}")
async def delete_voice(name: str, request: Request) -> dict:
    state: ServerState = request.app.state.server
    deleted = await asyncio.to_thread(state.voices.delete, _checked_name(name))
    if deleted is None:
        raise _not_found(name)
    return {"id": deleted, "object": "audio.voice.deleted", "deleted": True}


async def _stored(request: Request, name: str) -> Voice:
    state: ServerState = request.app.state.server
    voice = await asyncio.to_thread(state.voices.get, _checked_name(name))
    if voice is None:
        raise _not_found(name)
    return voice


def _checked_name(name: str) -> str:
    try:
        return validate_voice_name(name)
    except MossServeError as e:
        raise APIError(400, str(e), param="name", code="invalid_voice_name") from None


def _not_found(name: str) -> APIError:
    return APIError(404, f"no voice named {name!r}", param="name", code="voice_not_found")


def _upload_error(e: MossServeError, retry_after_s: int) -> APIError:
    """`from_mossserve`'s error, naming the `file` field where the audio is refused (the only field
    decoded here), as the empty-file refusal does."""
    error = from_mossserve(e, retry_after_s)
    if isinstance(e, AudioError):
        error.param = "file"
    return error


def _one_file(file: UploadFile | None, audio_sample: UploadFile | None) -> UploadFile:
    if (file is None) == (audio_sample is None):
        raise APIError(400, "send the reference audio as exactly one multipart file field: file (or audio_sample)",
                       param="file")
    return file or audio_sample
