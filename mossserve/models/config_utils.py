"""Reading published config.json files into dataclasses, with errors that name the field."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..json_files import read_json_file


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, which must hold an object."""
    config = read_json_file(path, Path(path).name, CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def require(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise CheckpointError(f"{where}: missing config field '{key}'")
    return config[key]


def rope_type_of(config: dict[str, Any]) -> str:
    """The RoPE variant, wherever a transformers version wrote it: `rope_parameters.rope_type` (5.x),
    `rope_scaling.rope_type` or its older spelling `rope_scaling.type` (4.x), or a top-level `rope_type`;
    the first that is not "default" (a config holding two spellings is read as its scaled one)."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    named = (rope.get("rope_type"), scaling.get("rope_type"), scaling.get("type"), config.get("rope_type"))
    return next((name for name in named if name not in (None, "default")), "default")


def check_heads(heads: int, kv_heads: int, where: str) -> None:
    if heads < 1 or kv_heads < 1:
        raise CheckpointError(f"{where}: attention heads must be at least 1, got {heads} query and {kv_heads} key/value heads")
