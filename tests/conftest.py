"""Shared test fixtures: paths of the copied golden data and loaded tiny checkpoints."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mossserve.layers import cpu_kernels

FIXTURES = Path(__file__).parent / "fixtures"
DELAY_DIR = FIXTURES / "moss_tts_delay"
TOKENIZER_DIR = FIXTURES / "moss_tokenizer"
CODEC_DIR = FIXTURES / "moss_audio_tokenizer"
AUDIO_DIR = FIXTURES / "audio"

# A streamed decode (chunk by chunk) equals a whole decode up to float rounding (codec fixture
# README 5.7); the kernels round differently per chunk length, by about 2e-5 on values that reach
# +-50 on AVX-512 hosts (README 3: "anything above 1e-4 deserves a look"). A frame cut in the wrong
# place differs by order 1.
STREAMED_VS_WHOLE_ATOL = 1e-4

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and CI cores are shared


@pytest.fixture(autouse=True)
def mossserve_logger_as_found():
    """`serve()` (and a Ray replica) sets up the `mossserve` logger for the process: a test that runs one
    in-process must not take later tests' records away from `caplog`."""
    logger = logging.getLogger("mossserve")
    found = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers, logger.level, logger.propagate = found


@pytest.fixture(scope="session", params=["tiny_nvq32", "tiny_nvq16"])
def delay_checkpoint(request) -> Path:
    return DELAY_DIR / request.param


@pytest.fixture(scope="session")
def codec_models():
    """The two codec fixture variants (same weights, 10 s and 0.3 s windows)."""
    from mossserve.models.codecs import MossAudioTokenizer

    return {v: MossAudioTokenizer.from_pretrained(CODEC_DIR / v) for v in ("tiny", "tiny_ctx")}


@pytest.fixture(scope="session")
def codec_goldens():
    from safetensors.torch import load_file

    return {v: load_file(CODEC_DIR / v / "goldens.safetensors") for v in ("tiny", "tiny_ctx")}


_delay_models: dict[Path, object] = {}


def load_delay_model(path: Path):
    """The fixture's MossDelayModel, loaded once per session (fp32, cpu)."""
    from mossserve.loader import build_on_meta, load_weights, weight_files
    from mossserve.models.moss_delay import MossDelayModel
    from mossserve.models.moss_delay_config import MossDelayConfig

    if path not in _delay_models:
        config = MossDelayConfig.from_file(path / "config.json")
        model = build_on_meta(lambda: MossDelayModel(config), torch.float32, "cpu")
        load_weights(model, weight_files(path), model.checkpoint_layout())
        _delay_models[path] = model.eval().requires_grad_(False)
    return _delay_models[path]


def fixed_shape_engine(fam, max_running: int, mode: str, batch_sizes: tuple[int, ...]):
    """An unthreaded engine whose runner decodes at fixed shapes: `mode` "graphs" captures them as CUDA
    graphs (a GPU only), "static" runs the same padded shapes eagerly (any device)."""
    from mossserve.config import EngineConfig
    from mossserve.engine.engine import Engine
    from mossserve.engine.talker_runner import TalkerRunner

    config = EngineConfig(threaded=False, max_running=max_running)
    engine = Engine(fam, None, config)
    runner = TalkerRunner(fam, max_running, engine.max_len, config.prefill_tokens, mode=mode, batch_sizes=batch_sizes)
    engine.runner = engine.sessions.runner = engine.prefixes.runner = runner  # the engine and its parts share one
    return engine


@pytest.fixture(scope="session")
def delay_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """The Delay fixture checkpoints as published directories: config, weights and tokenizer."""
    root = tmp_path_factory.mktemp("delay_models")
    dirs = {}
    for name in ("tiny_nvq32", "tiny_nvq16"):
        out = root / name
        out.mkdir()
        for file in ("config.json", "model.safetensors"):
            (out / file).symlink_to(DELAY_DIR / name / file)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (out / file).symlink_to(TOKENIZER_DIR / file)
        dirs[name] = out
    return dirs


_tts: dict[str, object] = {}


@pytest.fixture(scope="session")
def delay_tts(delay_model_dirs):
    """name -> TTS on that fixture checkpoint with the tiny codec."""
    from mossserve.api import TTS

    def get(name: str):
        if name not in _tts:
            _tts[name] = TTS.from_pretrained(delay_model_dirs[name], codec=CODEC_DIR / "tiny")
        return _tts[name]

    return get


@pytest.fixture(scope="session")
def demo_tts():
    """A TTS on the bundled demo checkpoint (six frames of noise per request), shared by the server tests."""
    from mossserve.api import TTS

    tts = TTS.from_pretrained(None)
    yield tts
    tts.close()


@pytest.fixture
def server_app(demo_tts, tmp_path):
    """make(**settings) -> a server app on the demo TTS with a fresh data directory (the TTS stays open)."""
    from mossserve.serve import ServerSettings, create_app

    def make(tts=None, **settings):
        settings.setdefault("data_dir", tmp_path / "data")
        return create_app(ServerSettings(**settings), tts=tts or demo_tts)

    return make


needs_cpu_kernels = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512" or cpu_kernels.bf16_kernels() is None,
    reason="our CPU kernels need an AVX-512 CPU and a C compiler")
needs_amx = pytest.mark.skipif(not (cpu_kernels.bf16_kernels() and cpu_kernels.bf16_kernels().amx),
                               reason="needs a CPU with AMX tiles (products of five rows and more run on them)")
