"""Loading published checkpoints: sharded and single-file layouts, dtypes, and clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DELAY_DIR, TOKENIZER_DIR
from mossserve.errors import CheckpointError
from mossserve.loader import parse_dtype
from mossserve.models.registry import load_talker

SOURCE = DELAY_DIR / "tiny_nvq16"


def make_checkpoint(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None,
                    config: dict | None = None, name: str = "ckpt") -> Path:
    out = tmp_path / name
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    cfg = json.loads((SOURCE / "config.json").read_text()) if config is None else config
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(SOURCE / "model.safetensors") if tensors is None else tensors,
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def published() -> dict[str, torch.Tensor]:
    return load_file(SOURCE / "model.safetensors")


def test_single_file_loads(tmp_path: Path) -> None:
    talker = load_talker(make_checkpoint(tmp_path))
    assert talker.codebooks == 16


def test_sharded_equals_single_file(tmp_path: Path) -> None:
    tensors = published()
    names = sorted(tensors)
    out = make_checkpoint(tmp_path)
    (out / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = load_talker(out).model.state_dict()
    single = load_talker(make_checkpoint(tmp_path, name="single")).model.state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in sharded)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes(tmp_path: Path, dtype: str) -> None:
    talker = load_talker(make_checkpoint(tmp_path), dtype=dtype)
    assert {p.dtype for p in talker.model.parameters()} == {getattr(torch, dtype)}


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_it_runs_natively(monkeypatch, tmp_path: Path, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    expected = torch.bfloat16 if native else torch.float32
    assert parse_dtype("auto", "cpu") == expected
    assert {p.dtype for p in load_talker(make_checkpoint(tmp_path), dtype="auto").model.parameters()} == {expected}


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_on_a_cpu_that_emulates_it_is_named(monkeypatch, caplog, native: bool, dtype) -> None:
    """--dtype bfloat16 on an AVX2-only CPU ran silently, 3x slower than float32 at 16 requests.
    `native`: an AVX-512 CPU with AVX512-BF16 (whose fp16 products oneDNN runs on AVX-512 too)."""
    from mossserve.models.registry import warn_if_emulated

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if native else "AVX2")
    with caplog.at_level("WARNING", logger="mossserve"):
        warn_if_emulated(dtype, torch.device("cpu"))
    name = str(dtype).removeprefix("torch.")
    needs = {"bfloat16": "AVX512-BF16 or AMX", "float16": "AVX512-FP16 or AMX-FP16"}.get(name)
    assert [r.getMessage() for r in caplog.records] == (
        [f"this CPU has no native {name} products ({needs}): they are emulated, slower than float32 (3x with 16 "
         "requests at once on an AVX2 CPU); --dtype float32, or auto, is faster on it"] if needs and not native else [])


def test_loading_half_precision_warns_where_it_is_emulated(monkeypatch, tmp_path: Path, caplog) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="mossserve"):
        load_talker(make_checkpoint(tmp_path), dtype="bfloat16")
    assert any("no native bfloat16 products" in r.getMessage() for r in caplog.records)


def test_an_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="unsupported dtype 'float8'.*auto"):
        parse_dtype("float8")


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = published()
    del tensors["language_model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.mlp\.up_proj\.weight"):
        load_talker(make_checkpoint(tmp_path, tensors))


def test_unexpected_tensor(tmp_path: Path) -> None:
    tensors = published()
    tensors["lm_heads.99.weight"] = torch.zeros(3, 8)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*lm_heads\.99\.weight"):
        load_talker(make_checkpoint(tmp_path, tensors))


def test_wrong_shape(tmp_path: Path) -> None:
    tensors = published()
    tensors["emb_ext.3.weight"] = torch.zeros(1024, 8)
    with pytest.raises(CheckpointError, match=r"emb_ext\.3\.weight has shape \[1024, 8\], expected \[1025, 8\]"):
        load_talker(make_checkpoint(tmp_path, tensors))


def test_missing_config_field(tmp_path: Path) -> None:
    config = json.loads((SOURCE / "config.json").read_text())
    del config["language_config"]["num_hidden_layers"]
    with pytest.raises(CheckpointError, match="missing config field 'num_hidden_layers'"):
        load_talker(make_checkpoint(tmp_path, config=config))


def test_corrupt_safetensors(tmp_path: Path) -> None:
    out = make_checkpoint(tmp_path)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_talker(out)


def test_missing_shard(tmp_path: Path) -> None:
    out = make_checkpoint(tmp_path)
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors, which is missing"):
        load_talker(out)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_talker(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="bert"):
        load_talker(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda c: [1, 2], "config.json must hold a JSON object, got list"),
    (lambda c: c | {"n_vq": "abc"}, "ValueError: invalid literal for int()"),
    (lambda c: c | {"n_vq": -1}, "negative dimension"),
    (lambda c: c | {"n_vq": 0}, "AssertionError: parameters without a published tensor"),
    (lambda c: c | {"language_config": "x"}, "AttributeError"),
    (lambda c: c | {"model_type": "x", "architectures": 5}, "architectures must be a list of class names, got 5"),
], ids=["list", "string-size", "negative-size", "zero-codebooks", "string-section", "number-architectures"])
def test_a_config_with_wrong_types_or_sizes_is_a_checkpoint_error(change, message, tmp_path: Path) -> None:
    """A damaged config.json fails as CheckpointError naming the checkpoint (the CLI's one-line
    error), not with whatever the model's construction raised."""
    from mossserve.api import DEMO_MODEL
    from mossserve.models.registry import load_talker

    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(CheckpointError) as error:
        load_talker(model)
    assert str(model) in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("language, message", [
    ({"num_attention_heads": 0, "num_key_value_heads": 0}, "attention heads must be at least 1, got 0 query"),
    ({"num_key_value_heads": -1}, "attention heads must be at least 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),  # transformers 4's older key
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
], ids=["zero-heads", "negative-kv-heads", "legacy-rope-type-key", "rope-type-key"])
def test_a_language_config_it_cannot_run_is_named(tmp_path: Path, language: dict, message: str) -> None:
    """Zero heads divided by zero (a traceback); a scaled RoPE under the older `type` key ran as plain RoPE."""
    config = json.loads((SOURCE / "config.json").read_text())
    config["language_config"] |= language
    with pytest.raises(CheckpointError, match=message):
        load_talker(make_checkpoint(tmp_path, config=config))
