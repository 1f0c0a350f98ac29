"""The Ray Serve application: replicas of `mossserve serve`'s own FastAPI app, one engine each.

    app = build_app(ServerSettings(model=...), RayOptions(replicas=2))
    serve.run(app, name="mossserve", route_prefix="/")

Each replica builds the app with `create_app` (same routes, schemas, errors, streaming, SSE and
websockets) and adds only: an `x-mossserve-replica` header on every response, /metrics answered
from the MetricsBoard (every replica's metrics, labelled `replica`) and, with `voice_service`, the
VoiceService's store in place of a local data directory.
Serve's router sends each request to the less loaded of two replicas, at most
`max_running + max_queued` at a time per replica (the engine's own capacity).
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..serve.app import create_app
from ..serve.settings import ServerSettings
from ..serve.speech import quiet_stream_cuts
from ..serve.state import ServerState
from .metrics_board import PUSH_INTERVAL_S, MetricsBoard, labelled
from .voice_service import RemoteVoiceStore, VoiceService

REPLICA_HEADER = "x-mossserve-replica"
APP_NAME = "mossserve"
BOARD_TIMEOUT_S = 2.0  # a scrape waits this long for the MetricsBoard (restarting?), then answers alone
logger = logging.getLogger("ray.serve")


@dataclass
class RayOptions:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; replaces `replicas`
    torch_threads: int = 1  # per replica: replicas on one machine share its cores
    num_cpus: float = 1.0  # Ray CPUs reserved per replica (a replica on a CUDA device also takes one GPU)
    voice_service: bool = False  # voices through one VoiceService (several machines); else the shared data dir

    def validate(self) -> None:
        if self.replicas < 1 or self.torch_threads < 1:
            raise ValueError("replicas and torch threads must be >= 1")
        if not 0 <= self.num_cpus < math.inf:  # NaN too: Ray would take it and never place the replica
            raise ValueError(f"num_cpus must be a number >= 0, got {self.num_cpus}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")


@serve.ingress()
class SpeechServer:
    """One replica: one engine behind the FastAPI app of `mossserve serve`."""

    def __init__(self, settings: ServerSettings, board: DeploymentHandle, voices: DeploymentHandle | None,
                 torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        log_through_serve()
        self.settings, self.board, self.voices = settings, board, voices
        self.replica = serve.get_replica_context().replica_tag
        self.state: ServerState | None = None

    async def __serve_build_asgi_app__(self):
        voices = None if self.voices is None else RemoteVoiceStore(self.voices)
        app = create_app(self.settings, voices=voices)  # loads the model: the replica is not ready before it is
        self.state = app.state.server
        app.add_middleware(ReplicaFront, replica=self.replica, board=self.board, local=self._local_metrics)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        return app

    async def check_health(self) -> None:
        """Serve's health check is the engine's readiness (/ready): a failing replica is replaced."""
        if self.state is None or self.state.closing or self.state.tts.closed:
            raise RuntimeError(f"replica {self.replica}: the engine is not taking requests")
        if (problem := self.state.engine.problem()) is not None:
            raise RuntimeError(f"replica {self.replica}: the engine cannot serve requests: {problem}")

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self.board.put.remote(self.replica, self._local_metrics())
            except Exception as e:  # the board is being restarted: the next push reaches the new one
                logger.warning("replica %s could not push its metrics: %s", self.replica, e)
            await asyncio.sleep(PUSH_INTERVAL_S)

    def _local_metrics(self) -> str:
        return self.state.metrics.render().decode()


class _ToServe(logging.Handler):
    """Hands records to Serve's logger: its handlers (the replica's log, its format) are replaced when
    Serve reconfigures it, so they are looked up at each record."""

    def emit(self, record: logging.LogRecord) -> None:
        logger.handle(record)


def log_through_serve() -> None:
    """mossserve's log lines (failed requests, a dead engine) go where Serve's own do, in its format and
    at its level: left alone, a warning would reach the replica's log as an INFO print-out of the stderr
    Serve captures, and an INFO line not at all. Call it in the replica, once Serve set up its logger."""
    ours = logging.getLogger("mossserve")
    ours.handlers = [_ToServe()]
    ours.setLevel(logger.getEffectiveLevel())
    ours.propagate = False
    quiet_stream_cuts(logger.name)  # Serve logs a request's exception, a cut stream's too, as "Request failed."


class ReplicaFront:
    """ASGI middleware: names the replica on every response and answers /metrics for all replicas."""

    def __init__(self, app, replica: str, board: DeploymentHandle, local: Callable[[], str]) -> None:
        self.app, self.replica, self.board, self.local = app, replica, board, local
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and app_path(scope) == "/metrics" and scope["method"] == "GET":
            body = await self._metrics()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4"), self.header]})
            return await send({"type": "http.response.body", "body": body})

        async def named(message: dict) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)

    async def _metrics(self) -> bytes:
        """The board's union; while the board is unreachable (restarting), this replica's own metrics
        at once rather than a scrape that hangs."""
        try:
            return await asyncio.wait_for(self.board.render.remote(), BOARD_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a timeout, or the board's actor died
            logger.warning("replica %s: the metrics board did not answer (%r); serving its own metrics",
                           self.replica, e)
            return labelled({self.replica: self.local()})


def app_path(scope: dict) -> str:
    """The path inside the application: under a route prefix (/tts), Serve's scope path still
    starts with the prefix, which is also the scope's root_path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def check_device(device: str) -> None:
    """Ray gives each replica one GPU of its own and shows it only that one (CUDA_VISIBLE_DEVICES),
    so in a replica `cuda:0` is that GPU and `cuda:1` does not exist."""
    index = re.fullmatch(r"cuda:(\d+)", device)
    if index and int(index[1]) > 0:
        raise ValueError(f"device {device!r} names one GPU of a machine; on Ray each replica is given a GPU of "
                         "its own, so use device 'cuda' (and let Ray place the replicas)")


def replica_resources(settings: ServerSettings, options: RayOptions) -> dict[str, float]:
    """What Ray reserves for each replica."""
    return {"CPU": options.num_cpus, "GPU": 1 if settings.device.startswith("cuda") else 0}


def build_app(settings: ServerSettings, options: RayOptions | None = None) -> serve.Application:
    """The application to `serve.run`; `builder.app_builder` makes one from `serve run` / config-file args."""
    options = options or RayOptions()
    options.validate()
    check_device(settings.device)
    resources = replica_resources(settings, options)
    engine = settings.engine
    scaling = {"num_replicas": options.replicas} if options.autoscale is None else {"autoscaling_config": {
        "min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
        "target_ongoing_requests": engine.max_running}}  # a full batch per replica, then scale out
    deployment = serve.deployment(
        SpeechServer, name="SpeechServer", max_ongoing_requests=engine.max_running + engine.max_queued,
        ray_actor_options={"num_cpus": resources["CPU"], "num_gpus": resources["GPU"]},
        graceful_shutdown_timeout_s=settings.request_timeout_s,  # scale-down lets running requests finish
        health_check_period_s=5, **scaling)
    voices = VoiceService.bind(str(settings.data_dir)) if options.voice_service else None
    return deployment.bind(settings, MetricsBoard.bind(), voices, options.torch_threads)
