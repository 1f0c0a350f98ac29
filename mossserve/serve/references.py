"""A speech body's voices as codes: stored voices, inline reference audio, OpenAI preset names.

Nothing a client sends is ever used as a file path: a voice is a stored voice's name or audio
bytes (base64 or a data URL), and every one becomes codes before the request reaches the model.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..audio.read import ENCODER_PADDING_S
from ..errors import AudioError, InvalidRequestError
from ..speech_request import Speaker
from ..text.delay_requests import check_speaker_transcript
from ..text.fish_turns import SPEAKER_TAG
from .errors import APIError
from .schemas import SpeakerBody, SpeechBody
from .voices import VoiceNotFoundError, VoiceStore, is_voice_name

# Voice names OpenAI clients send; they mean "no reference" unless a stored voice has that name.
PRESET_VOICES = frozenset({
    "default", "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
    "verse", "marin", "cedar",
})

# RFC 2397, as browsers write it: FileReader gives Firefox's recordings "data:audio/ogg; codecs=opus;base64,"
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL | re.IGNORECASE)


# A dialogue label a stored transcript may start with: MOSS-TTSD's [S1] or Fish S2 Pro's <|speaker:0|>.
_SPEAKER_LABEL = re.compile(rf"^\s*(?:\[S[0-9]+\]|{SPEAKER_TAG.pattern})\s*")


class Reference(NamedTuple):
    codes: np.ndarray
    transcript: str | None  # a stored voice's
    stored: str | None = None  # the stored voice's name
    param: str | None = None  # the field that named the stored voice


class VoiceResolver:
    """Turns names and inline audio into codes, re-encoding stored voices made by another codec.
    `needs_transcript`: the model clones from audio and transcript together (Fish S2 Pro), so a
    voice without one is refused here, naming where it came from. `check_text` (the model's
    `check_transcript`) and `max_chars` (--max-input-chars) judge a stored transcript used as a
    reference text: it was judged by the server that stored it, which may have run another model.
    `dialogue` (a MOSS-TTSD model): a stored transcript used as a speaker's is also judged for speaker
    tags, as the model judges a speaker's `ref_text`."""

    def __init__(self, voices: VoiceStore, engine, codec_id: str, codebooks: int, needs_transcript: bool = False,
                 max_seconds: float | None = None, check_text: Callable[[str, str], None] | None = None,
                 max_chars: int | None = None, dialogue: bool = False) -> None:
        self.voices, self.engine, self.codec_id, self.codebooks = voices, engine, codec_id, codebooks
        self.needs_transcript, self.max_seconds = needs_transcript, max_seconds
        self.check_text, self.max_chars = check_text, max_chars
        self.dialogue = dialogue

    async def main_voice(self, body: SpeechBody) -> tuple[np.ndarray | None, str | None]:
        """(codes, transcript of the stored voice) for `voice` / `ref_audio`."""
        name = body.voice
        reference = await self.stored(name, "voice") if name is not None else None
        if name is not None and reference is None and name not in PRESET_VOICES:
            raise self.not_found(name, "voice")
        if body.ref_audio is not None:
            if reference is not None:
                raise APIError(400, f"give voice or ref_audio, not both (voice {name!r} is a stored voice)",
                               param="ref_audio")
            reference = await self.audio(body.ref_audio, "ref_audio")
        if reference is None:
            return None, None
        self.check_transcript(reference, body.ref_text, "")
        if self.needs_transcript and body.ref_text is None:  # the model's reference text (speech.py)
            self.check_stored_transcript(reference, "")
        return reference.codes, reference.transcript

    async def speakers(self, bodies: list[SpeakerBody]) -> list[Speaker]:
        """Dialogue speakers; a stored voice's transcript is its reference_text unless one is given."""
        return list(await asyncio.gather(*(self._speaker(s, k, len(bodies)) for k, s in enumerate(bodies, 1))))

    async def _speaker(self, body: SpeakerBody, k: int, count: int) -> Speaker:
        """Speaker k (1-based) of `count`."""
        where = f"speakers[{k - 1}]"
        if body.voice is not None and body.ref_audio is not None:
            raise APIError(400, f"{where}: give voice or ref_audio, not both", param=f"{where}.voice")
        reference = None
        if body.voice is not None:
            reference = await self.stored(body.voice, f"{where}.voice")
            if reference is None and body.voice not in PRESET_VOICES:
                raise self.not_found(body.voice, f"{where}.voice")
            if reference is None:  # a preset: the default voice, as for `voice`
                self.check_preset_speaker(body, where)
        elif body.ref_audio is not None:
            reference = await self.audio(body.ref_audio, f"{where}.ref_audio")
        if reference is None:
            return Speaker(voice=None, reference_text=body.ref_text)
        self.check_transcript(reference, body.ref_text, f"{where}.")
        if body.ref_text is None:
            self.check_stored_transcript(reference, f"{where}.", (k, count))
        return Speaker(voice=reference.codes,
                       reference_text=body.ref_text if body.ref_text is not None else unlabelled(reference.transcript))

    def check_transcript(self, reference: Reference, ref_text: str | None, prefix: str) -> None:
        """A voice with no transcript (none given, none stored) on a model that clones with one."""
        transcript = ref_text if ref_text is not None else reference.transcript
        if not self.needs_transcript or (transcript is not None and transcript.strip()):
            return
        if ref_text is None and reference.stored is not None:
            why = f"the stored voice {reference.stored!r} has no transcript"
        else:
            why = f"{prefix}ref_text is {'empty' if ref_text is not None else 'missing'}"
        raise APIError(400, f"{why}: this model clones a voice from its audio and what it says, together; give "
                            f"{prefix}ref_text (or store the voice with its transcript)", param=f"{prefix}ref_text")

    def check_preset_speaker(self, body: SpeakerBody, where: str) -> None:
        """A speaker's preset `voice` name means no voice, as at the top level: refused as such where the
        speaker needs one (the model would call the voice missing, or say to give it with `ref_text`)."""
        preset = f"{where}.voice {body.voice!r} is an OpenAI preset name, which means no voice"
        if self.needs_transcript:
            raise APIError(400, f"{preset}; this model clones each speaker from a voice and its transcript: name a "
                                f"stored voice or give {where}.ref_audio, with {where}.ref_text",
                           param=f"{where}.voice")
        if body.ref_text is not None:
            raise APIError(400, f"{preset}, so {where}.ref_text (a voice's transcript) has no voice to go with: name "
                                f"a stored voice or give {where}.ref_audio, or leave {where}.ref_text out",
                           param=f"{where}.ref_text")

    def check_stored_transcript(self, reference: Reference, prefix: str,
                                speaker: tuple[int, int] | None = None) -> None:
        """A stored voice's transcript about to be its reference text, refused naming the voice (the
        model would name `ref_text`, which the client never sent). `speaker`: (k, count) where it is
        speaker k's of a dialogue of `count`, whose tags a MOSS-TTSD model judges too."""
        transcript, name = reference.transcript, reference.stored
        if name is None or transcript is None:
            return
        what = f"the transcript of the stored voice {name!r}"
        instead = f"give {prefix}ref_text, or store the voice again with a transcript this server takes"
        if self.max_chars is not None and len(transcript) > self.max_chars:
            raise APIError(400, f"{what} has {len(transcript)} characters; this server takes at most {self.max_chars} "
                                f"per field (--max-input-chars): {instead}", param=reference.param,
                           code="text_too_long")
        try:
            if self.check_text is not None:
                self.check_text(transcript, what)
            if speaker is not None and self.dialogue:
                check_speaker_transcript(unlabelled(transcript), *speaker, what)
        except InvalidRequestError as e:
            raise APIError(400, f"{e}; {instead}", param=reference.param) from None

    async def stored(self, name: str, param: str) -> Reference | None:
        """A stored voice's codes (re-encoded once if another codec made them) and transcript."""
        if not is_voice_name(name):
            return None  # not a storable name (e.g. base64): the caller decides what it is
        voice = await asyncio.to_thread(self.voices.get, name)
        if voice is None:
            return None
        if self.max_seconds is not None and voice.duration_s > self.max_seconds + ENCODER_PADDING_S:  # a larger limit's
            raise APIError(400, f"the stored voice {name!r} is {voice.duration_s:.2f} s long; this server takes "
                                f"voices up to {self.max_seconds:g} s (--max-voice-seconds)", param=param,
                           code="invalid_audio")
        try:  # this codec's codes, read in one call: another server may store its own codec's meanwhile
            codes = await asyncio.to_thread(self.voices.codes, name, self.codec_id)
            if codes is not None and codes.shape[1] == self.codebooks:
                return Reference(codes, voice.transcript, name, param)
            audio = await asyncio.to_thread(self.voices.audio, name)
        except VoiceNotFoundError as e:  # deleted since `get`, or its files removed by hand (the store says how to mend it)
            if await asyncio.to_thread(self.voices.get, name) is None:
                return None
            raise APIError(400, str(e), param=param, code="voice_not_found") from None
        try:
            codes = await self.engine.encode_voice(audio)
        except AudioError as e:  # its stored audio, re-encoded for this codec: name the voice, not a hash
            raise APIError(400, f"the stored voice {name!r}: {e}", param=param, code="invalid_audio") from None
        # the voice may have been deleted and uploaded again meanwhile: then its own codes stay
        try:
            await asyncio.to_thread(self.voices.replace_codes, name, codes, self.codec_id, voice.sha256)
        except VoiceNotFoundError:  # deleted: this request, which read it first, still speaks with it
            pass
        return Reference(codes, voice.transcript, name, param)

    async def audio(self, value: str, param: str) -> Reference:
        """`ref_audio`: a stored voice's name (with its transcript), a data URL or base64 of an audio file.
        A voice name that is not stored is refused as one: as base64 ("anna", "x" * 64) it is at most
        48 bytes without '+' or '/', which no audio file a voice can be made of is."""
        stored = await self.stored(value, param)
        if stored is not None:
            return stored
        if is_voice_name(value):
            raise self.not_found(value, param)
        try:
            return Reference(await self.engine.encode_voice(decode_audio_field(value, param)), None)
        except AudioError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_audio") from None

    def not_found(self, name: str, param: str) -> APIError:
        return APIError(400, f"voice {name!r} is not a stored voice (upload it to /v1/audio/voices first; "
                             f"the OpenAI preset names mean the model's default voice)", param=param,
                        code="voice_not_found")


def unlabelled(transcript: str | None) -> str | None:
    """A stored transcript as a speaker's: without a leading dialogue label ("[S1] Hello." or
    "<|speaker:1|>Hello." stored from where the clip was recorded), since the request decides which
    speaker the voice is."""
    return None if transcript is None else _SPEAKER_LABEL.sub("", transcript, count=1)




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
