"""Fish S2 Pro slow and fast AR: config reading, strict loading of the sharded checkpoint, the
bf16-rounded interleaved RoPE, and teacher-forced parity with the reference
(fixtures/fish_s2_pro/README.md sections 2, 4, 5 and 9.2-9.3; tolerances of section 9.6)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fish_cases import FISH_DIR, family, npz
from safetensors.torch import load_file, save_file

from mossserve.errors import CheckpointError
from mossserve.layers.batch_context import BatchContext
from mossserve.layers.rotary import RotaryEmbedding
from mossserve.layers.rotary_rounded import RoundedRotaryEmbedding
from mossserve.models.fish_s2_config import FishS2Config
from mossserve.models.registry import load_talker

EMBED_TOL = (1e-6, 0.0)  # |a - b| <= atol + rtol * |b|
LOGIT_TOL = (1e-4, 1e-4)
SLOW_CASES = ["plain__b0", "clone__b0", "multi_speaker__b1"]


def assert_close(ours: torch.Tensor, ref: np.ndarray, tol: tuple[float, float], what: str) -> None:
    ours, ref = ours.double(), torch.as_tensor(ref).double()
    excess = (ours - ref).abs() - (tol[0] + tol[1] * ref.abs())
    assert excess.max() <= 0, f"{what}: worst excess {excess.max():.3g} (max error {(ours - ref).abs().max():.3g})"


def slow_forward(model, matrix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One all-position causal forward over a fixture matrix [N + 1, L]: embeds, hidden, logits."""
    rows = torch.from_numpy(matrix.T.copy())[None]
    ctx = BatchContext.build([0], rows.shape[1], None, rows.device)
    with torch.no_grad():
        hidden = model(rows, ctx)[0]
        return model.embed(rows)[0], hidden, model.logits(hidden)


def config_dict() -> dict:
    return json.loads((FISH_DIR / "config.json").read_text())


# ---- config -----------------------------------------------------------------------------
def test_config_reads_what_the_reference_reads() -> None:
    cfg = FishS2Config.from_dict(config_dict())
    assert (cfg.slow.hidden_size, cfg.slow.num_hidden_layers, cfg.slow.num_attention_heads) == (32, 2, 8)
    assert (cfg.slow.num_key_value_heads, cfg.slow.head_dim, cfg.slow.intermediate_size) == (2, 16, 88)
    assert (cfg.num_codebooks, cfg.codebook_size, cfg.eos_token_id) == (10, 4096, 1184)
    assert cfg.slow.qk_norm and not cfg.fast.qk_norm and cfg.tie_word_embeddings
    assert cfg.fast.rope_theta == cfg.slow.rope_theta and cfg.fast.rms_norm_eps == cfg.slow.rms_norm_eps


def test_config_defaults_and_inheritance() -> None:
    """head_dim defaults to 64 (not D/H); intermediate to 8D/3 rounded up to 256; n_local_heads -1 = H;
    the fast AR takes every unset shape from the slow AR and always the slow rope_base / norm_eps."""
    raw = config_dict()
    text = {k: v for k, v in raw["text_config"].items() if k not in ("head_dim", "intermediate_size")}
    text["n_local_heads"] = -1
    audio = {"vocab_size": 4096, "num_codebooks": 10, "n_layer": 3, "rope_base": 5.0, "norm_eps": 0.5}
    cfg = FishS2Config.from_dict({**raw, "text_config": text, "audio_decoder_config": audio})
    assert (cfg.slow.head_dim, cfg.slow.intermediate_size, cfg.slow.num_key_value_heads) == (64, 256, 8)
    assert (cfg.fast.hidden_size, cfg.fast.num_attention_heads, cfg.fast.head_dim, cfg.fast.num_hidden_layers) == (32, 8, 64, 3)
    assert cfg.fast.rope_theta == 1e6 and cfg.fast.rms_norm_eps == 1e-6
    wider = FishS2Config.from_dict({**raw, "text_config": text, "audio_decoder_config": {**audio, "dim": 512}})
    assert (wider.fast.hidden_size, wider.fast.intermediate_size) == (512, 256)  # the slow value, not 8*512/3
    with pytest.raises(CheckpointError, match="audio_decoder_config: missing config field 'n_layer'"):
        FishS2Config.from_dict({**raw, "audio_decoder_config": {"vocab_size": 4096, "num_codebooks": 10}})


def test_semantic_range_comes_from_the_tokenizer() -> None:
    model = family().model
    assert (model.config.semantic_start, model.config.semantic_end) == (1217, 5312)


# ---- loading ----------------------------------------------------------------------------
def copy_checkpoint(tmp_path):
    target = tmp_path / "fish"
    shutil.copytree(FISH_DIR, target, ignore=shutil.ignore_patterns("*.npz", "prompts.json"))
    return target


def test_every_published_tensor_is_loaded() -> None:
    index = json.loads((FISH_DIR / "model.safetensors.index.json").read_text())["weight_map"]
    model = family().model
    assert set(model.checkpoint_layout()) == set(index)
    assert sum(p.numel() for p in model.parameters()) == sum(
        t.numel() for name in sorted(set(index.values())) for t in load_file(FISH_DIR / name).values())


@pytest.mark.parametrize("change, message", [
    ("drop", r"missing tensor.*text_model\.model\.layers\.1\.feed_forward\.w3\.weight"),
    ("extra", r"unexpected tensor.*audio_decoder\.layers\.9\.attention\.wqkv\.weight"),
])
def test_loading_is_strict(tmp_path, change: str, message: str) -> None:
    target = copy_checkpoint(tmp_path)
    shard = target / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    if change == "drop":
        del tensors["text_model.model.layers.1.feed_forward.w3.weight"]
    else:
        tensors["audio_decoder.layers.9.attention.wqkv.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=message):
        load_talker(target)


def test_missing_shard_is_a_clear_error(tmp_path) -> None:
    target = copy_checkpoint(tmp_path)
    (target / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists model-00002-of-00002.safetensors, which is missing"):
        load_talker(target)


# ---- rotary -------------------------------------------------------------------------------
def test_rotary_tables_are_the_references_bf16_tables() -> None:
    rope = npz("rope")
    cfg = family().model.config
    for name, head_dim, length in (("slow_freqs_cis", cfg.slow.head_dim, 64), ("fast_freqs_cis", cfg.fast.head_dim, 10)):
        table = RoundedRotaryEmbedding(head_dim, cfg.slow.rope_theta)
        table.reserve(length, torch.device("cpu"))
        half = head_dim // 2
        assert torch.equal(table.cos_table[:length, :half], torch.from_numpy(rope[name][..., 0])), name
        assert torch.equal(table.sin_table[:length, half:], torch.from_numpy(rope[name][..., 1])), name
        assert torch.equal(table.cos_table[:length, half:], table.cos_table[:length, :half])
        assert torch.equal(table.sin_table[:length, :half], -table.sin_table[:length, half:])  # signed for rotate()


def test_without_the_rounding_the_logits_miss() -> None:
    """README 4.2: unrounded tables move the logits by ~1e-2, far outside the tolerance."""
    model = family().model
    slow = npz("slow_logits")
    rounded = model.slow.rotary
    try:
        model.slow.rotary = RotaryEmbedding(model.config.slow.head_dim, model.config.slow.rope_theta)
        _, _, logits = slow_forward(model, slow["clone__b0__input"])
    finally:
        model.slow.rotary = rounded
    assert np.abs(logits.numpy() - slow["clone__b0__logits"]).max() > 1e-3


# ---- teacher-forced parity ------------------------------------------------------------------
@pytest.mark.parametrize("case", SLOW_CASES)
def test_slow_ar_teacher_forced(case: str) -> None:
    slow = npz("slow_logits")
    embeds, hidden, logits = slow_forward(family().model, slow[f"{case}__input"])
    assert_close(embeds, slow[f"{case}__embeds"], EMBED_TOL, "embeds")
    assert_close(hidden, slow[f"{case}__hidden"], LOGIT_TOL, "hidden")
    assert_close(logits, slow[f"{case}__logits"], LOGIT_TOL, "logits")


def test_slow_ar_through_the_kv_cache_matches_one_pass() -> None:
    """Prefill a prefix, then one position at a time (the engine's path), against the golden logits."""
    model = family().model
    slow = npz("slow_logits")
    rows = torch.from_numpy(slow["clone__b0__input"].T.copy())[None]
    c = model.config.slow
    length, split = rows.shape[1], 70
    shape = (c.num_hidden_layers, 1, c.num_key_value_heads, length, c.head_dim)
    k, v = torch.zeros(shape), torch.zeros(shape)
    with torch.no_grad():
        states = [model(rows[:, :split], BatchContext.build([0], split, [0], rows.device), k, v)[0]]
        for t in range(split, length):
            states.append(model(rows[:, t : t + 1], BatchContext.build([t], 1, [0], rows.device), k, v)[0])
        logits = model.logits(torch.cat(states))
    assert_close(logits, slow["clone__b0__logits"], LOGIT_TOL, "cached logits")


def test_fast_ar_teacher_forced() -> None:
    fast = npz("fast_logits")
    with torch.no_grad():
        logits = family().model.teacher_forced_fast_logits(torch.from_numpy(fast["hidden"]), torch.from_numpy(fast["codes"]))
    assert logits.shape == fast["logits"].shape
    assert_close(logits, fast["logits"], LOGIT_TOL, "fast logits")
