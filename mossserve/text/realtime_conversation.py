"""A Realtime conversation (`mossserve prompt|say --conversation CONV.json`): the record of upstream's
fine-tuning data (`moss_tts_realtime/finetuning/README.md`), read as the context of the turn to speak.

    {"ref_audio_codes": "voice.npy",                                  (or "ref_wav": "voice.wav"; optional)
     "conversations": [
        {"role": "user", "text": "Any ideas for six hours?", "audio_codes": "user0.npy"},
        {"role": "assistant", "text": "Nice, welcome to Paris!", "wav": "answer0.wav"},
        {"role": "user", "text": "Just a backpack."},                 (no audio: the text-only user turn)
        {"role": "assistant", "text": "Then start near the Seine."}]}

A bare list is the `conversations` list without a voice. Each assistant message is a turn, with the
user message just before it, if any; every turn but the last has the assistant's audio, which the
model then conditions on exactly as a session would had it spoken that audio itself (README §5.7).
The last message is the text to speak; with audio too, that audio is the start of its speech and
generation goes on from it (continuation). An assistant's `text` may also be the list of pieces in
which a streaming client pushed it, or `text_tokens` its token-id chunks, because the session cuts
and tokenises text by its pushes (§5.6). Codes are nested lists or `.npy` files read as session
scripts read them (`read_codes`); `wav` and `ref_wav` are audio, encoded by the codec.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from ..speech_request import EncodeVoice
from .conversation import read_voice_codes
from .conversation_record import message_role, read_record
from .realtime_prompt import CODEBOOKS
from .realtime_session import RealtimeTurn, read_assistant_text, read_codes

_RECORD_FIELDS = {"id", "conversations", "ref_audio_codes", "ref_wav"}
_MESSAGE_FIELDS = {"user": {"role", "text", "audio_codes", "wav"},
                   "assistant": {"role", "text", "text_tokens", "audio_codes", "wav"}}


@dataclass
class RealtimeConversation:
    voice: np.ndarray | None  # codes (16, T), as a session script's
    turns: list[RealtimeTurn]  # every turn but the last has the assistant's audio

    @property
    def default_mode(self) -> str:
        return "continuation" if self.turns[-1].audio is not None else "generation"


def parse_realtime_conversation(data: Any, base_dir: Path | None = None,
                                encode_voice: EncodeVoice | None = None) -> RealtimeConversation:
    record, messages = read_record(data, _RECORD_FIELDS, "Realtime")
    voice = _audio(record, "ref_audio_codes", "ref_wav", "", base_dir, encode_voice)
    turns, user = [], None
    for index, message in enumerate(messages):
        where = f"conversations[{index}]"
        role = message_role(message, where, _MESSAGE_FIELDS)
        if role == "user":
            if user is not None:
                raise InvalidRequestError(f"{where}: two user messages in a row; the assistant answers each one")
            user = _user(message, where, base_dir, encode_voice)
        else:
            turns.append(_assistant(message, where, user, base_dir, encode_voice))
            user = None
    if user is not None or not turns:
        raise InvalidRequestError("a conversation ends with the assistant's message: the text to speak")
    for index, turn in enumerate(turns[:-1]):
        if turn.audio is None:
            raise InvalidRequestError(f"assistant message {index} needs its audio (audio_codes or wav): the "
                                      "context holds what the assistant said; only the last one may have none")
    return RealtimeConversation(voice, turns)


def _user(message: dict, where: str, base_dir: Path | None, encode_voice: EncodeVoice | None) -> RealtimeTurn:
    text = message.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(f"{where}.text must be the user's words (a non-empty string)")
    audio = _audio(message, "audio_codes", "wav", f"{where}.", base_dir, encode_voice)
    return RealtimeTurn(user_text=text, user_audio=audio)


def _assistant(message: dict, where: str, user: RealtimeTurn | None, base_dir: Path | None,
               encode_voice: EncodeVoice | None) -> RealtimeTurn:
    turn = user or RealtimeTurn()
    read_assistant_text(turn, message, f"{where}.", ("text", "text_tokens"))
    if not turn.token_chunks and not "".join(turn.pieces).strip():
        raise InvalidRequestError(f"{where}.text is empty: the assistant says nothing")
    turn.audio = _audio(message, "audio_codes", "wav", f"{where}.", base_dir, encode_voice)
    return turn


def _audio(fields: dict, codes_name: str, audio_name: str, where: str, base_dir: Path | None,
           encode_voice: EncodeVoice | None) -> np.ndarray | None:
    """Codes (16, T) from `codes_name` (codes or a `.npy`), else from `audio_name` (an audio file).
    Upstream's prepare_data.py writes the codes beside the path and dataset.py reads only the codes."""
    if fields.get(codes_name) is not None or fields.get(audio_name) is None:
        return read_codes(fields.get(codes_name), f"{where}{codes_name}", base_dir)
    value = fields[audio_name]
    if not isinstance(value, str) or Path(value).suffix.lower() == ".npy":  # codes belong in codes_name
        raise InvalidRequestError(f"{where}{audio_name} must be the path of an audio file; give codes in "
                                  f"{where}{codes_name}")
    codes = read_voice_codes(value, f"{where}{audio_name}", base_dir, encode_voice)
    return codes[:, :CODEBOOKS].astype(np.int64).T
