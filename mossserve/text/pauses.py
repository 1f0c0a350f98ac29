"""Inline pause markers, `[pause 3.2s]` (MOSS-TTS v1.5): plain text the model learned to read as
silence of that length. The runaway guard must allow for them: a long pause is many frames for few
text tokens, and its silence may repeat one frame for longer than the guard's loop limit."""
from __future__ import annotations

import re

PAUSE = re.compile(r"\[pause\s*(\d+(?:\.\d+)?)\s*s\]", re.IGNORECASE)
LONGEST_PAUSE_S = 60.0  # a longer marker counts as this long: it must not switch the loop guard off


def pause_seconds(text: str | None) -> list[float]:
    """The length of every pause marker in `text`, in order (at most LONGEST_PAUSE_S each)."""
    return [min(float(m), LONGEST_PAUSE_S) for m in PAUSE.findall(text or "")]
