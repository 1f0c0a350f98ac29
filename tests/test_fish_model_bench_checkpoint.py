"""The random S2 Pro-shaped checkpoint of `mossserve bench --family fish`: published layout, loads
through the real talker and codec loaders, byte-identical builds, and greedy decoding that runs
to its cap (the bench needs requests that never stop by themselves)."""
from __future__ import annotations

import json

import numpy as np
import torch

from mossserve.api import TTS
from mossserve.bench.fish_checkpoint import build_fish_checkpoint, fish_tensor_shapes
from mossserve.models.fish_s2_family import FishS2Family
from mossserve.sampling import SamplingParams
from mossserve.speech_request import SpeechRequest

SMALL = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16, "fast_layers": 1}
SMALL_CODEC = {"encoder_dim": 4, "decoder_dim": 64, "layers": 1, "heads": 2, "head_dim": 32, "intermediate": 128,
               "window": 16}


def test_bench_checkpoint_builds_loads_and_never_stops(tmp_path) -> None:
    a = build_fish_checkpoint(tmp_path / "a", codec_sizes=SMALL_CODEC, **SMALL)
    b = build_fish_checkpoint(tmp_path / "b", codec_sizes=SMALL_CODEC, **SMALL)
    for name in ("model.safetensors", "codec.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "fish_qwen3_omni" and config["text_config"]["vocab_size"] % 256 == 0
    assert config["semantic_end_token_id"] - config["semantic_start_token_id"] == 4095
    tts = TTS.from_pretrained(a)
    try:
        assert isinstance(tts.talker, FishS2Family)
        assert set(tts.talker.model.checkpoint_layout()) == set(fish_tensor_shapes(config))
        assert tts.talker.config.semantic_start == config["semantic_start_token_id"]
        prompt = tts.prompt(SpeechRequest(input="A bench request."))
        generation, audio = tts.run([prompt], SamplingParams.greedy(), max_new_frames=6)[0]
        assert generation.finish_reason == "length" and generation.frames.shape == (6, 10)
        assert audio.samples.shape[-1] == 6 * tts.codec.samples_per_frame and np.isfinite(audio.samples).all()
        assert torch.all(tts.talker.model.slow.embed_tokens.weight[config["eos_token_id"]] == 0)
    finally:
        tts.close()
