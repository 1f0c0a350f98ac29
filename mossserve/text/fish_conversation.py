"""A Fish S2 Pro conversation (`mossserve prompt|say --conversation CONV.json`): the growing
conversation in which the reference generates a long text batch after batch (README 3.4), given
up to the text to speak now.

    {"references": [{"text": "What the reference says.", "wav": "ref.wav"}],       (optional)
     "conversations": [
        {"role": "user", "text": "<|speaker:0|>Good morning! How are you today?"},
        {"role": "assistant", "audio_codes": "batch0.npy"},                          (or "wav")
        {"role": "user", "text": "<|speaker:1|>I am fine, thanks. And you?"}],
     "chunk_length": 300}                                                            (optional)

A bare list is the `conversations` list without references. Messages alternate user, assistant,
..., user: each earlier user message is one batch's text as given, the assistant message after it
that batch's codes (F, num_codebooks) as the model conditions on them; the last user message is
the text to speak, cut into batches by `chunk_length` as a request's `input` is. References are
the system message's reference form (`voice` + `reference_text` of a request). Codes are nested
lists or `.npy` files, time first; `wav` is audio, encoded by the codec.
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
from .fish_turns import DEFAULT_CHUNK_LENGTH

_RECORD_FIELDS = {"id", "references", "conversations", "chunk_length"}
_MESSAGE_FIELDS = {"user": {"role", "text"}, "assistant": {"role", "audio_codes", "wav"}}


@dataclass
class FishConversation:
    references: list[tuple[str, np.ndarray]]  # (transcript, codes (F, N))
    earlier: list[tuple[str, np.ndarray]]  # per earlier batch: (its text, its codes (F, N))
    text: str  # the last user message: what to speak
    chunk_length: int = DEFAULT_CHUNK_LENGTH


def parse_fish_conversation(data: Any, base_dir: Path | None = None,
                            encode_voice: EncodeVoice | None = None) -> FishConversation:
    record, messages = read_record(data, _RECORD_FIELDS, "Fish S2 Pro")
    chunk_length = record.get("chunk_length", DEFAULT_CHUNK_LENGTH)
    if isinstance(chunk_length, bool) or not isinstance(chunk_length, int) or chunk_length < 1:
        raise InvalidRequestError(f"chunk_length must be a positive integer (UTF-8 bytes), got {chunk_length!r}")
    roles = [message_role(m, f"conversations[{i}]", _MESSAGE_FIELDS) for i, m in enumerate(messages)]
    for index, role in enumerate(roles):
        if role != ("user" if index % 2 == 0 else "assistant"):
            raise InvalidRequestError(f"conversations[{index}]: messages alternate user, assistant, ..., starting "
                                      f"with the user; this one is the {role}'s")
    if roles[-1] != "user":
        raise InvalidRequestError("a Fish S2 Pro conversation ends with the user's message: the text to speak "
                                  "(an assistant's speech is not continued)")
    texts = [_text(m, f"conversations[{i}].text") for i, m in enumerate(messages) if m["role"] == "user"]
    codes = [_audio(m, f"conversations[{i}]", base_dir, encode_voice) for i, m in enumerate(messages)
             if m["role"] == "assistant"]
    return FishConversation(_references(record.get("references"), base_dir, encode_voice),
                            list(zip(texts, codes)), texts[-1], chunk_length)


def _text(fields: dict, where: str) -> str:
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(f"{where} must be a non-empty string")
    return text


def _audio(fields: dict, where: str, base_dir: Path | None, encode_voice: EncodeVoice | None) -> np.ndarray:
    """Codes from `audio_codes`, else from `wav` (the Realtime record's rule: codes first)."""
    name = "audio_codes" if fields.get("audio_codes") is not None else "wav"
    if fields.get(name) is None:
        raise InvalidRequestError(f"{where}: give the audio as audio_codes (codes) or wav (an audio file)")
    return read_voice_codes(fields[name], f"{where}.{name}", base_dir, encode_voice)


def _references(value: Any, base_dir: Path | None, encode_voice: EncodeVoice | None) -> list[tuple[str, np.ndarray]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError("references must be a list of {text, audio_codes | wav}")
    references = []
    for index, reference in enumerate(value):
        where = f"references[{index}]"
        if not isinstance(reference, dict):
            raise InvalidRequestError(f"{where} must be an object with text and audio_codes or wav")
        unknown = sorted(set(reference) - {"text", "audio_codes", "wav"})
        if unknown:
            raise InvalidRequestError(f"{where}: unknown field(s) {', '.join(unknown)}")
        references.append((_text(reference, f"{where}.text"), _audio(reference, where, base_dir, encode_voice)))
    return references
