"""A speech body's voices as codes: stored voices, inline reference audio, OpenAI preset names.

Nothing a client sends is ever used as a file path: a voice is a stored voice's name or audio
bytes (base64 or a data URL), and every one becomes codes before the request reaches the model.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import re

import numpy as np

from ..errors import AudioError
from ..speech_request import Speaker
from .errors import APIError
from .schemas import SpeakerBody, SpeechBody
from .voices import VoiceStore, validate_voice_name

# Voice names OpenAI clients send; they mean "no reference" unless a stored voice has that name.
PRESET_VOICES = frozenset({
    "default", "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
    "verse", "marin", "cedar",
})

# RFC 2397, as browsers write it: FileReader gives Firefox's recordings "data:audio/ogg; codecs=opus;base64,"
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL | re.IGNORECASE)


class VoiceResolver:
    """Turns names and inline audio into codes, re-encoding stored voices made by another codec."""

    def __init__(self, voices: VoiceStore, engine, codec_id: str, codebooks: int) -> None:
        self.voices, self.engine, self.codec_id, self.codebooks = voices, engine, codec_id, codebooks

    async def main_voice(self, body: SpeechBody) -> tuple[np.ndarray | None, str | None]:
        """(codes, transcript of the stored voice) for `voice` / `ref_audio`."""
        name = body.voice
        stored = await self.stored(name, "voice") if name is not None else None
        if name is not None and stored is None and name not in PRESET_VOICES:
            raise self.not_found(name, "voice")
        if body.ref_audio is not None:
            if stored is not None:
                raise APIError(400, f"give voice or ref_audio, not both (voice {name!r} is a stored voice)",
                               param="ref_audio")
            return await self.audio(body.ref_audio, "ref_audio"), None
        return stored or (None, None)

    async def speakers(self, bodies: list[SpeakerBody]) -> list[Speaker]:
        """Dialogue speakers; a stored voice's transcript is its reference_text unless one is given."""
        return list(await asyncio.gather(*(self._speaker(s, f"speakers[{i}]") for i, s in enumerate(bodies))))

    async def _speaker(self, body: SpeakerBody, where: str) -> Speaker:
        if body.voice is not None and body.ref_audio is not None:
            raise APIError(400, f"{where}: give voice or ref_audio, not both", param=f"{where}.voice")
        codes, transcript = None, None
        if body.voice is not None:
            stored = await self.stored(body.voice, f"{where}.voice")
            if stored is None:
                raise self.not_found(body.voice, f"{where}.voice")
            codes, transcript = stored
        elif body.ref_audio is not None:
            codes = await self.audio(body.ref_audio, f"{where}.ref_audio")
        return Speaker(voice=codes, reference_text=body.ref_text if body.ref_text is not None else transcript)

    async def stored(self, name: str, param: str) -> tuple[np.ndarray, str | None] | None:
        """A stored voice's codes (re-encoded once if another codec made them) and transcript."""
        try:
            validate_voice_name(name)
        except ValueError:
            return None  # not a storable name (e.g. base64): the caller decides what it is
        voice = await asyncio.to_thread(self.voices.get, name)
        if voice is None:
            return None
        if voice.codec == self.codec_id and voice.codebooks == self.codebooks:
            return await asyncio.to_thread(self.voices.codes, name), voice.transcript
        audio = await asyncio.to_thread(lambda: self.voices.audio_path(name).read_bytes())
        codes = await self.engine.encode_voice(audio)
        # the voice may have been deleted and uploaded again meanwhile: then its own codes stay
        await asyncio.to_thread(self.voices.replace_codes, name, codes, self.codec_id, voice.sha256)
        return codes, voice.transcript

    async def audio(self, value: str, param: str) -> np.ndarray:
        """`ref_audio`: a stored voice's name, a data URL or base64 of an audio file."""
        stored = await self.stored(value, param)
        if stored is not None:
            return stored[0]
        try:
            return await self.engine.encode_voice(decode_audio_field(value, param))
        except AudioError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_audio") from None

    def not_found(self, name: str, param: str) -> APIError:
        return APIError(400, f"voice {name!r} is not a stored voice (upload it to /v1/audio/voices first; "
                             f"the OpenAI preset names mean the model's default voice)", param=param,
                        code="voice_not_found")


def decode_audio_field(value: str, param: str) -> bytes:
    """Base64 (plain or in a data URL) -> bytes, or a 400 that says which it was not."""
    match = _DATA_URL.fullmatch(value.strip())
    if value.strip()[:5].lower() == "data:" and match is None:
        raise APIError(400, f"{param} is a data URL but not a base64 one (data:<type>;base64,<data>)", param=param)
    data = match.group("data") if match else value
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is neither a stored voice name nor base64-encoded audio", param=param) from None
    if not raw:
        raise APIError(400, f"{param} is empty", param=param)
    return raw
