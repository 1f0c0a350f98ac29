"""Errors as OpenAI's API writes them: `{"error": {"message", "type", "param", "code"}}`.

Every refusal the server makes goes through `APIError`; the app's handlers turn FastAPI's own
validation errors and mossserve's errors into the same shape, so a client sees one format.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import AudioError, EngineBrokenError, EngineClosedError, EngineFullError, InvalidRequestError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # OpenAI's, with code invalid_api_key
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class APIError(HTTPException):
    """A refusal with an OpenAI-style body. An HTTPException so FastAPI re-raises it unchanged
    even from inside body parsing (the body-size limit raises it there)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.message, self.param, self.code = message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body; `x-should-retry: false` unless it says when to retry (Retry-After): OpenAI's
    clients otherwise retry every 409 and 5xx, so a timed-out request would run three times."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    headers = dict(headers or {})
    if not any(name.lower() == "retry-after" for name in headers):
        headers["x-should-retry"] = "false"
    return JSONResponse(body, status_code=status, headers=headers)


def error_event(status: int, message: str, code: str | None = None) -> dict:
    """The error a response of `status` would carry, as an SSE event (the stream has started)."""
    return {"type": "error", "error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                       "code": code}}


def from_mossserve(e: Exception, retry_after_s: int) -> APIError:
    """mossserve's own errors -> the status a client should see."""
    if isinstance(e, EngineFullError):
        return APIError(503, f"the server is at capacity ({e})", code="queue_full",
                        headers={"Retry-After": str(retry_after_s)})
    if isinstance(e, EngineBrokenError):
        return APIError(503, f"the engine cannot serve requests: {e}", code="engine_unavailable")
    if isinstance(e, EngineClosedError):
        return APIError(503, "the server is shutting down", code="shutting_down",
                        headers={"Retry-After": str(retry_after_s)})
    if isinstance(e, AudioError):
        return APIError(400, str(e), code="invalid_audio")
    if isinstance(e, InvalidRequestError):
        return APIError(400, _api_names(str(e)))
    return APIError(500, f"internal error: {e}")


def naming_field(error: APIError, fields: Iterable[str]) -> APIError:
    """`error` with `param` set to the request field its message begins with (`input contains ...`,
    `speakers[1].ref_text ...`), when it has none: a model's refusals name the field in words only."""
    match = re.match(r"([a-z_]+)((?:\[\d+\])?(?:\.[a-z_]+)?)[ :]", error.message)
    if error.param is None and match and match.group(1) in fields:
        error.param = match.group(1) + match.group(2)
    return error


def _api_names(message: str) -> str:
    """A model's refusal speaks of SpeechRequest's and SamplingParams' fields; the API spells some of
    them otherwise (`ref_text`; `temperature` etc. set the audio heads')."""
    message = re.sub(r"\breference_text\b", "ref_text", message)
    return re.sub(r"\baudio_(temperature|top_p|top_k|repetition_penalty)\b", r"\1", message)


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's first error: which field, what was wrong, what it got."""
    first = errors[0]
    location = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(location) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")  # our own validators' words
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    if first.get("type") == "missing":
        if param is None:
            return "the request body is empty: send a JSON object with at least 'input'", None
        return f"{param} is required", param
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}", param
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    if param is None:
        return f"invalid request body: {message}", None
    shown = _shown(first.get("input"))
    return f"{param}: {message} (got {shown})", param


def _shown(value: object) -> str:
    """`value`'s repr cut to 80 characters; a long list or object is cut before its repr is made
    (half a million speakers would take a second)."""
    if isinstance(value, (list, dict)) and len(value) > 80:  # each item takes at least a character
        value = value[:80] if isinstance(value, list) else dict(itertools.islice(value.items(), 80))
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
