"""The Ray application's configuration without a cluster: `serve run` / config-file arguments, the
`serve --ray` options and their errors, and the merge of every replica's metrics."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from mossserve.cli import main  # noqa: E402
from mossserve.distributed.builder import parse_args, parse_autoscale  # noqa: E402
from mossserve.distributed.metrics_board import labelled  # noqa: E402


def test_config_file_arguments_are_typed_by_their_fields() -> None:
    settings, options = parse_args({"model": "OpenMOSS-Team/MOSS-TTS", "device": "cuda", "request_timeout_s": "90",
                                    "data_dir": "/mnt/voices", "max_running": 8, "max_queued": "32", "max_len": "4096",
                                    "autoscale": "1:4", "torch_threads": "2", "cors_origins": "a.com, b.com",
                                    "voice_service": "true"})
    assert settings.model == "OpenMOSS-Team/MOSS-TTS" and settings.device == "cuda" and settings.request_timeout_s == 90.0
    assert settings.data_dir == Path("/mnt/voices") and settings.cors_origins == ("a.com", "b.com")
    assert (settings.engine.max_running, settings.engine.max_queued, settings.engine.max_len) == (8, 32, 4096)
    assert options.autoscale == (1, 4) and options.torch_threads == 2 and options.replicas == 1
    assert options.voice_service
    settings, options = parse_args({"cors_origins": ["https://a.example", "https://b.example"], "voice_service": "off",
                                    "task": "dialogue", "dtype": "auto"})  # as a YAML config file gives them
    assert settings.cors_origins == ("https://a.example", "https://b.example") and not options.voice_service
    assert (settings.task, settings.dtype) == ("dialogue", "auto")


@pytest.mark.parametrize("args, needle", [
    ({"replica": "2"}, "unknown argument 'replica'"),
    ({"engine": "x"}, "unknown argument 'engine'"),
    ({"autoscale": "4"}, "MIN:MAX"),
    ({"autoscale": "3:1"}, "0 <= MIN <= MAX"),
    ({"replicas": "0"}, "replicas and torch threads must be >= 1"),
    ({"port": "9000"}, "Ray Serve's http_options"),  # the one address is Serve's, not the app's
    ({"host": "0.0.0.0"}, "Ray Serve's http_options"),
    ({"request_timeout_s": "0"}, "request_timeout_s must be a positive number"),
    # refused here, not by every replica as it loads (or silently taken as false)
    ({"dtype": "bf16"}, "unknown dtype 'bf16'"),
    ({"task": "nonsense"}, "unknown task 'nonsense'"),
    ({"voice_service": "on-ish"}, "voice_service is true or false"),
    ({"replicas": "abc"}, "replicas is an integer, got 'abc'"),  # a bare ValueError named no argument
    ({"request_timeout_s": "soon"}, "request_timeout_s is a number, got 'soon'"),
    ({"replicas": float("inf")}, "replicas is an integer, got inf"),  # YAML's .inf
    ({"replicas": "2", "autoscale": "1:4"}, "give replicas or autoscale, not both"),
])
def test_bad_arguments_are_named(args, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_args(args)


def test_autoscale_form() -> None:
    assert parse_autoscale("0:8") == (0, 8)
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_autoscale("a:b")


@pytest.mark.parametrize("argv, needle", [
    (["--ray", "--autoscale", "3"], "error: autoscale wants MIN:MAX replicas"),
    (["--ray", "--replicas", "0"], "error: replicas and torch threads must be >= 1"),
    (["--replicas", "2"], "error: --replicas, --autoscale, --ray-address and --voice-service go with --ray"),
    (["--replicas", "1"], "error: --replicas, --autoscale, --ray-address and --voice-service go with --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not allowed with argument --replicas"),
])
def test_serve_ray_options_errors(argv, needle, capsys) -> None:
    try:
        code = main(["serve", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2 and needle in capsys.readouterr().err


def test_every_replicas_metrics_merge_under_a_replica_label() -> None:
    a = ('# HELP mossserve_requests_total requests\n# TYPE mossserve_requests_total counter\n'
         'mossserve_requests_total{endpoint="/v1/audio/speech",outcome="ok"} 3.0\n'
         '# HELP mossserve_queue_depth waiting\n# TYPE mossserve_queue_depth gauge\nmossserve_queue_depth 1.0\n')
    b = a.replace("} 3.0", "} 5.0").replace("depth 1.0", "depth 0.0")
    text = labelled({"r1": a, "r2": b}).decode()
    assert text.count("# TYPE mossserve_requests_total counter") == 1
    assert 'mossserve_requests_total{endpoint="/v1/audio/speech",outcome="ok",replica="r1"} 3.0' in text
    assert 'mossserve_requests_total{endpoint="/v1/audio/speech",outcome="ok",replica="r2"} 5.0' in text
    assert 'mossserve_queue_depth{replica="r1"} 1.0' in text and 'mossserve_queue_depth{replica="r2"} 0.0' in text


def test_the_deployment_takes_its_limits_from_the_engine() -> None:
    """Routing and scaling settings as Serve will apply them (read from the bound deployment)."""
    from mossserve.distributed import app_builder

    app = app_builder({"max_running": "8", "max_queued": "24", "autoscale": "0:4", "request_timeout_s": "60",
                       "device": "cuda"})
    deployment = app._bound_deployment
    config = deployment._deployment_config
    assert config.max_ongoing_requests == 32  # batch slots + queue: the engine's capacity
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (0, 4, 8)
    assert config.graceful_shutdown_timeout_s == 60  # scale-down waits for running requests
    assert deployment.ray_actor_options["num_gpus"] == 1  # one device per replica
