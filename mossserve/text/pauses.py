"""Inline pause markers, `[pause 3.2s]` (MOSS-TTS v1.5): plain text the model learned to read as
silence of that length. The runaway guard must allow for them: a long pause is many frames for few
text tokens, and its silence may repeat one frame for longer than the guard's loop limit."""
from __future__ import annotations

import re

PAUSE = re.compile(r"\[pause\s*(\d+(?:\.\d+)?)\s*s\]", re.IGNORECASE)
# Markers with only spaces or punctuation between them: one silence, as long as all of them.
SILENCE = re.compile(rf"{PAUSE.pattern}(?:[\s.,;:!?，。！？；：、…]*{PAUSE.pattern})*", re.IGNORECASE)
LONGEST_PAUSE_S = 60.0  # a longer silence counts as this long: it must not switch the loop guard off


def pause_seconds(text: str | None) -> list[float]:
    """The length of every silence `text` asks for, in order (at most LONGEST_PAUSE_S each):
    `[pause 5s][pause 5s]` is one of 10 s, which the loop guard must allow whole."""
    return [min(sum(float(m) for m in PAUSE.findall(run.group(0))), LONGEST_PAUSE_S)
            for run in SILENCE.finditer(text or "")]
