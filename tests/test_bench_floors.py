"""The engine bench's floors (machine limits, per-step weight bytes and FLOPs) for every family, and
the Local and Realtime bench checkpoints. Tiny shapes; no timing is asserted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mossserve.api import DEMO_MODEL
from mossserve.errors import InvalidRequestError

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CODEC = FIXTURES / "moss_audio_tokenizer" / "tiny"
BACKBONE = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 2, "kv_heads": 1, "head_dim": 32}
TINY = {
    "delay": BACKBONE,
    "local": {**BACKBONE, "local_hidden": 48, "local_ffn": 96, "local_layers": 1, "bridge_ffn": 64},
    "realtime": {**BACKBONE, "local_intermediate": 128, "local_layers": 1, "local_heads": 2, "local_kv_heads": 1,
                 "local_head_dim": 32},
}
LEAD = {"delay": 32, "local": 0, "realtime": 0}  # steps before frame 0
FLOOR_KEYS = ("weight_bytes_per_step", "memory_bandwidth_gb_s", "step_floor_s_1", "step_s_1", "fraction_1",
              "flops_per_step_16", "gemm_gflop_s", "step_floor_s_16", "step_s_16", "fraction_16")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from mossserve.bench.checkpoint import build_checkpoint

    root = tmp_path_factory.mktemp("bench_checkpoints")
    return {family: build_checkpoint(family, root / family, **sizes) for family, sizes in TINY.items()}


def _published_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def test_local_and_realtime_checkpoints_mirror_the_published_layout() -> None:
    from mossserve.bench.family_checkpoints import (
        local_config,
        local_tensor_shapes,
        realtime_config,
        realtime_tensor_shapes,
    )

    fixture = json.loads((FIXTURES / "moss_tts_local" / "config.json").read_text())
    config = local_config(hidden=8, layers=2, intermediate=24, heads=4, kv_heads=2, head_dim=8, n_vq=32,
                          local_hidden=12, local_ffn=20, local_layers=2, bridge_ffn=16)
    fixture.pop("transformers_version")
    assert {k: v for k, v in config.items() if k != "transformers_version"} == fixture
    assert local_tensor_shapes(config) == _published_shapes(FIXTURES / "moss_tts_local" / "model.safetensors")

    fixture = json.loads((FIXTURES / "moss_tts_realtime" / "config.json").read_text())
    fixture.pop("transformers_version")
    config = realtime_config(hidden=8, layers=2, intermediate=24, heads=4, kv_heads=2, head_dim=8,
                             local_intermediate=20, local_layers=2, local_heads=2, local_kv_heads=1, local_head_dim=12)
    assert config == fixture
    assert realtime_tensor_shapes(config) == _published_shapes(FIXTURES / "moss_tts_realtime" / "model.safetensors")


def test_realtime_bench_tokenizer_encodes_like_the_published_one() -> None:
    from tokenizers import Tokenizer

    from mossserve.bench.family_checkpoints import realtime_tokenizer

    ours = Tokenizer.from_str(realtime_tokenizer()["tokenizer.json"])
    published = Tokenizer.from_file(str(FIXTURES / "moss_tts_realtime" / "tokenizer.json"))
    for text in ("Hello <|text_pad|> there<|audio_pad|>, 你好！", "<|im_start|>assistant\n<|im_end|>\n"):
        assert ours.encode(text, add_special_tokens=False).ids == published.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("family", ["local", "realtime"])
def test_bench_checkpoint_is_deterministic_loads_and_runs_to_the_cap(family, tiny_checkpoints, tmp_path) -> None:
    from mossserve.api import TTS
    from mossserve.bench.checkpoint import bench_checkpoint, build_checkpoint
    from mossserve.sampling import SamplingParams
    from mossserve.speech_request import SpeechRequest

    built = tiny_checkpoints[family]
    again = build_checkpoint(family, tmp_path / "again", **TINY[family])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "codec/model.safetensors"):
        assert (built / name).read_bytes() == (again / name).read_bytes(), name

    tts = TTS.from_pretrained(built, codec=TINY_CODEC)
    try:
        texts = ("Hello there.", "A longer sentence to speak, with rather more than twelve tokens in it.")
        prompts = [tts.prompt(SpeechRequest(input=t)) for t in texts]
        generations = tts.generate(prompts, SamplingParams.greedy(), max_new_frames=40)
        talker = tts.talker
    finally:
        tts.close()
    for g in generations:  # never stops by itself: the cap ends it, every step a frame
        assert g.finish_reason == "length" and len(g.rows) == 40 and len(g.frames) == 40
        frames = np.asarray(g.frames)
        assert (frames >= 0).all() and (frames < 1024).all()  # real codes only: no pad, BOS or EOS
        if family == "local":
            assert (np.asarray(g.rows)[:, 0] == talker.config.audio_assistant_gen_slot_token_id).all()

    cached = bench_checkpoint(root=tmp_path / "cache", family=family, **TINY[family])
    assert (cached / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert bench_checkpoint(root=tmp_path / "cache", family=family, **TINY[family]) == cached
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the CPU kernel's reads are counted too
def test_step_count_reads_weights_not_gathered_tables(dtype) -> None:
    from mossserve.api import TTS
    from mossserve.bench.floors import count_step
    from mossserve.config import EngineConfig
    from mossserve.sampling import SamplingParams
    from mossserve.speech_request import SpeechRequest

    tts = TTS.from_pretrained(DEMO_MODEL, dtype=dtype)
    try:
        prompts = [tts.prompt(SpeechRequest(input="Hello there."))]
        one, sixteen = (count_step(tts.talker, prompts, SamplingParams.greedy(), EngineConfig().prefill_tokens, b)
                        for b in (1, 16))
        params = dict(tts.talker.model.named_parameters())
    finally:
        tts.close()
    read = one["weight_bytes_by_parameter"]
    # The embedding tables are only gathered; every backbone matrix and the audio heads are read in full.
    assert "language_model.embed_tokens.weight" not in read and "audio_embed" not in read
    for name, p in params.items():
        if ".layers." in name or name == "audio_head.weight":
            assert read[name] == p.numel() * p.element_size(), name
    assert one["weight_bytes"] == sum(read.values()) == sixteen["weight_bytes"]
    assert one["matmul_flops"] > 0 and sixteen["matmul_flops"] == 16 * one["matmul_flops"]
    assert sixteen["attention_flops"] == 16 * one["attention_flops"] > 0
    assert sixteen["flops"] == sixteen["matmul_flops"] + sixteen["attention_flops"]


def test_floor_arithmetic() -> None:
    from mossserve.bench.floors import floors

    step1 = {"weight_bytes": 4e8, "flops": 1e8, "attention_flops": 0, "context_rows": 10}
    step16 = {"weight_bytes": 4e8, "flops": 3.2e9, "attention_flops": 1e6, "context_rows": 10}
    f = floors(10.0, 100.0, step1, step16, step_s_1=0.08, step_s_16=0.1)
    assert f["step_floor_s_1"] == pytest.approx(0.04) and f["fraction_1"] == pytest.approx(0.5)
    assert f["compute_floor_s_16"] == pytest.approx(0.032) and f["memory_floor_s_16"] == pytest.approx(0.04)
    assert f["bound_16"] == "memory" and f["step_floor_s_16"] == pytest.approx(0.04)
    assert f["fraction_16"] == pytest.approx(0.4)


@pytest.mark.parametrize("family", ["delay", "local", "realtime"])
def test_engine_bench_reports_floors_for_every_family(family, tiny_checkpoints) -> None:
    from mossserve.bench.engine import format_table, run_engine_bench

    out = run_engine_bench(family=family, model=tiny_checkpoints[family], codec=TINY_CODEC, frames=3, requests=2,
                           ttfa_runs=1, bandwidth_mb=8)
    json.dumps(out)  # serialisable
    assert out["family"] == family and out["ttfa_lead_steps"] == LEAD[family]
    steps = 3 + LEAD[family]
    for counts in out["frames_generated"].values():  # every request ran to its cap
        assert counts == {"min": 3, "max": 3, "steps_max": steps}
    assert out["ttfa_floor"]["steps"] == LEAD[family] + 2  # the first 2-frame chunk
    f = out["floors"]
    for key in FLOOR_KEYS:
        assert isinstance(f[key], (int, float)) and f[key] > 0, key
    assert f["engine_steps"] == {"1": 2 * steps, "16": steps}  # 2 requests: one after the other, then together
    assert out["streams"] == {"1": 1, "4": 2, "16": 2}
    assert f["step_s_1"] == pytest.approx(out["wall_s"]["1"] / (2 * steps))
    assert f["step_s_16"] == pytest.approx(out["wall_s"]["16"] / steps)
    assert f["step_floor_s_1"] == pytest.approx(f["weight_bytes_per_step"] / (f["memory_bandwidth_gb_s"] * 1e9))
    assert f["compute_floor_s_16"] == pytest.approx(f["flops_per_step_16"] / (f["gemm_gflop_s"] * 1e9))
    assert f["step_floor_s_16"] == pytest.approx(max(f["compute_floor_s_16"], f["memory_floor_s_16"]))
    assert f["fraction_1"] == pytest.approx(f["step_floor_s_1"] / f["step_s_1"])
    assert f["fraction_16"] == pytest.approx(f["step_floor_s_16"] / f["step_s_16"])
    assert f["weight_bytes_per_step"] == sum(f["weight_bytes_by_group"].values()) < f["parameter_bytes"]
    assert f["gemm_gflop_s"] == max(f["gemm"]["square_gflop_s"], f["gemm"]["decode_shaped_gflop_s"])
    assert "step at 16" in format_table(out)
    if family == "realtime":  # its text can stream in: the time from that text to the first audio
        assert out["text_to_first_audio_s"] > 0 and len(out["text_to_first_audio_runs_s"]) == 1
        assert "text to first audio" in format_table(out)
    else:
        assert out["text_to_first_audio_s"] is None


def test_warm_ups_after_the_first_run_the_measured_lead(tiny_checkpoints, monkeypatch) -> None:
    """Only the first warm-up leaves room for n_vq = 32 steps before frame 0; the later ones run the lead
    it measured (0 for Local) + the first 2-frame chunk + 2 frames. Each of the three took n_vq + 4 steps
    before: minutes of Local depth loops on a loaded 2-core host for a 2-frame bench."""
    from mossserve.bench.engine import run_engine_bench
    from mossserve.engine.engine import Engine

    engines, caps = [], []  # each engine and the step cap of its first request, its warm-up
    real = Engine.add_request

    def add_request(self, *args, **kwargs):
        if not any(engine is self for engine in engines):
            engines.append(self)
            caps.append(kwargs["max_new_frames"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "add_request", add_request)
    out = run_engine_bench(family="local", model=tiny_checkpoints["local"], codec=TINY_CODEC, frames=2, requests=1,
                           ttfa_runs=1, bandwidth_mb=8)
    assert out["ttfa_lead_steps"] == 0
    assert caps == [32 + 2 + 2, 2 + 2, 2 + 2]


def test_engine_bench_refuses_a_checkpoint_of_another_family() -> None:
    from mossserve.bench.engine import run_engine_bench

    with pytest.raises(InvalidRequestError, match="pass --family delay"):
        run_engine_bench(family="local", model=DEMO_MODEL, frames=2, requests=1, ttfa_runs=1)
    # a checkpoint that names no codec of its own: refused before the codec's hub fetch failed offline
    realtime = Path(__file__).parent / "fixtures" / "moss_tts_realtime"
    with pytest.raises(InvalidRequestError, match="pass --family realtime"):
        run_engine_bench(family="fish", model=realtime, frames=2, requests=1, ttfa_runs=1)


def test_fish_step_count_reads_the_allowed_rows_of_the_slow_head() -> None:
    """Fish's slow head reads only the rows the semantic mask allows (and their magnitudes for the
    rounding bound): the count includes those copies in full, and not the whole tied embedding."""
    from fish_cases import family as fish_family

    from mossserve.bench.floors import count_step
    from mossserve.sampling import SamplingParams
    from mossserve.speech_request import SpeechRequest

    fam = fish_family()
    prompts = [fam.build_prompt(SpeechRequest(input="Hello there."))]
    read = count_step(fam, prompts, SamplingParams.greedy(), 512, 1)["weight_bytes_by_parameter"]
    weights = fam.decode_weights()
    for name in ("slow_head.allowed_rows", "slow_head.allowed_rows_abs"):
        assert read[name] == weights[name].numel() * weights[name].element_size() > 0
    allowed = weights["slow_head.allowed_rows"].shape[0]
    head = fam.model.head_weight()
    assert allowed == fam.config.semantic_end - fam.config.semantic_start + 2 < head.shape[0]
    assert read.get("slow.embed_tokens.weight", 0) < head.numel() * head.element_size()
