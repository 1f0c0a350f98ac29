"""`mossserve serve --ray`: the application on a Ray cluster (a local one unless an address is given)."""
from __future__ import annotations

from ..errors import MossServeError
from ..serve.settings import ServerSettings
from .deployment import APP_NAME, RayOptions, build_app


def serve_on_ray(settings: ServerSettings, options: RayOptions, address: str | None = None) -> None:
    """Deploy, then block until Ctrl-C (which shuts the application down)."""
    import ray
    from ray import serve

    ray.init(address=address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/", blocking=True)
    except RuntimeError as e:  # a replica that cannot load the model fails the deployment
        raise MossServeError(f"the Ray application did not start: {e}") from None
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
