"""Fish S2 Pro speaker turns and text batches (fixtures/fish_s2_pro/README.md section 3.4).

The reference generates a long multi-speaker text in batches, one after another in one growing
conversation. A batch is a group of speaker turns: a `<|speaker:N|>` tag with the text up to the
next tag. Reproduced exactly, quirks included: text before the first tag is dropped, turns are
stripped but untagged text is not, and the byte budget counts the turns' UTF-8 bytes without the
newlines that join them.
"""
from __future__ import annotations

import re

SPEAKER_TAG = re.compile(r"<\|speaker:\d+\|>")
# Bytes per batch: the reference CLI's default, which CONTRACTS.md fixes for `say` (its server's is 200).
DEFAULT_CHUNK_LENGTH = 300
MAX_TURNS_PER_BATCH = 5  # the reference's generate_long overrides its helper's default of 3


def split_turns(text: str) -> list[str]:
    """Each speaker tag plus the text up to the next tag, stripped; text before the first tag is dropped."""
    starts = [match.start() for match in SPEAKER_TAG.finditer(text)]
    return [text[start:end].strip() for start, end in zip(starts, starts[1:] + [len(text)])]


def group_turns(turns: list[str], chunk_length: int, max_turns: int = MAX_TURNS_PER_BATCH) -> list[str]:
    """Greedy batches: a new one starts when the current holds `max_turns` turns or when this turn
    would push its byte count above `chunk_length` (an empty batch takes any turn). Joined by newlines."""
    batches: list[str] = []
    current: list[str] = []
    size = 0
    for turn in turns:
        turn_bytes = len(turn.encode("utf-8"))
        if current and (len(current) >= max_turns or size + turn_bytes > chunk_length):
            batches.append("\n".join(current))
            current, size = [], 0
        current.append(turn)
        size += turn_bytes
    if current:
        batches.append("\n".join(current))
    return batches


def batch_texts(text: str, chunk_length: int = DEFAULT_CHUNK_LENGTH) -> list[str]:
    """The texts of the batches a request's input is generated in; text without any tag is one batch, as given."""
    turns = split_turns(text)
    return group_turns(turns, chunk_length) if turns else [text]
