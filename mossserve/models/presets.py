"""Per-model generation defaults: the model cards' recommended settings, keyed by task.

Delay checkpoints share one class and one config format; which model a directory holds
(MOSS-TTS, -TTSD, -VoiceGenerator, -SoundEffect) is only visible in its published name, so a
directory saved under another name takes `task` from its user (`--task`); without either it is
MOSS-TTS. A `generation_config.json` in the checkpoint, when present, overrides these values.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import CheckpointError, InvalidRequestError
from ..sampling import SamplingParams


@dataclass(frozen=True)
class Preset:
    task: str
    sampling: SamplingParams
    max_new_frames: int


PRESETS = {
    "tts": Preset("tts", SamplingParams(audio_temperature=1.7, audio_top_p=0.8, audio_top_k=25, audio_repetition_penalty=1.0), 4096),
    "dialogue": Preset("dialogue", SamplingParams(audio_temperature=1.1, audio_top_p=0.9, audio_top_k=50, audio_repetition_penalty=1.1), 2000),
    "voice_design": Preset("voice_design", SamplingParams(audio_temperature=1.5, audio_top_p=0.6, audio_top_k=50, audio_repetition_penalty=1.1), 4096),
    "sound_effect": Preset("sound_effect", SamplingParams(audio_temperature=1.5, audio_top_p=0.6, audio_top_k=50, audio_repetition_penalty=1.2), 4096),
}

NAME_PATTERNS = (
    ("dialogue", re.compile(r"ttsd", re.I)),
    ("voice_design", re.compile(r"voice[-_ ]?generator", re.I)),
    ("sound_effect", re.compile(r"sound[-_ ]?effect", re.I)),
)


def task_from_name(name: str) -> str | None:
    """The task a published checkpoint name implies (MOSS-TTSD-v1.0 -> dialogue, ...); None when
    it names none of the other models."""
    for task, pattern in NAME_PATTERNS:
        if pattern.search(name):
            return task
    return None


def check_task(task: str | None) -> None:
    if task is not None and task not in PRESETS:
        raise InvalidRequestError(f"unknown task {task!r}; choose one of {', '.join(PRESETS)}")


def preset_for(model_dir: Path, name: str, codebooks: int, base: Preset | None = None,
               task: str | None = None) -> Preset:
    """The preset for a checkpoint (`task`, else by its name, or `base` for a family with its own
    defaults), with the checkpoint's generation_config.json applied: a value out of range there is
    the checkpoint's error at load, not every request's."""
    preset = base or PRESETS[task or task_from_name(name) or "tts"]
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return preset
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    known = {f.name for f in fields(SamplingParams)} - {"seed"}
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(values).__name__}")
    try:
        sampling = preset.sampling.with_overrides(**{k: v for k, v in values.items() if k in known})
        sampling.validate(codebooks)
    except InvalidRequestError as e:
        raise CheckpointError(f"{path}: {e}") from None
    frames = values.get("max_new_tokens")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise CheckpointError(f"{path}: max_new_tokens must be a positive integer, got {frames!r}")
    return Preset(preset.task, sampling, preset.max_new_frames if frames is None else frames)
