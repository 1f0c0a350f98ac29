"""Reading published config.json files into dataclasses, with errors that name the field."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def require(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise CheckpointError(f"{where}: missing config field '{key}'")
    return config[key]
