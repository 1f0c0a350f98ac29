"""JSON that users hand us (requests, conversations, session scripts, checkpoint configs), read with
one set of clear errors: missing, unreadable, not UTF-8, not JSON, or nested too deeply to parse."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, MossServeError


def read_json_file(path: str | Path, kind: str = "file", error: type[MossServeError] = InvalidRequestError) -> Any:
    """The file's JSON value; `error` (with `kind` naming the file in "not found") otherwise."""
    return parse_json(read_text_file(path, kind, "valid JSON", error), str(path), error)


def read_text_file(path: str | Path, kind: str, holds: str, error: type[MossServeError] = InvalidRequestError) -> str:
    """A UTF-8 text file's text; `error` otherwise (`kind` names the file in "not found", `holds`
    says what it should be in "not UTF-8")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte order mark (Notepad writes one) is no text
    except FileNotFoundError:
        raise error(f"{kind} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not {holds}: it is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None


def parse_json(text: str, where: str, error: type[MossServeError] = InvalidRequestError) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply to read") from None
