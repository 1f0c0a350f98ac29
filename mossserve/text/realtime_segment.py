"""How the Realtime streaming session cuts incoming text into segments (README §5.6, `push_text`).

Text arrives in deltas and is buffered; a segment is cut at the first boundary (sentence end,
short pause, closing bracket, each with its trailing whitespace, or a newline) that ends at
>= `min_chars` characters, else, once the buffer holds >= `buffer_size` characters, after its
last space; cuts repeat while one exists. Each segment is tokenised on its own by the caller,
so the ids fed depend on where the deltas fall (README §8.4). Pure functions, no model state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

BOUNDARY = re.compile(
    r"[。！？!?\.\u2026]\s*"  # sentence ends: 。！？ ! ? . …
    r"|[,，;；:：\u2014\u2013\-]\s*"  # short pauses: , ， ; ； : ： — – -
    r"|\)\s*|\]\s*"  # closing brackets
    r"|\n"
)
MIN_CHUNK_CHARS = 8
TEXT_BUFFER_SIZE = 32


@dataclass(frozen=True)
class Segmenter:
    min_chars: int = MIN_CHUNK_CHARS
    buffer_size: int = TEXT_BUFFER_SIZE

    def cut(self, buffer: str) -> tuple[list[str], str]:
        """buffer -> (complete segments in order, the text kept for later)."""
        segments = []
        while buffer:
            cut = self._cut_index(buffer)
            if cut is None:
                break
            segments.append(buffer[:cut])
            buffer = buffer[cut:]
        return segments, buffer

    def _cut_index(self, buffer: str) -> int | None:
        if len(buffer) >= self.min_chars:
            for match in BOUNDARY.finditer(buffer):
                if match.end() >= self.min_chars:
                    return match.end()
        if len(buffer) >= self.buffer_size:
            space = buffer.rfind(" ")
            if space != -1:
                return space + 1
        return None


class TextSegmentStream:
    """The session's text side: `push(delta)` and `end()` return the token ids that became ready."""

    def __init__(self, encode, segmenter: Segmenter | None = None) -> None:
        self.encode = encode
        self.segmenter = segmenter or Segmenter()
        self.buffer = ""

    def push(self, delta: str) -> list[int]:
        segments, self.buffer = self.segmenter.cut(self.buffer + delta)
        return [i for segment in segments for i in self.encode(segment)]

    def end(self) -> list[int]:
        """Whatever text is left, tokenised as one piece."""
        rest, self.buffer = self.buffer, ""
        return self.encode(rest) if rest else []
