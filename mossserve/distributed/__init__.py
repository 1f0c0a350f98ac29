"""Scale-out on Ray Serve: replicas of the HTTP server behind one address (needs the `ray` extra)."""
from .builder import app_builder
from .deployment import REPLICA_HEADER, RayOptions, SpeechServer, build_app

__all__ = ["REPLICA_HEADER", "RayOptions", "SpeechServer", "app_builder", "build_app"]
