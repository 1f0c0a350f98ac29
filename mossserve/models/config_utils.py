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
