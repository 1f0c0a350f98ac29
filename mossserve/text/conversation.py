"""The JSON form of a Delay conversation (`mossserve prompt|say --conversation CONV.json`).

A conversation is a list of messages; a list of conversations is a batch:

    [{"role": "user", "text": "...", "reference": ["s1.npy", null], "tokens": 125, "language": "English"},
     {"role": "assistant", "audio_codes_list": ["prefix.npy"]}]

User fields are those of `build_user_message` (text, reference, instruction, tokens, quality,
sound_event, ambient_sound, language); `text` is normalized as the Delay processor does for role
dicts and kept as typed too (`typed_text`), which the Local builder uses: its processor does not
normalize, and the model is not known when the file is read. Assistant fields:
`audio_codes_list` (or `audio_codes`) and optional `content`. A code tensor is a nested int list
`(frames, n_vq)` or a `.npy` path; an audio path needs the codec (`encode_voice`). Relative paths
are tried in the working directory, then beside the JSON file. A field that holds one entry may
also hold a list of entries.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InvalidRequestError
from ..json_files import read_json_file
from ..speech_request import EncodeVoice, normalize_voice, resolve_path_or_codes
from .delay_prompt import (
    AUDIO_PLACEHOLDER,
    AssistantMessage,
    Conversation,
    UserMessage,
    build_assistant_message,
    build_user_message,
)

_TEXT_FIELDS = ("text", "instruction", "quality", "sound_event", "ambient_sound", "language")
_ASSISTANT_FIELDS = ("audio_codes_list", "audio_codes", "content")


def load_conversations(path: str | Path, encode_voice: EncodeVoice | None = None) -> list[Conversation]:
    path = Path(path)
    return parse_conversations(read_json_file(path, "conversation file"), path.parent, encode_voice)


def message_prompts(family, data: Any, base_dir: Path | None, mode: str | None,
                    encode_voice: EncodeVoice | None = None) -> list:
    """`--conversation` for the families of the MOSS-TTS processor (Delay, Local): a prompt per
    conversation, in `mode` or by its last role (assistant: continuation)."""
    return [family.prompt_from_conversation(c, mode or ("continuation" if c[-1].role == "assistant" else "generation"))
            for c in parse_conversations(data, base_dir, encode_voice)]


def is_batch(data: list) -> bool:
    """A conversation file's list holds conversations (lists of messages), not messages."""
    return all(isinstance(c, list) for c in data)


def parse_conversations(
    data: Any, base_dir: Path | None = None, encode_voice: EncodeVoice | None = None
) -> list[Conversation]:
    """One conversation (a list of messages) or a batch (a list of such lists) -> a batch."""
    if not isinstance(data, list) or not data:
        raise InvalidRequestError("a conversation must be a non-empty list of messages (or a list of conversations)")
    batch = data if is_batch(data) else [data]

    def codes(entry: Any, where: str) -> np.ndarray | None:
        return read_voice_codes(entry, where, base_dir, encode_voice)

    conversations = []
    for c, conversation in enumerate(batch):
        where = f"conversation[{c}]" if batch is data else "conversation"
        if not conversation:
            raise InvalidRequestError(f"{where} has no messages")
        conversations.append([_message(m, f"{where}[{i}]", codes) for i, m in enumerate(conversation)])
    return conversations


def _message(data: Any, where: str, codes: Callable[[Any, str], np.ndarray | None]) -> UserMessage | AssistantMessage:
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{where} must be an object with a role")
    role = data.get("role")
    allowed = {"user": {"role", "reference", "tokens", *_TEXT_FIELDS}, "assistant": {"role", *_ASSISTANT_FIELDS}}
    if role not in allowed:
        raise InvalidRequestError(f"{where}.role must be 'user' or 'assistant', got {role!r}")
    unknown = sorted(set(data) - allowed[role])
    if unknown:
        raise InvalidRequestError(f"{where}: unknown {role} field(s) {', '.join(unknown)}")
    return _user(data, where, codes) if role == "user" else _assistant(data, where, codes)


def _user(data: dict, where: str, codes: Callable[[Any, str], np.ndarray | None]) -> UserMessage:
    fields = {}
    for name in _TEXT_FIELDS:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"{where}.{name} must be a string or null, got {type(value).__name__}")
        fields[name] = value
    tokens = data.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise InvalidRequestError(f"{where}.tokens must be a positive integer or null, got {tokens!r}")
    reference = None
    if data.get("reference") is not None:
        entries = _entries(data["reference"], f"{where}.reference")
        reference = [codes(e, f"{where}.reference[{k}]") for k, e in enumerate(entries)]
    return replace(build_user_message(reference=reference, tokens=tokens, **fields), typed_text=fields["text"])


def _assistant(data: dict, where: str, codes: Callable[[Any, str], np.ndarray | None]) -> AssistantMessage:
    if "audio_codes_list" in data and "audio_codes" in data:
        raise InvalidRequestError(f"{where}: give audio_codes_list or audio_codes, not both")
    key = "audio_codes" if "audio_codes" in data else "audio_codes_list"
    tensors = [codes(e, f"{where}.{key}[{k}]") for k, e in enumerate(_entries(data.get(key), f"{where}.{key}"))]
    if any(t is None for t in tensors):
        raise InvalidRequestError(f"{where}.{key}: entries must be codes, not null")
    content = data.get("content", AUDIO_PLACEHOLDER * max(len(tensors), 1))  # adjacent ones join into one block
    if not isinstance(content, str):
        raise InvalidRequestError(f"{where}.content must be a string")
    return build_assistant_message(tensors, content)


def _entries(value: Any, where: str) -> list[Any]:
    """A single entry (path or codes) or a list of entries -> the list of entries."""
    if value is None:
        return []
    if isinstance(value, str) or _is_codes(value):
        return [value]
    if isinstance(value, list):
        return value
    raise InvalidRequestError(f"{where} must be a path, codes or a list of them, got {type(value).__name__}")


def _is_codes(value: Any) -> bool:
    """Codes are a list of frames, each a list of numbers."""
    def is_number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return isinstance(value, list) and bool(value) and all(isinstance(r, list) and all(map(is_number, r)) for r in value)


def read_voice_codes(entry: Any, where: str, base_dir: Path | None,
                     encode_voice: EncodeVoice | None) -> np.ndarray | None:
    """Codes (frames, codebooks) from nested lists, a `.npy` path, or an audio path (encoded); None as is."""
    if entry is None:
        return None
    if not isinstance(entry, str) and not _is_codes(entry):
        raise InvalidRequestError(f"{where} must be a .npy path, an audio path, codes (frames, n_vq) or null")
    value = normalize_voice(resolve_path_or_codes(entry, base_dir), where)
    if isinstance(value, Path):
        if encode_voice is None:
            raise InvalidRequestError(f"{where}: {value} is audio; encoding it needs the codec (or give codes)")
        return np.asarray(encode_voice(value))
    return value
