"""A Realtime session script (docs/cli.md): turns of a voice-agent conversation, and how one
turn's streamed text becomes what the backbone is fed.

The reference's session applies every push as it comes: text is cut into segments, each
tokenised alone; the prefill happens at the first push that leaves 12 ids pending (the first 12
of them), or at the end of the text (everything pending); after it one id is fed per step, then
text pads. Given the pushes in order, `split_text` replays that rule, so a turn whose pieces are
all known feeds exactly what the reference's session feeds however fast the pieces arrive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from ..json_files import read_json_file
from ..speech_request import load_codes, resolve_path_or_codes
from .realtime_prompt import CODEBOOKS, DELAY_TOKENS, prefill_length
from .realtime_segment import TextSegmentStream


@dataclass
class RealtimeTurn:
    """One turn: what the user said (text, audio codes (U, 16)) and the assistant's text as pushed."""

    pieces: list[str] = field(default_factory=list)  # text deltas, in order (one piece: the whole text)
    token_chunks: list[list[int]] = field(default_factory=list)  # or token-id chunks
    user_text: str | None = None
    user_audio: np.ndarray | None = None
    new_context: bool = False
    audio: np.ndarray | None = None  # the assistant's speech, given (a conversation's): codes (16, F)


@dataclass
class SessionScript:
    voice: np.ndarray | None
    turns: list[RealtimeTurn]

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> SessionScript:
        if not isinstance(data, dict):
            raise InvalidRequestError(f"a session script is a JSON object with turns, got {type(data).__name__}")
        unknown = sorted(set(data) - {"voice", "turns"})
        if unknown:
            raise InvalidRequestError(f"unknown session field(s): {', '.join(unknown)}")
        turns = data.get("turns")
        if not isinstance(turns, list) or not turns:
            raise InvalidRequestError("a session script needs a non-empty list of turns")
        return cls(read_codes(data.get("voice"), "voice", base_dir), [_turn(t, i, base_dir) for i, t in enumerate(turns)])

    @classmethod
    def from_json(cls, path: str | Path) -> SessionScript:
        path = Path(path)
        return cls.from_dict(read_json_file(path, "session script"), base_dir=path.parent)


def is_session_script(data: Any) -> bool:
    return isinstance(data, dict) and "turns" in data


def split_text(turn: RealtimeTurn, encode) -> tuple[list[int], list[int]]:
    """(prefill ids, ids fed one per step after them), as the reference's session decides them."""
    stream, pending, prefill = TextSegmentStream(encode), [], None
    pushes = [stream.push(piece) for piece in turn.pieces] + [list(chunk) for chunk in turn.token_chunks]
    for ids in pushes:
        pending += ids
        if prefill is None and len(pending) >= DELAY_TOKENS:
            count = prefill_length(len(pending), ended=False)
            prefill, pending = pending[:count], pending[count:]
    pending += stream.end()
    if prefill is None:
        if not pending:
            raise InvalidRequestError("the turn's text is empty: nothing to say")
        prefill, pending = pending, []  # prefill_length(n, ended=True) == n
    return prefill, pending


def _turn(value: Any, index: int, base_dir: Path | None) -> RealtimeTurn:
    where = f"turns[{index}]"
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where} must be an object")
    unknown = sorted(set(value) - {"user_text", "user_audio", "input", "input_tokens", "new_context"})
    if unknown:
        raise InvalidRequestError(f"{where}: unknown field(s) {', '.join(unknown)}")
    new_context = value.get("new_context", False)
    if not isinstance(new_context, bool):
        raise InvalidRequestError(f"{where}.new_context must be true or false, got {new_context!r}")
    turn = RealtimeTurn(user_text=value.get("user_text"), new_context=new_context,
                        user_audio=read_codes(value.get("user_audio"), f"{where}.user_audio", base_dir))
    if turn.user_text is not None and not isinstance(turn.user_text, str):
        raise InvalidRequestError(f"{where}.user_text must be a string")
    if turn.user_audio is not None and turn.user_text is None:
        raise InvalidRequestError(f"{where}: user_audio needs user_text (the user turn layout has both)")
    read_assistant_text(turn, value, f"{where}.", ("input", "input_tokens"))
    return turn


def read_assistant_text(turn: RealtimeTurn, value: dict, where: str, names: tuple[str, str]) -> None:
    """The assistant's text into `turn`: `names[0]` the text whole or as the pieces a streaming client
    pushed, or `names[1]` token-id chunks; exactly one of them."""
    text_name, tokens_name = names
    if (text_name in value) == (tokens_name in value):
        raise InvalidRequestError(f"{where.rstrip('.')}: give {text_name} (text or its pieces) or {tokens_name}, "
                                  "not both or neither")
    if text_name in value:  # null included: refused below, as any other non-text
        text = value[text_name]
        pieces = [text] if isinstance(text, str) else text
        if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
            raise InvalidRequestError(f"{where}{text_name} must be a string or a list of strings")
        turn.pieces = pieces
    else:
        chunks = value[tokens_name]
        if not isinstance(chunks, list) or not all(
                isinstance(c, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in c) for c in chunks):
            raise InvalidRequestError(f"{where}{tokens_name} must be a list of token-id lists")
        turn.token_chunks = chunks


CODEC_QUANTIZERS = 32  # MOSS-Audio-Tokenizer's: a code file has no more codebooks (more is a transposed file)


def read_codes(value: Any, name: str, base_dir: Path | None) -> np.ndarray | None:
    """Codes as nested lists or a `.npy` path (relative to the script), handed on as `(16, T)`, which the
    turn layouts' orientation rule reads back without its 16-frame ambiguity. A `.npy` file is a code
    file, time-major `(T, K)` (K >= 16; the first 16 codebooks are used) whatever its shape (a 16-frame
    voice of 32 codebooks is not 32 frames of 16). Nested lists are time-major too, except that the
    reference's `[16, T]` (T other than 16) is read as it is upstream."""
    if value is None:
        return None
    value = resolve_path_or_codes(value, base_dir)
    if isinstance(value, str):
        if not value.endswith(".npy"):
            raise InvalidRequestError(f"{name}: give codes (nested lists) or a .npy file, got {value!r}")
        array = load_codes(Path(value), name)
        reference_layout = False
    else:
        try:
            array = np.asarray(value)
        except ValueError:
            raise InvalidRequestError(f"{name}: codes must be a rectangular list of integer lists") from None
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise InvalidRequestError(f"{name}: codes must be 2-D integers, got {array.dtype} {array.shape}")
        reference_layout = array.shape[0] == CODEBOOKS and array.shape[1] != CODEBOOKS
    array = array.astype(np.int64)
    if reference_layout:
        return array  # (16, T), as the reference's sessions take it
    if not CODEBOOKS <= array.shape[1] <= CODEC_QUANTIZERS:
        raise InvalidRequestError(f"{name}: codes need {CODEBOOKS} to {CODEC_QUANTIZERS} codebooks, time first "
                                  f"(T, {CODEBOOKS}); got shape {array.shape} (a .npy file is read time first)")
    return array[:, :CODEBOOKS].T
