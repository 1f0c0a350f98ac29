"""`mossserve serve --ray`: the application on a Ray cluster (a local one unless an address is given)."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

from ..errors import MossServeError
from ..serve.run import check_can_listen
from ..serve.settings import ServerSettings
from .deployment import APP_NAME, RayOptions, build_app, replica_resources


def serve_on_ray(settings: ServerSettings, options: RayOptions, address: str | None = None) -> None:
    """Deploy, then block until Ctrl-C or SIGTERM (what a process manager or Kubernetes sends to
    stop it), either of which removes the application before the command exits: on a cluster the
    command started, Serve with it; on one it joined, only this application."""
    import ray

    settings = absolute_paths(settings)
    try:
        app = build_app(settings, options)
    except ValueError as e:
        raise MossServeError(str(e)) from None
    ray.init(address=address)
    try:
        owned = _started_here(address)
        problem = shortfall(ray.cluster_resources(), replica_resources(settings, options), least_replicas(options))
        if problem and owned:
            raise MossServeError(problem)
        if problem:
            print(f"warning: {problem}; the deploy waits until the cluster has them (an autoscaling "
                  "cluster adds nodes)", file=sys.stderr)
        if owned:  # Serve's proxy will bind here: a taken port is told now, not as a task's traceback
            check_can_listen(settings.host, settings.port)
        _serve_until_stopped(app, settings, owned)
    finally:
        ray.shutdown()  # on a cluster it joined, only this driver disconnects


def _serve_until_stopped(app, settings: ServerSettings, owned: bool) -> None:
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    if (running := serving_address()) != (settings.host, settings.port):
        print(f"note: Serve already runs on this cluster and answers at {running[0]}:{running[1]}, so this "
              f"application does too (--host/--port apply only where Serve starts; `serve shutdown` stops "
              f"it)", file=sys.stderr)
    # After ray.init, whose own SIGTERM handlers (Python's and its core worker's) exit at once.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
    except RuntimeError as e:  # a replica that cannot load the model fails the deployment
        raise MossServeError(f"the Ray application did not start: {replica_error(serve.status()) or e}") from None
    except KeyboardInterrupt:
        pass
    finally:
        if owned:
            serve.shutdown()
        else:  # other applications on a shared cluster keep running
            serve.delete(APP_NAME)
        signal.signal(signal.SIGTERM, previous)


def serving_address() -> tuple[str, int]:
    """Where the cluster's Serve proxies listen: set by whoever started Serve there, which a later
    serve.start (a second command joining the cluster) only logs as not applied."""
    from ray.serve.context import _get_global_client

    config = _get_global_client().http_config
    return config.host, config.port


def _started_here(address: str | None) -> bool:
    """Whether ray.init started a new instance (no address given and none running here) rather than
    joining a cluster: ray.init without an address joins $RAY_ADDRESS or a `ray start` instance."""
    from ray._private import worker

    node = worker._global_node
    return address is None and node is not None and node.is_head()


def absolute_paths(settings: ServerSettings) -> ServerSettings:
    """The data directory and a local checkpoint as this shell means them: replicas and the voice
    service run in Ray workers' directories, against which a relative path would resolve."""
    local = {name: os.path.abspath(os.path.expanduser(value)) for name in ("model", "codec")  # links kept:
             if (value := getattr(settings, name)) is not None and Path(value).expanduser().exists()}  # a name says the task
    return dataclasses.replace(settings, data_dir=settings.data_dir.expanduser().resolve(), **local)


def least_replicas(options: RayOptions) -> int:
    """The replicas that must fit for the application to serve at all (scale to zero: the first)."""
    return options.replicas if options.autoscale is None else max(1, options.autoscale[0])


def shortfall(cluster: dict[str, float], per_replica: dict[str, float], replicas: int) -> str | None:
    """Why `replicas` replicas can never all be placed on a cluster of these total resources (Ray
    would leave them pending, and the deploy would wait forever), or None when they fit."""
    short = [kind for kind, need in per_replica.items() if need * replicas > cluster.get(kind, 0)]
    if not short:
        return None
    needs = " and ".join(f"{per_replica[kind] * replicas:g} {kind} ({per_replica[kind]:g} each)" for kind in short)
    has = " and ".join(f"{cluster.get(kind, 0):g} {kind}" for kind in short)
    return (f"{replicas} replica(s) need {needs}, but the Ray cluster has {has} in all: use fewer --replicas, "
            "another --device, or a larger cluster")


def replica_error(status) -> str:
    """Serve's error names only the failed deployment; its status holds the replica's exception,
    whose last line is the reason (a checkpoint not found, ...)."""
    app = status.applications.get(APP_NAME)
    failed = [] if app is None else [d.message for d in app.deployments.values() if d.status == "DEPLOY_FAILED"]
    lines = [line.strip() for message in failed for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
