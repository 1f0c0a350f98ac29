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
from dataclasses import dataclass

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..serve.app import create_app
from ..serve.settings import ServerSettings
from ..serve.state import ServerState
from .metrics_board import PUSH_INTERVAL_S, MetricsBoard
from .voice_service import RemoteVoiceStore, VoiceService

REPLICA_HEADER = "x-mossserve-replica"
APP_NAME = "mossserve"
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
        self.settings, self.board, self.voices = settings, board, voices
        self.replica = serve.get_replica_context().replica_tag
        self.state: ServerState | None = None

    async def __serve_build_asgi_app__(self):
        voices = None if self.voices is None else RemoteVoiceStore(self.voices)
        app = create_app(self.settings, voices=voices)  # loads the model: the replica is not ready before it is
        self.state = app.state.server
        app.add_middleware(ReplicaFront, replica=self.replica, board=self.board)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        return app

    async def check_health(self) -> None:
        """Serve's health check is the engine's readiness (/ready): a failing replica is replaced."""
        if self.state is None or self.state.closing or self.state.tts.closed:
            raise RuntimeError(f"replica {self.replica}: the engine is not taking requests")

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self.board.put.remote(self.replica, self.state.metrics.render().decode())
            except Exception as e:  # the board is being restarted: the next push reaches the new one
                logger.warning("replica %s could not push its metrics: %s", self.replica, e)
            await asyncio.sleep(PUSH_INTERVAL_S)


class ReplicaFront:
    """ASGI middleware: names the replica on every response and answers /metrics for all replicas."""

    def __init__(self, app, replica: str, board: DeploymentHandle) -> None:
        self.app, self.board = app, board
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics" and scope["method"] == "GET":
            body = await self.board.render.remote()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4"), self.header]})
            return await send({"type": "http.response.body", "body": body})

        async def named(message: dict) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


def build_app(settings: ServerSettings, options: RayOptions | None = None) -> serve.Application:
    """The application to `serve.run`; `builder.app_builder` makes one from `serve run` / config-file args."""
    options = options or RayOptions()
    options.validate()
    engine = settings.engine
    scaling = {"num_replicas": options.replicas} if options.autoscale is None else {"autoscaling_config": {
        "min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
        "target_ongoing_requests": engine.max_running}}  # a full batch per replica, then scale out
    deployment = serve.deployment(
        SpeechServer, name="SpeechServer", max_ongoing_requests=engine.max_running + engine.max_queued,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": 1 if settings.device.startswith("cuda") else 0},
        graceful_shutdown_timeout_s=settings.request_timeout_s,  # scale-down lets running requests finish
        health_check_period_s=5, **scaling)
    voices = VoiceService.bind(str(settings.data_dir)) if options.voice_service else None
    return deployment.bind(settings, MetricsBoard.bind(), voices, options.torch_threads)
