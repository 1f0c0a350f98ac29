"""`app_builder`: the application from string arguments, for `serve run` and Serve config files.

    serve run mossserve.distributed:app_builder model=OpenMOSS-Team/MOSS-TTS device=cuda replicas=4

    applications:
      - name: mossserve
        route_prefix: /
        import_path: mossserve.distributed:app_builder
        args: {model: OpenMOSS-Team/MOSS-TTS, device: cuda, dtype: bfloat16, autoscale: "1:8", data_dir: /mnt/voices}

Keys are ServerSettings' and RayOptions' field names, plus max_running and max_queued (the engine's).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ..config import EngineConfig
from ..serve.settings import ServerSettings
from .deployment import RayOptions, build_app

_ENGINE_KEYS = ("max_running", "max_queued", "max_len", "max_sessions")
_SERVE_HTTP_KEYS = ("host", "port")  # Serve's http_options decide where the one address listens
_PATH_KEYS = ("model", "codec")  # a checkpoint directory, or a hub id
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def app_builder(args: dict[str, str]):
    return build_app(*parse_args(args))


def parse_args(args: dict[str, str]) -> tuple[ServerSettings, RayOptions]:
    settings, options, engine = ServerSettings(), RayOptions(), EngineConfig()
    for key, value in args.items():
        if key in _SERVE_HTTP_KEYS:
            raise ValueError(f"{key!r} is not an app argument: Ray Serve's http_options set where it listens")
        target = next((t for t in (options, settings, engine) if key in _fields(t)), None)
        if target is None:
            raise ValueError(f"unknown argument {key!r}: expected one of "
                             f"{sorted(_fields(options) | _fields(settings) - set(_SERVE_HTTP_KEYS) | set(_ENGINE_KEYS))}")
        setattr(target, key, _parse(key, value, getattr(target, key)))
    if "replicas" in args and "autoscale" in args:
        raise ValueError("give replicas or autoscale, not both (autoscale decides the replica count)")
    options.validate()
    settings.engine = engine
    settings.validate()
    return settings, options


def _fields(target) -> set[str]:
    names = {f.name for f in dataclasses.fields(target)}
    return names & set(_ENGINE_KEYS) if isinstance(target, EngineConfig) else names - {"engine"}


def _parse(key: str, value, default):
    """A value from the command line or YAML, as the field's default is typed (None: text)."""
    if key == "autoscale":
        return _autoscale(value)
    if key == "cors_origins":  # a YAML list, or comma-separated text; empty or null: none
        items = value if isinstance(value, (list, tuple)) else [] if value is None else str(value).split(",")
        return tuple(str(v).strip() for v in items if str(v).strip())
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() not in _TRUE + _FALSE:
            raise ValueError(f"{key} is true or false ({', '.join(_TRUE + _FALSE)}), got {value!r}")
        return str(value).lower() in _TRUE
    if isinstance(default, (int, float)):
        return _number(key, value, type(default))
    if isinstance(default, Path):  # ~ is the home of the machine that builds the application
        if value is None:
            raise ValueError(f"{key} is a path, got None")
        return Path(str(value)).expanduser()
    if value is None:
        if default is not None:
            raise ValueError(f"{key} is text, got None")
        return None
    if not isinstance(value, str):  # YAML read it as a number or a boolean, its spelling lost (0042 is 34)
        raise ValueError(f"{key} is text, but YAML read {value!r} ({type(value).__name__}); quote it "
                         f'({key}: "...")')
    return os.path.expanduser(value) if key in _PATH_KEYS else value


def _number(key: str, value, kind: type) -> int | float:
    """A count or an amount: finite, not negative, and for an integer field a whole number (YAML's
    `replicas: 2.7` or `replicas: true` is no replica count, though int() would take both)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value) if kind is float else _integer(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} is {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if not 0 <= number < math.inf:  # NaN fails this too
        raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    return number


def _integer(value) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


def _autoscale(value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 1:4 as 1*60 + 4
        raise ValueError(f"autoscale wants MIN:MAX replicas as text, got the number {value}: YAML reads an "
                         'unquoted 1:4 as the base-60 number 64, so quote it (autoscale: "1:4")')
    return parse_autoscale(str(value))


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX)."""
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"autoscale wants MIN:MAX replicas, e.g. 1:4; got {text!r}")
    return int(low), int(high)
