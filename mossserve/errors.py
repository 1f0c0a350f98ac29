"""Errors that mean "the caller did something wrong" rather than "mossserve is broken".

The CLI prints these without a traceback and the server maps them to HTTP 4xx.
"""


class MossServeError(Exception):
    """Base class of every error mossserve raises on purpose."""


class InvalidRequestError(MossServeError, ValueError):
    """A request (text, voice, codes, options) that cannot be served as given."""


class PromptTooLongError(InvalidRequestError):
    """A prompt longer than the engine's length (`max_len`) allows."""


class CheckpointError(MossServeError):
    """A checkpoint directory or file that does not match what its config promises."""


class AudioError(InvalidRequestError):
    """Audio that cannot be read, is empty, silent, too long, or in an unsupported format."""


class EngineFullError(MossServeError):
    """The engine's queue is full: retry later (HTTP 503)."""


class SessionLimitError(EngineFullError):
    """The engine holds `max_sessions` sessions: one must be closed to open another (waiting alone
    frees none, as sessions are never evicted)."""


class EngineClosedError(MossServeError):
    """The engine has shut down and takes no more requests (HTTP 503)."""


class EngineBrokenError(EngineClosedError):
    """The engine, not shut down, can run no request: its thread has ended (HTTP 503, not a shutdown)."""


class RequestAborted(MossServeError):
    """The request was aborted before it finished."""
