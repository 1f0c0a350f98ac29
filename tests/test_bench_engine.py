"""`mossserve bench` (the engine bench) and its random bench checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mossserve.api import DEMO_MODEL
from mossserve.cli import build_parser, main

CONTRACT = ("family", "device", "throughput", "sequential_throughput", "speedup_16", "ttfa_s", "ttfa_floor_s",
            "ttfa_ratio", "peak_rss_mb", "frames_per_request", "requests", "model", "dtype", "wall_s", "cpu",
            "cpu_capability", "native_bf16", "bf16_cpu_kernel", "ttfa_16_s", "ttfa_16_max_s", "ttfa_16_vs_1")
SMALL = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 2, "kv_heads": 1, "head_dim": 32}


def test_bench_json_has_every_contract_key(capsys) -> None:
    code = main(["bench", "--model", str(DEMO_MODEL), "--frames", "3", "--requests", "2", "--ttfa-runs", "1",
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in CONTRACT:
        assert key in out, key
    assert out["family"] == "delay" and out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["bf16_cpu_kernel"] is False  # a float32 run
    assert out["peak_device_memory_mb"] is None  # a GPU's own peak; on CPU peak_rss_mb holds it
    assert out["floors"]["memory_bandwidth"]["device"] == "cpu"
    assert out["model"] == str(DEMO_MODEL)
    assert out["requests"] == 2 and out["frames_per_request"] == 3
    assert set(out["throughput"]) == set(out["wall_s"]) == {"1", "4", "16"}
    for value in [*out["throughput"].values(), *out["wall_s"].values(), out["sequential_throughput"],
                  out["speedup_16"], out["ttfa_s"], out["ttfa_floor_s"], out["ttfa_ratio"], out["peak_rss_mb"]]:
        assert isinstance(value, float) and value > 0
    assert out["sequential_throughput"] == out["throughput"]["1"]
    assert out["speedup_16"] == pytest.approx(out["throughput"]["16"] / out["sequential_throughput"])
    assert out["ttfa_ratio"] == pytest.approx(out["ttfa_s"] / out["ttfa_floor_s"])
    assert 0 < out["ttfa_16_s"] <= out["ttfa_16_max_s"] and len(out["ttfa_16_runs_s"]) == 1
    assert out["ttfa_16_vs_1"] == pytest.approx(out["ttfa_16_s"] / out["ttfa_s"])
    codec = out["codec_streaming"]
    assert codec["streams"] == 16 and codec["batched_audio_s_per_s"] > 0 and codec["sequential_audio_s_per_s"] > 0
    assert codec["speedup"] == pytest.approx(codec["batched_audio_s_per_s"] / codec["sequential_audio_s_per_s"])
    # Every request ran to its step cap (n_vq lead steps + 3 frames) and every frame was decoded.
    for counts in out["frames_generated"].values():
        assert counts == {"min": 3, "max": 3, "steps_max": 3 + 32}
    assert out["decoded_audio_matches_frames"] is True
    assert out["ttfa_floor"]["steps"] == 32 + 2  # the first 2-frame chunk needs n_vq + 2 steps
    floors = out["floors"]
    assert floors["decode_step_s_1"] == out["ttfa_floor"]["step_s_median"] > 0
    assert floors["decode_fraction_1"] == pytest.approx(floors["step_floor_s_1"] / floors["decode_step_s_1"])


def test_floor_rounds_leave_no_openmp_pool_behind(monkeypatch, capsys) -> None:
    """Each TTFA floor round, run on the calling thread, frees that thread's OpenMP pool, which would
    otherwise throttle the engine's thread in the TTFA run after it (docs/performance.md)."""
    import threading

    import mossserve.bench.engine as bench_engine

    released = []
    real = bench_engine.release_openmp_pool
    monkeypatch.setattr(bench_engine, "release_openmp_pool",
                        lambda: released.append(threading.current_thread()) or real())
    assert main(["bench", "--model", str(DEMO_MODEL), "--frames", "2", "--requests", "1", "--ttfa-runs", "2",
                 "--json"]) == 0
    assert released == [threading.main_thread()] * 3  # the warm-up round and the two timed ones


@pytest.mark.parametrize("requests", [2, 17])
def test_first_audio_rounds_start_16_requests_whatever_requests(requests, monkeypatch, capsys) -> None:
    """Each round of `ttfa_16_*` starts exactly 16 requests, distinct texts, on the 16-slot engine: fewer would
    not be the figure's 16, more would queue for a slot and measure the wait (benchmarks/gpu.py runs 32)."""
    import mossserve.bench.engine as bench_engine

    rounds = []
    real = bench_engine._time_first_audio_together

    def together(engine, submit, prompts, steps):
        rounds.append((engine.config.max_running, {p.rows.tobytes() for p in prompts}, len(prompts)))
        return real(engine, submit, prompts, steps)

    monkeypatch.setattr(bench_engine, "_time_first_audio_together", together)
    assert main(["bench", "--model", str(DEMO_MODEL), "--frames", "2", "--requests", str(requests),
                 "--ttfa-runs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(rounds) == 2 and out["ttfa_16_requests"] == 16 and out["requests"] == requests
    for slots, texts, submitted in rounds:
        assert slots == submitted == len(texts) == 16


@pytest.mark.parametrize("requests", [1, 2])
def test_ttfa_runs_take_a_new_text_whatever_requests(requests, monkeypatch, capsys) -> None:
    """Each one-stream TTFA run takes a text other than the one the engine ran just before, whose whole prompt
    it would find kept and not prefill (docs/bench.md: each is a new text); so its floor prefills rows too."""
    from mossserve.engine.engine import Engine

    submitted = []  # the prompts given to the one-stream engine, in order
    real = Engine.add_request

    def add_request(self, prompt, *args, **kwargs):
        if self.config.max_running == 1:
            submitted.append(prompt.rows)
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Engine, "add_request", add_request)
    assert main(["bench", "--model", str(DEMO_MODEL), "--frames", "2", "--requests", str(requests),
                 "--ttfa-runs", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(submitted) == 1 + requests + 2  # the warm-up, the throughput run, the TTFA runs
    for before, run in zip(submitted[-3:-1], submitted[-2:]):
        assert not np.array_equal(before, run)
    assert out["ttfa_floor"]["prefilled_rows"] > 1


def test_bench_table_and_targets(capsys) -> None:
    code = main(["bench", "--model", str(DEMO_MODEL), "--frames", "2", "--requests", "1", "--ttfa-runs", "1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "concurrency" in captured.out and "TTFA" in captured.out and "speedup 16" in captured.out
    assert "bench:" in captured.err  # progress goes to stderr


def test_bench_target_is_optional_and_codec_stays() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench"]).target is None
    assert parser.parse_args(["bench", "codec"]).target == "codec"


@pytest.mark.parametrize("args, message", [
    (["bench", "--family", "ar", "--json"], "supported: delay"),
    (["bench", "--frames", "0"], "--frames"),
    # an option of another mode is refused, not dropped (each would fail its own check next if it were run)
    (["bench", "--compare-upstream", "nowhere", "--family", "local"], "--family: not used by --compare-upstream"),
    (["bench", "--frames", "0", "--streams", "3"], "--streams: not used by the engine bench"),
    (["bench", "codec", "--streams", "0", "--requests", "3"], "--requests: not used by bench codec"),
    # TTFA and its floor time the first 2-frame chunk, which a 1-frame request never fills
    (["bench", "--model", str(DEMO_MODEL), "--frames", "1"], "--frames must be at least 2"),
    # checked as the engine bench does, also where the bench builds its own random codec
    (["bench", "codec", "--device", "bogus"], "unknown device 'bogus'"),
    (["bench", "codec", "--device", "cuda:99"], "device 'cuda:99'"),
    (["bench", "codec", "--device", "bogus", "--dtype", "auto"], "unknown device 'bogus'"),
])
def test_bench_errors_are_clear(args, message, capsys) -> None:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_bench_concurrencies_must_include_1_4_16() -> None:
    """Its figures (speedup_16, the floors at 1 and 16) need those runs; more may be added."""
    from mossserve.bench.engine import run_engine_bench
    from mossserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="concurrency must include"):
        run_engine_bench(model=DEMO_MODEL, concurrency=(1, 4, 32))


def test_checkpoint_mirrors_the_published_layout() -> None:
    from safetensors import safe_open

    from mossserve.bench.checkpoint import delay_config, tensor_shapes

    config = delay_config(hidden=8, layers=2, intermediate=24, heads=4, kv_heads=2, head_dim=4, n_vq=32)
    assert config == json.loads((DEMO_MODEL / "config.json").read_text())
    with safe_open(DEMO_MODEL / "model.safetensors", "pt") as f:
        published = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert tensor_shapes(config) == published
    bench = delay_config(hidden=512, layers=8, intermediate=1536, heads=8, kv_heads=4, head_dim=64, n_vq=32)
    assert bench["language_config"]["hidden_size"] == 512 and len(bench["language_config"]["layer_types"]) == 8


def test_checkpoint_is_deterministic_loads_and_stays_in_audio(tmp_path: Path) -> None:
    from mossserve.api import TTS
    from mossserve.bench.checkpoint import bench_checkpoint, build_delay_checkpoint
    from mossserve.models.registry import load_talker
    from mossserve.sampling import SamplingParams
    from mossserve.speech_request import SpeechRequest

    a = build_delay_checkpoint(tmp_path / "a", **SMALL)
    b = build_delay_checkpoint(tmp_path / "b", **SMALL)
    for name in ("config.json", "model.safetensors", "codec/config.json", "codec/model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    talker = load_talker(a)
    assert talker.config.language.hidden_size == 64 and talker.codebooks == 32
    tts = TTS(talker, codec=a / "codec")
    try:
        prompts = [tts.prompt(SpeechRequest(input=t)) for t in ("Hello there.", "A longer sentence to speak.")]
        generations = tts.generate(prompts, SamplingParams.greedy(), max_new_frames=40)
    finally:
        tts.close()
    for g in generations:  # never leaves audio mode: the step cap ends it, n_vq steps before frame 0
        assert g.finish_reason == "length" and len(g.rows) == 40 and len(g.frames) == 40 - 32
        assert np.isfinite(g.frames).all() and (g.frames < 1024).all()
        assert (g.rows[1:, 0] == talker.config.audio_assistant_gen_slot_token_id).all()

    cached = bench_checkpoint(root=tmp_path / "cache", **SMALL)
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert bench_checkpoint(root=tmp_path / "cache", **SMALL) == cached  # built once
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
    assert (cached / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_checkpoint_directory_has_the_mode_of_a_directory_made_under_the_umask(tmp_path, monkeypatch) -> None:
    """A shared $MOSSSERVE_CACHE is read by its other users: the built directory is not mkdtemp's 0700."""
    import os

    import mossserve.bench.checkpoint as checkpoint

    def build(family: str, directory: Path, seed: int = 0, **sizes) -> Path:  # the files is_complete looks for
        (directory / "codec").mkdir()
        for name in ("model.safetensors", "codec/model.safetensors"):
            (directory / name).write_bytes(b"")
        return directory

    monkeypatch.setattr(checkpoint, "build_checkpoint", build)
    umask = os.umask(0o022)
    try:
        built = checkpoint.bench_checkpoint(root=tmp_path, **SMALL)
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(umask)
    assert checkpoint.is_complete(built)
    assert built.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755


def test_machine_info_says_whether_bf16_runs_the_cpu_kernel(monkeypatch) -> None:
    from mossserve.bench.machine import machine_info
    from mossserve.layers import cpu_kernels

    available = cpu_kernels.bf16_kernels() is not None
    assert machine_info("cpu", "bfloat16")["bf16_cpu_kernel"] is available
    assert machine_info("cpu", "float32")["bf16_cpu_kernel"] is False
    monkeypatch.setenv("MOSSSERVE_CPU_KERNELS", "0")
    cpu_kernels.bf16_kernels.cache_clear()
    try:
        assert machine_info("cpu", "bfloat16")["bf16_cpu_kernel"] is False
    finally:
        cpu_kernels.bf16_kernels.cache_clear()


def test_every_request_is_queued_at_once_whatever_the_default_queue(monkeypatch, capsys) -> None:
    """The throughput runs submit all `--requests` at once: an engine with the default queue refused
    those past it (`--requests 258` failed with "the engine is full"). Here the default queue is 1."""
    import dataclasses

    import mossserve.config as config

    small = dataclasses.make_dataclass("SmallQueue", [("max_queued", int, dataclasses.field(default=1))],
                                       bases=(config.EngineConfig,))
    monkeypatch.setattr(config, "EngineConfig", small)
    assert main(["bench", "--model", str(DEMO_MODEL), "--frames", "2", "--requests", "4", "--ttfa-runs", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 4


def test_fewer_requests_than_streams_are_reported_and_floored_at_the_batch_run(monkeypatch, capsys) -> None:
    """With `--requests 2` the "16" run has 2 streams: the table says so and its floor counts a batch of 2."""
    import mossserve.bench.engine as bench_engine

    batches = []
    real = bench_engine.count_step
    monkeypatch.setattr(bench_engine, "count_step", lambda *args: batches.append(args[-1]) or real(*args))
    assert main(["bench", "--model", str(DEMO_MODEL), "--frames", "2", "--requests", "2", "--ttfa-runs", "1"]) == 0
    table = capsys.readouterr().out
    assert batches == [1, 2]
    assert "(2 streams: --requests 2)" in table and "step at 16 (2 streams" in table
