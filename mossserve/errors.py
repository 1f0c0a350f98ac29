"""Errors that mean "the caller did something wrong" rather than "mossserve is broken".

The CLI prints these without a traceback and the server maps them to HTTP 4xx.
"""


class MossServeError(Exception):
    """Base class of every error mossserve raises on purpose."""


class InvalidRequestError(MossServeError, ValueError):
    """A request (text, voice, codes, options) that cannot be served as given."""


class PromptTooLongError(InvalidRequestError):
    """A prompt longer than the engine's length (`max_len`) allows."""


class ContextFullError(InvalidRequestError):
    """A session's context (its earlier turns: `held` positions) leaves no room for its next turn's
    prompt (`rows`) within `max_len`: only a new session (a fresh context) runs it."""

    def __init__(self, held: int, rows: int, max_len: int) -> None:
        self.held, self.rows, self.max_len = held, rows, max_len
        super().__init__(f"the prompt needs {held + rows} positions (its session's {held} and its own {rows}); "
                         f"this engine allows {max_len}: start a new session, or send less text")

    def __reduce__(self):  # pickled (a final chunk crossing processes) with its own arguments
        return type(self), (self.held, self.rows, self.max_len)


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
