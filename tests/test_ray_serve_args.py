"""The Ray application's configuration without a cluster: `serve run` / config-file arguments, the
`serve --ray` options and their errors, and the merge of every replica's metrics."""
from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("ray.serve")

from mossserve.cli import main  # noqa: E402
from mossserve.distributed.builder import parse_args, parse_autoscale  # noqa: E402
from mossserve.distributed import deployment  # noqa: E402
from mossserve.distributed.deployment import ReplicaFront, app_path  # noqa: E402
from mossserve.distributed.metrics_board import labelled  # noqa: E402
from mossserve.distributed.run import absolute_paths, least_replicas, replica_error, shortfall  # noqa: E402
from mossserve.serve.settings import ServerSettings  # noqa: E402


def test_config_file_arguments_are_typed_by_their_fields() -> None:
    settings, options = parse_args({"model": "OpenMOSS-Team/MOSS-TTS", "device": "cuda", "request_timeout_s": "90",
                                    "data_dir": "/mnt/voices", "max_running": 8, "max_queued": "32", "max_len": "4096",
                                    "max_sessions": "12", "autoscale": "1:4", "torch_threads": "2", "cors_origins": "a.com, b.com",
                                    "voice_service": "true"})
    assert settings.model == "OpenMOSS-Team/MOSS-TTS" and settings.device == "cuda" and settings.request_timeout_s == 90.0
    assert settings.data_dir == Path("/mnt/voices") and settings.cors_origins == ("a.com", "b.com")
    assert (settings.engine.max_running, settings.engine.max_queued, settings.engine.max_len) == (8, 32, 4096)
    assert settings.engine.max_sessions == 12
    assert options.autoscale == (1, 4) and options.torch_threads == 2 and options.replicas == 1
    assert options.voice_service
    settings, options = parse_args({"cors_origins": ["https://a.example", "https://b.example"], "voice_service": "off",
                                    "task": "dialogue", "dtype": "auto"})  # as a YAML config file gives them
    assert settings.cors_origins == ("https://a.example", "https://b.example") and not options.voice_service
    assert (settings.task, settings.dtype) == ("dialogue", "auto")


def yaml_args(text: str) -> dict:
    """`args:` as a Serve config file hands them to app_builder."""
    return yaml.safe_load(text)


def test_quoted_yaml_scalars_fill_text_fields() -> None:
    settings, _ = parse_args(yaml_args('{api_key: "0042", model_name: "2024", codec: null, cors_origins: null}'))
    assert (settings.api_key, settings.model_name, settings.codec, settings.cors_origins) == ("0042", "2024", None, ())


@pytest.mark.parametrize("text, read", [
    ("{api_key: 0042}", "34"),  # YAML 1.1 octal: the key nobody typed
    ("{api_key: 12:30}", "750"),  # base 60
    ("{model_name: 2024}", "2024"),
    ("{api_key: on}", "True"),
])
def test_a_text_field_yaml_read_as_a_number_is_refused(text, read) -> None:
    """str() of what YAML read is not what was written: an api_key of 0042 became '34'."""
    with pytest.raises(ValueError, match=rf"is text, but YAML read {read} \(\w+\); quote it"):
        parse_args(yaml_args(text))


@pytest.mark.parametrize("text", ["{device: null}", "{device: }", "{dtype: null}"])
def test_a_text_field_with_a_default_is_not_left_empty(text) -> None:
    """device: null reached the device check as None (a TypeError)."""
    with pytest.raises(ValueError, match="is text, got None"):
        parse_args(yaml_args(text))


def test_home_in_config_paths_is_expanded() -> None:
    settings, _ = parse_args(yaml_args("{data_dir: ~/voices, model: ~/ckpt, codec: org/codec}"))
    assert settings.data_dir == Path.home() / "voices" and settings.model == str(Path.home() / "ckpt")
    assert settings.codec == "org/codec"


@pytest.mark.parametrize("text, needle", [
    ("{replicas: 2.7}", "replicas is an integer, got 2.7"),  # not cut to 2
    ("{replicas: true}", "replicas is an integer, got True"),  # not 1
    ("{torch_threads: 0.5}", "torch_threads is an integer, got 0.5"),
    ("{num_cpus: .nan}", "num_cpus must be a finite number >= 0, got nan"),
    ("{num_cpus: -1}", "num_cpus must be a finite number >= 0, got -1"),
    ("{retry_after_s: -5}", "retry_after_s must be a finite number >= 0, got -5"),
    ("{autoscale: 1:4}", 'base-60 number 64, so quote it'),  # YAML 1.1 sexagesimal
])
def test_yaml_values_that_do_not_fit_their_field_are_named(text, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_args(yaml_args(text))


@pytest.mark.parametrize("num_cpus", [-1.0, float("nan")])
def test_ray_options_from_python_refuse_a_cpu_share_ray_cannot_place(num_cpus) -> None:
    from mossserve.distributed import RayOptions, build_app

    with pytest.raises(ValueError, match="num_cpus must be a number >= 0"):
        build_app(ServerSettings(), RayOptions(num_cpus=num_cpus))


def test_whole_floats_are_integers() -> None:
    assert parse_args(yaml_args("{replicas: 3.0}"))[1].replicas == 3


def test_a_gpu_index_is_refused_as_every_replica_sees_only_its_own_gpu() -> None:
    from mossserve.distributed import app_builder

    with pytest.raises(ValueError, match="device 'cuda:1' names one GPU of a machine"):
        app_builder({"device": "cuda:1"})
    assert app_builder({"device": "cuda:0"})._bound_deployment.ray_actor_options["num_gpus"] == 1


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
    (["--ray", "--device", "cuda:1"], "error: device 'cuda:1' names one GPU"),  # before any Ray starts
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


@pytest.mark.parametrize("per_replica, replicas, needle", [
    ({"CPU": 1.0, "GPU": 1}, 1, "1 replica(s) need 1 GPU (1 each), but the Ray cluster has 0 GPU in all"),
    ({"CPU": 1.0, "GPU": 0}, 3, "3 replica(s) need 3 CPU (1 each), but the Ray cluster has 2 CPU in all"),
    ({"CPU": 0.5, "GPU": 0}, 5, "5 replica(s) need 2.5 CPU (0.5 each)"),
])
def test_replicas_the_cluster_can_never_hold_are_named(per_replica, replicas, needle) -> None:
    assert needle in shortfall({"CPU": 2.0}, per_replica, replicas)


def test_replicas_that_fit_pass() -> None:
    assert shortfall({"CPU": 2.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 1}, 2) is None
    assert shortfall({"CPU": 2.0}, {"CPU": 0.0, "GPU": 0}, 8) is None


def test_the_replicas_that_must_fit() -> None:
    _, fixed = parse_args({"replicas": "3"})
    _, scaled = parse_args({"autoscale": "2:8"})
    _, to_zero = parse_args({"autoscale": "0:8"})
    assert (least_replicas(fixed), least_replicas(scaled), least_replicas(to_zero)) == (3, 2, 1)


def test_paths_resolve_against_the_callers_directory(tmp_path, monkeypatch) -> None:
    """Not against the directory of the Ray worker that runs a replica."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    settings = absolute_paths(ServerSettings(model="ckpt", codec="OpenMOSS-Team/codec", data_dir=Path("voices")))
    assert (settings.model, settings.codec) == (str(tmp_path / "ckpt"), "OpenMOSS-Team/codec")  # a hub id stays
    assert settings.data_dir == tmp_path / "voices"


def test_a_linked_checkpoint_keeps_the_name_that_says_its_task(tmp_path, monkeypatch) -> None:
    """MOSS-TTSD-v1.0 -> store/ckpt-7f3a: following the link served it as 'ckpt-7f3a', task tts."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store" / "ckpt-7f3a").mkdir(parents=True)
    (tmp_path / "MOSS-TTSD-v1.0").symlink_to(tmp_path / "store" / "ckpt-7f3a")
    assert absolute_paths(ServerSettings(model="MOSS-TTSD-v1.0")).model == str(tmp_path / "MOSS-TTSD-v1.0")


def test_a_failed_deploy_names_the_replicas_exception() -> None:
    message = ("The deployment failed to start 3 times in a row. See controller logs for details. Error:\n"
               "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
               "mossserve.errors.CheckpointError: checkpoint directory not found: /nonexistent/ckpt\n")
    status = SimpleNamespace(applications={"mossserve": SimpleNamespace(deployments={
        "MetricsBoard": SimpleNamespace(status="HEALTHY", message=""),
        "SpeechServer": SimpleNamespace(status="DEPLOY_FAILED", message=message)})})
    reason = "mossserve.errors.CheckpointError: checkpoint directory not found: /nonexistent/ckpt"
    assert replica_error(status) == reason
    assert replica_error(SimpleNamespace(applications={})) == ""


def test_the_app_path_is_the_one_under_the_route_prefix() -> None:
    assert app_path({"path": "/tts/metrics", "root_path": "/tts"}) == "/metrics"
    assert app_path({"path": "/metrics", "root_path": ""}) == "/metrics"


LOCAL = "# HELP mossserve_queue_depth waiting\n# TYPE mossserve_queue_depth gauge\nmossserve_queue_depth 2.0\n"


def scrape(path: str, root_path: str, render) -> bytes:
    """GET `path` through a replica's front whose board answers `render()`; the body sent back."""
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"the app's own route"})

    async def go() -> bytes:
        sent = []

        async def send(message: dict) -> None:
            sent.append(message)

        front = ReplicaFront(app, replica="r1", board=SimpleNamespace(render=SimpleNamespace(remote=render)),
                             local=lambda: LOCAL)
        await front({"type": "http", "method": "GET", "path": path, "root_path": root_path}, None, send)
        return sent[-1]["body"]

    return asyncio.run(asyncio.wait_for(go(), 30))  # a front that waits forever fails, not hangs


async def board_union() -> bytes:
    return b"the board's union"


def test_metrics_under_a_route_prefix_come_from_the_board() -> None:
    assert scrape("/tts/metrics", "/tts", board_union) == b"the board's union"
    assert scrape("/tts/v1/models", "/tts", board_union) == b"the app's own route"


async def board_died() -> bytes:
    raise RuntimeError("the board's actor died")


@pytest.mark.parametrize("render", [lambda: asyncio.get_running_loop().create_future(), board_died],
                         ids=["board never answers", "board died"])
def test_a_scrape_without_the_board_is_this_replicas_metrics(render, monkeypatch) -> None:
    monkeypatch.setattr(deployment, "BOARD_TIMEOUT_S", 0.01)
    assert scrape("/metrics", "", render) == labelled({"r1": LOCAL})


def test_serve_ray_checks_its_data_dir_before_ray_starts(tmp_path, capsys, monkeypatch) -> None:
    """A --data-dir that is a file was found by every replica after Ray and the model had started."""
    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("mossserve.distributed.run.serve_on_ray", started)
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--ray", "--data-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


class _FakeRay(SimpleNamespace):
    """What serve_on_ray calls on `ray`, without a cluster."""

    def __init__(self) -> None:
        super().__init__(init=lambda address=None: None, shutdown=lambda: None,
                         cluster_resources=lambda: {"CPU": 64.0})


def test_serve_ray_reports_a_taken_port_before_serve_starts(monkeypatch) -> None:
    """Serve's proxy failed to bind in a task, ending the command with a Ray traceback after ~45 s."""
    import socket
    import sys

    from mossserve.distributed import run
    from mossserve.errors import MossServeError

    monkeypatch.setitem(sys.modules, "ray", _FakeRay())
    monkeypatch.setattr(run, "_started_here", lambda address: True)
    monkeypatch.setattr(run, "build_app", lambda settings, options: "app")
    monkeypatch.setattr(run, "_serve_until_stopped", lambda *a: pytest.fail("Serve was started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServerSettings(host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(MossServeError, match="cannot listen on 127.0.0.1"):
            run.serve_on_ray(settings, deployment.RayOptions())


def test_joining_a_cluster_whose_serve_listens_elsewhere_says_where(monkeypatch, capsys) -> None:
    """--port is ignored where Serve already runs (serve.start only logs it): the command says where
    the application answers instead of leaving the user at a refused port."""
    from ray import serve

    from mossserve.distributed import run

    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(serve, "delete", lambda name: None)
    monkeypatch.setattr(run, "serving_address", lambda: ("127.0.0.1", 18440))
    run._serve_until_stopped("app", ServerSettings(host="127.0.0.1", port=18441), owned=False)
    assert "answers at 127.0.0.1:18440" in capsys.readouterr().err
    run._serve_until_stopped("app", ServerSettings(host="127.0.0.1", port=18440), owned=False)
    assert "answers at" not in capsys.readouterr().err


def test_the_remote_voice_store_takes_what_the_voice_store_takes() -> None:
    """The replicas call a RemoteVoiceStore as they would a VoiceStore (--voice-service): a method whose
    arguments drifted apart failed only on Ray, at the first request that used a voice."""
    import inspect

    from mossserve.distributed.voice_service import RemoteVoiceStore
    from mossserve.serve.voices import VoiceStore

    public = [name for name, _ in inspect.getmembers(VoiceStore, inspect.isfunction) if not name.startswith("_")]
    for name in public:
        local, remote = inspect.signature(getattr(VoiceStore, name)), inspect.signature(getattr(RemoteVoiceStore, name))
        assert list(local.parameters.items()) == list(remote.parameters.items()), name
