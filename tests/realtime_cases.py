"""The Realtime fixture: its directory, loaded once per session, and its golden files."""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

REALTIME_DIR = Path(__file__).parent / "fixtures" / "moss_tts_realtime"


@cache
def golden(name: str) -> dict[str, torch.Tensor]:
    """`<name>.safetensors` of the fixture (prompts, teacher_forced, generation, sampling_ops)."""
    return load_file(REALTIME_DIR / f"{name}.safetensors")


@cache
def golden_json(name: str) -> dict:
    return json.loads((REALTIME_DIR / f"{name}.json").read_text(encoding="utf-8"))


@cache
def realtime_family():
    """The fixture checkpoint through `load_realtime` (fp32, cpu), as the registry will load it."""
    from mossserve.models.config_utils import read_json
    from mossserve.models.moss_realtime_family import load_realtime

    config = read_json(REALTIME_DIR / "config.json")
    return load_realtime(REALTIME_DIR, str(REALTIME_DIR), config, torch.device("cpu"), torch.float32)
