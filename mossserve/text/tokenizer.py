"""The text tokenizer of a checkpoint, read from its `tokenizer.json` with the `tokenizers` library.

No transformers: the published `tokenizer.json` already holds everything that encoding and
decoding need (BPE, NFC normalizer, Qwen2 split, byte-level mapping, added tokens). Added tokens
are matched verbatim in the raw text, so a special-token spelling inside text becomes that
token, as in the reference; `encode_user` refuses such spellings in what a user typed. No BOS/EOS
is ever added. `tokenizer_config.json` is read for the
spellings of the EOS and PAD tokens.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from ..errors import CheckpointError, InvalidRequestError
from ..speech_request import check_text


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, eos_token: str | None = None, pad_token: str | None = None):
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.pad_token = pad_token

    @classmethod
    def from_dir(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        tokenizer_file, config_file = path / "tokenizer.json", path / "tokenizer_config.json"
        for file in (tokenizer_file, config_file):
            if not file.is_file():
                raise CheckpointError(f"{file} not found: a checkpoint needs tokenizer.json and tokenizer_config.json")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise CheckpointError(f"{tokenizer_file} cannot be read as a tokenizer: {e}") from None
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file} must hold a JSON object")
        return cls(tokenizer, _token_spelling(config.get("eos_token")), _token_spelling(config.get("pad_token")))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def special(self) -> dict[int, str]:
        """The control tokens' ids -> their spellings: the added tokens flagged special, and every
        `<|...|>` one whatever its flag (Qwen3 flags `<|fim_pad|>` non-special, and MOSS-TTS reuses
        its id as an audio slot: a typed spelling must not become that id)."""
        return {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()
                if t.special or (t.content.startswith("<|") and t.content.endswith("|>"))}

    def encode_user(self, text: str, name: str, allowed: Sequence[str] = ()) -> list[int]:
        """Text a user typed (`name` says which field), tokenized; InvalidRequestError if it spells a
        special token other than `allowed`. The reference would read the spelling as the control id
        (`<|im_end|>` closes the turn early); read as plain text, the markup would be spoken. No user
        text needs those ids. Text UTF-8 cannot hold (a lone surrogate) is refused by name too: the
        tokenizer's own error is a bare TypeError."""
        check_text(text, name)
        ids = self.encode(text)
        spelled = sorted({self.special[i] for i in ids if i in self.special} - set(allowed))
        if spelled:
            only = f" (only {' and '.join(allowed)} are allowed)" if allowed else ""
            raise InvalidRequestError(f"{name} contains the special token(s) {', '.join(spelled)}, which text may not "
                                      f"use{only}")
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))

    def tokens(self, text: str) -> list[str]:
        """The token spellings of `encode(text)` (byte-level form, e.g. 'Ġ' for a space)."""
        return self.tokenizer.encode(text, add_special_tokens=False).tokens


def _token_spelling(value: object) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
