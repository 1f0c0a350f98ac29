"""Inline pause markers, `[pause 3.2s]` (MOSS-TTS v1.5): plain text the model learned to read as
silence of that length. The runaway guard must allow for them: a long pause is many frames for few
text tokens, and its silence may repeat one frame for longer than the guard's loop limit."""
from __future__ import annotations

import re

PAUSE = re.compile(r"\[pause\s*(\d+(?:\.\d+)?)\s*s\]", re.IGNORECASE)


def pause_seconds(text: str | None) -> list[float]:
    """The length of every pause marker in `text`, in order."""
    return [float(m) for m in PAUSE.findall(text or "")]
