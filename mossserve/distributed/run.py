"""`mossserve serve --ray`: the application on a Ray cluster (a local one unless an address is given)."""
from __future__ import annotations

import signal

from ..errors import MossServeError
from ..serve.settings import ServerSettings
from .deployment import APP_NAME, RayOptions, build_app


def serve_on_ray(settings: ServerSettings, options: RayOptions, address: str | None = None) -> None:
    """Deploy, then block until Ctrl-C or SIGTERM (what a process manager or Kubernetes sends to
    stop it), either of which shuts the application down before the command exits."""
    import ray
    from ray import serve

    ray.init(address=address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    # After ray.init, whose own SIGTERM handlers (Python's and its core worker's) exit at once.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/", blocking=True)
    except RuntimeError as e:  # a replica that cannot load the model fails the deployment
        raise MossServeError(f"the Ray application did not start: {e}") from None
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
