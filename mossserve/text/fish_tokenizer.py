"""The Fish S2 Pro tokenizer: the checkpoint's `tokenizer.json` plus the ids a prompt needs.

Every id is read from the tokenizer (README section 2.4), never hard-coded: `<|im_start|>`,
`<|im_end|>`, `<|voice|>`, and the semantic range (smallest and largest `<|semantic:i|>` id; the
config's values only when the tokenizer has no semantic tokens).

Special-token policy for text a user types (`input`, `reference_text`). The tokenizer matches
added-token spellings verbatim, so the reference turns `<|im_end|>` typed in user text into the
control id — a prompt injection that closes the user turn early. We keep what the goldens pin:
`<|phoneme_start|>` / `<|phoneme_end|>` spans become their ids, and `<|speaker:N|>` is plain text
anyway. The spelling of any other special token (`<|im_start|>`, `<|im_end|>`, `<|voice|>`,
`<|semantic:i|>`, `<|endoftext|>`, ...) is refused with an error that names it: silently turning
it into plain text would read the markup aloud, and no user text needs those ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .tokenizer import TextTokenizer

INLINE_TOKENS = ("<|phoneme_start|>", "<|phoneme_end|>")  # special tokens user text may spell
_SEMANTIC = re.compile(r"<\|semantic:(\d+)\|>")


@dataclass(frozen=True)
class FishTokenizer:
    text: TextTokenizer
    im_start: int
    im_end: int
    voice: int
    semantic_start: int
    semantic_end: int

    @classmethod
    def from_dir(cls, path: str | Path, semantic_fallback: tuple[int, int] | None = None) -> "FishTokenizer":
        """`semantic_fallback`: the config's (semantic_start_token_id, semantic_end_token_id)."""
        text = TextTokenizer.from_dir(path)
        added = text.tokenizer.get_added_tokens_decoder()
        ids = {token.content: token_id for token_id, token in added.items()}
        missing = [name for name in ("<|im_start|>", "<|im_end|>", "<|voice|>") if name not in ids]
        if missing:
            raise CheckpointError(f"{path}: the tokenizer has no {', '.join(missing)} token (not a Fish S2 Pro tokenizer)")
        semantic = _semantic_range(ids, path) or semantic_fallback
        if semantic is None:
            raise CheckpointError(f"{path}: the tokenizer has no <|semantic:i|> tokens and no fallback range was given")
        return cls(text, ids["<|im_start|>"], ids["<|im_end|>"], ids["<|voice|>"], semantic[0], semantic[1])

    @property
    def semantic_count(self) -> int:
        """Codes of codebook 0 (the semantic codebook) lie in 0..semantic_count - 1."""
        return self.semantic_end - self.semantic_start + 1

    def encode(self, text: str) -> list[int]:
        """A prompt-template part, tokenized on its own (special-token spellings allowed)."""
        return self.text.encode(text)

    def encode_user(self, text: str, name: str) -> list[int]:
        """Text a user typed, tokenized on its own; refuses control-token spellings (module docstring)."""
        return self.text.encode_user(text, name, INLINE_TOKENS)


def _semantic_range(ids: dict[str, int], path: str | Path) -> tuple[int, int] | None:
    """(first, last) id of `<|semantic:0|>`..`<|semantic:K|>`, which must be consecutive ids."""
    semantic = {int(m.group(1)): token_id for content, token_id in ids.items() if (m := _SEMANTIC.fullmatch(content))}
    if not semantic:
        return None
    start = semantic.get(0)
    if start is None or any(semantic.get(i) != start + i for i in range(len(semantic))):
        raise CheckpointError(f"{path}: the <|semantic:i|> tokens must have consecutive ids starting at <|semantic:0|>")
    return start, start + len(semantic) - 1
