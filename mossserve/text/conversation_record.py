"""The record form of a Realtime or Fish S2 Pro conversation file: an object holding a
`conversations` list of messages (upstream's fine-tuning record) plus its family's fields, or
that list alone. A list holding one record (or one list) is that record (that list)."""
from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError


def is_record_batch(data: Any) -> bool:
    """A file of several records (a list of them), which `prompt` and `say` refuse."""
    return isinstance(data, list) and len(data) > 1 and all(isinstance(r, dict) and "conversations" in r for r in data)


def read_record(data: Any, fields: set[str], model: str) -> tuple[dict, list]:
    """(the record, its non-empty message list); unknown record fields are refused."""
    if isinstance(data, list) and len(data) == 1 and (isinstance(data[0], list) or
                                                      isinstance(data[0], dict) and "conversations" in data[0]):
        data = data[0]  # a list holding one record, or one list of messages
    record = {"conversations": data} if isinstance(data, list) else data
    if not isinstance(record, dict):
        raise InvalidRequestError(f"a {model} conversation is an object with `conversations` (a list of messages) "
                                  f"or that list; got {type(data).__name__}")
    unknown = sorted(set(record) - fields)
    if unknown:
        raise InvalidRequestError(f"unknown conversation field(s): {', '.join(unknown)}")
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("a conversation needs a non-empty list of messages (`conversations`)")
    return record, messages


def message_role(message: Any, where: str, fields: dict[str, set[str]]) -> str:
    """The message's role, one of `fields`' keys; fields other than that role's are refused."""
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{where} must be an object with a role")
    role = message.get("role")
    if role not in fields:
        raise InvalidRequestError(f"{where}.role must be 'user' or 'assistant', got {role!r}")
    unknown = sorted(set(message) - fields[role])
    if unknown:
        raise InvalidRequestError(f"{where}: unknown {role} field(s) {', '.join(unknown)}")
    return role
