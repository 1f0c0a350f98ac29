"""Realtime model: teacher-forced hidden states and local logits at the README's tolerances, and loading."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from realtime_cases import REALTIME_DIR, golden, realtime_family
from safetensors.torch import load_file, save_file

from mossserve.errors import CheckpointError
from mossserve.layers.batch_context import BatchContext
from mossserve.models.moss_realtime_config import MossRealtimeConfig
from mossserve.models.moss_realtime_family import is_realtime_config, load_realtime

HIDDEN_TOL = (1e-4, 1e-4)  # atol, rtol: README §2
LOGIT_TOL = (5e-3, 1e-4)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> float:
    err = (actual - expected).abs()
    assert bool((err <= tol[0] + tol[1] * expected.abs()).all()), f"max error {err.max().item()}"
    return err.max().item()


def backbone_states():
    tf = golden("teacher_forced")
    model = realtime_family().model
    ids = tf["input_ids"]
    states: list[torch.Tensor] = []
    with torch.inference_mode():
        last = model(ids, BatchContext.build([0], ids.shape[1], None, ids.device), hidden_states=states)
    return tf, model, states, last


def test_teacher_forced_hidden_states() -> None:
    tf, _, states, last = backbone_states()
    assert_close(states[0], tf["hidden_states.0"], HIDDEN_TOL)  # summed embeddings
    assert_close(states[1], tf["hidden_states.1"], HIDDEN_TOL)  # after layer 0
    assert_close(last, tf["hidden_states.2"], HIDDEN_TOL)  # final norm
    assert_close(last, tf["last_hidden_state"], HIDDEN_TOL)


def test_backbone_with_the_slot_cache_equals_the_full_pass() -> None:
    """Prefill in two pieces then one-row steps through a slot KV cache: what the engine runs."""
    from mossserve.engine.kv_cache import SlotKVCache

    tf, model, _, _ = backbone_states()
    c = model.config.language
    cache = SlotKVCache(c.num_hidden_layers, 2, 256, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")
    slot = cache.allocate() + cache.allocate()  # slot 1
    ids, outs, start = tf["input_ids"], [], 0
    with torch.inference_mode():
        for end in (100, 124, 125, 126, 127, 128):
            piece = ids[:, start:end]
            outs.append(model(piece, BatchContext.build([start], end - start, [slot], ids.device), cache.k, cache.v))
            start = end
    assert_close(torch.cat(outs, dim=1), tf["last_hidden_state"], HIDDEN_TOL)


def test_local_logits_teacher_forced_and_cached() -> None:
    tf, model, _, last = backbone_states()
    h = last[0, tf["positions"]]
    codes = tf["local_codes"]
    assert torch.equal(tf["local_input_ids"][:, 1:], codes[:, :15])
    local = model.local
    with torch.inference_mode():
        full = local.teacher_forced(h, codes[:, :15])
        cache = local.new_cache(len(h), h.device, h.dtype)
        x, steps = h, []
        for i in range(16):
            steps.append(local.step(x, i, cache))
            if i < 15:
                x = local.embed_codes(i, codes[:, i])
    assert_close(full, tf["local_logits"], LOGIT_TOL)
    assert_close(torch.stack(steps, dim=1), tf["local_logits"], LOGIT_TOL)


def test_loading_is_strict_and_keeps_the_reference_padding_rows(tmp_path) -> None:
    model = realtime_family().model
    rows = torch.arange(16) * 1027 + 1024
    assert bool((model.audio_embed[rows] == 0).all())
    assert not any(p.is_meta for p in model.parameters())
    weights = load_file(REALTIME_DIR / "model.safetensors")
    assert torch.equal(model.language_model.embed_tokens.weight, weights["embed_tokens.0.weight"])
    for name in ("language_model.embed_tokens.weight", "local_transformer.local_lm_heads.3.weight"):
        broken = tmp_path / name
        broken.mkdir()
        for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REALTIME_DIR / file, broken / file)
        save_file({k: v for k, v in weights.items() if k != name}, broken / "model.safetensors")
        config = json.loads((broken / "config.json").read_text())
        with pytest.raises(CheckpointError, match="missing tensor"):
            load_realtime(broken, str(broken), config, torch.device("cpu"), torch.float32)


def test_config_parsing() -> None:
    config = json.loads((REALTIME_DIR / "config.json").read_text())
    assert is_realtime_config(config)
    assert not is_realtime_config({"model_type": "moss_tts_delay"})
    parsed = MossRealtimeConfig.from_dict(config)
    assert (parsed.rvq, parsed.audio_eos_code, parsed.text_pad_id, parsed.local.head_dim) == (16, 1026, 151655, 12)
    scaled = json.loads(json.dumps(config))
    scaled["local_config"]["rope_parameters"]["factor"] = 2.0
    with pytest.raises(CheckpointError, match="rope"):
        MossRealtimeConfig.from_dict(scaled)
    narrow = json.loads(json.dumps(config))
    narrow["local_config"]["hidden_size"] = 16
    with pytest.raises(CheckpointError, match="hidden_size"):
        MossRealtimeConfig.from_dict(narrow)
