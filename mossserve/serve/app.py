"""The FastAPI application: routes, auth, CORS, body limits, error format and lifetime.

    app = create_app(ServerSettings(model="OpenMOSS-Team/MOSS-TTS", device="cuda"))

One engine per process, loaded when the app is created (a bad model fails before the server
listens) and closed when it shuts down.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from .. import __version__
from ..api import TTS
from . import errors, realtime, speech, voice_routes
from .errors import APIError
from .playground_routes import model_capabilities, mount_playground
from .settings import ServerSettings
from .speech import outcome_for
from .state import ServerState, stats_while_open
from .voices import VoiceStore

_log = logging.getLogger("mossserve.serve")
EXPOSED_HEADERS = ["X-Request-Id", "X-Finish-Reason", "X-Audio-Seconds", "X-Sample-Rate", "Retry-After",
                   "x-should-retry"]


def create_app(settings: ServerSettings | None = None, tts: TTS | None = None, voices: VoiceStore | None = None
               ) -> FastAPI:
    """`tts`: serve an already loaded model (kept open when the app stops); else load `settings.model`.
    `voices`: a store with VoiceStore's methods (Ray: one shared by every replica); else settings.data_dir's."""
    settings = settings or ServerSettings()
    state = ServerState.create(settings, tts, voices)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        speech.quiet_stream_cuts()  # here: uvicorn configures its loggers after the app is made
        yield
        state.close()

    app = FastAPI(title="mossserve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = state
    _install_errors(app, state)
    app.add_middleware(InternalErrors, failed=lambda scope: state.metrics.requests.labels(endpoint_of(scope),
                                                                                             "error").inc())
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.request_timeout_s,
                       refused=lambda: state.metrics.requests.labels("other", "client_error").inc())
    if settings.api_key:  # outermost: a request without the key is answered before its body is read
        app.add_middleware(KeyFirst, check=api_key_problem(settings.api_key),  # before routing: endpoint "other"
                           refused=lambda: state.metrics.requests.labels("other", "client_error").inc())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
    counted = [Depends(ok_counter(state))]  # speech counts its own outcomes (a stream may fail late)
    app.include_router(speech.router)  # every /v1 route's key: KeyFirst
    app.include_router(voice_routes.router, dependencies=counted)
    app.include_router(realtime.router)  # checks the key itself (a websocket has no error responses)

    def model_json(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "owned_by": "mossserve", "created": 0,
                "mossserve": model_capabilities(state.tts)}

    @app.get("/v1/models", dependencies=counted)
    async def models() -> dict:
        return {"object": "list", "data": [model_json(state.model_name)]}

    @app.get("/v1/models/{model_id:path}", dependencies=counted)
    async def model(model_id: str) -> dict:
        if not state.accepts_model(model_id):  # its name, or an OpenAI alias (tts-1, ...) a request may send
            raise APIError(404, f"model {model_id!r} is not served here; this server runs {state.model_name!r}",
                           param="model", code="model_not_found")
        return model_json(model_id)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process answers and its engine has not broken down (only a restart helps then)."""
        problem = state.engine.problem()
        if problem is not None:
            return unavailable(problem)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and the engine takes requests and serves them."""
        stats = None if state.closing else stats_while_open(state.tts)
        if stats is None:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        problem = state.engine.problem()
        if problem is not None:
            return unavailable(problem)
        return JSONResponse({"status": "ready", "model": state.model_name, "running": stats["running"],
                             "queued": stats["queued"]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    if settings.playground:
        mount_playground(app)
    return app


def unavailable(problem: str) -> JSONResponse:
    """A probe's answer while the engine cannot serve (`AsyncEngine.problem`)."""
    return JSONResponse({"status": "unavailable", "reason": f"the engine cannot serve requests: {problem}"},
                        status_code=503)


def api_key_problem(api_key: str):
    """headers -> the 401 for a request without `Authorization: Bearer <api_key>`, or None."""
    expected = api_key.encode()

    def problem(headers: Headers) -> APIError | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                            code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), expected):
            return APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    return problem


class KeyFirst:
    """The API key of every HTTP `/v1` route, checked from the headers before anything reads the body
    (FastAPI reads and parses a body before it runs a route's dependencies: a client without the key
    could make the server parse 16 MB of JSON on its event loop). Websockets check their own."""

    def __init__(self, app, check, refused) -> None:
        self.app, self.check, self.refused = app, check, refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            error = self.check(Headers(scope=scope))
            if error is not None:
                self.refused()
                response = errors.error_response(error.status_code, error.message, code=error.code,
                                                 headers=error.headers)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def ok_counter(state: ServerState):
    """A dependency that counts its route's request as `ok` once the handler returned; a handler that
    raises is counted by the error handlers instead."""
    async def count_ok(request: Request):
        yield
        state.metrics.requests.labels(endpoint_of(request.scope), "ok").inc()

    return count_ok


def endpoint_of(scope: dict) -> str:
    """The metrics label of a request: its route's path ("other" before or without routing)."""
    return getattr(scope.get("route"), "path", None) or "other"


def _install_errors(app: FastAPI, state: ServerState) -> None:
    """OpenAI-style error bodies, each refusal counted by endpoint and outcome."""
    def count(request: Request, status: int) -> None:
        state.metrics.requests.labels(endpoint_of(request.scope), outcome_for(status)).inc()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        cause = e.__cause__  # FastAPI answers any failure to read or parse the body with a generic 400
        if isinstance(cause, ClientDisconnect):  # the client left while sending it: nobody reads a reply
            count(request, 499)
            return errors.error_response(400, "the client disconnected while sending the request body")
        unreadable = _unreadable_body(cause)
        if unreadable is not None:
            count(request, 400)
            return errors.error_response(400, unreadable)
        count(request, e.status_code)
        if isinstance(e, APIError):
            return errors.error_response(e.status_code, e.message, e.param, e.code, e.headers)
        return errors.error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        """A body that fails the schema: 400 invalid_request_error, as OpenAI answers a bad parameter
        (FastAPI's 422 makes OpenAI's clients raise UnprocessableEntityError)."""
        count(request, 400)
        route = request.scope.get("route")
        if getattr(route, "endpoint", None) is voice_routes.upload_voice and \
                not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            # its fields are a form's: a JSON body read as none of them was told "name is required"
            return errors.error_response(400, "a voice is uploaded as multipart/form-data: name, file (the audio) "
                                              "and an optional transcript")
        return errors.error_response(400, *errors.describe_validation(e.errors()))


def _unreadable_body(cause: BaseException | None) -> str | None:
    """Why a body that is not JSON this API reads failed to parse (None: another failure); a 400, as
    OpenAI answers a bad body, so its clients raise BadRequestError."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid JSON: it is not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON for this API: it is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # Python's limit on int() of a string
        return (f"the request body is not valid JSON for this API: a number in it has more than "
                f"{sys.get_int_max_str_digits()} digits")
    return None


class InternalErrors:
    """A bug while handling a request reaches the client as a 500 in the API's error shape, and the
    traceback goes to the log (Starlette's own answer is plain text, after which the server resets
    the connection). A response already under way is left to the server to cut."""

    def __init__(self, app, failed) -> None:
        self.app, self.failed = app, failed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:
                raise
            _log.exception("failed handling %s %s", scope.get("method"), scope.get("path"))
            self.failed(scope)
            await errors.error_response(500, f"internal error: {type(e).__name__}: {e}",
                                        code="internal_error")(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413: at once when Content-Length says so, else as
    soon as a chunked body passes the limit. A body still arriving `timeout` seconds after its
    request came is refused with 408: a client trickling a body held its connection for ever."""

    def __init__(self, app, limit: int, refused, timeout: float) -> None:
        self.app, self.limit, self.refused, self.timeout = app, limit, refused, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            self.refused()  # before routing: counted under endpoint "other"
            return await errors.error_response(413, self._message(), code="body_too_large")(scope, receive, send)
        seen, deadline = 0, time.monotonic() + self.timeout

        async def limited() -> dict:
            nonlocal seen, deadline
            if deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except (TimeoutError, asyncio.TimeoutError):
                    raise APIError(408, f"the request body did not arrive within this server's {self.timeout:g} s "
                                        "request timeout", code="body_timeout") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, self._message(), code="body_too_large")
                if not message.get("more_body", False):
                    deadline = None  # all in: later receives wait for the client's disconnect, untimed
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.limit} bytes"
