"""Loading the Fish S2 Pro codec (fixtures/fish_s2_pro/README.md 2.5): `.pth` only through
weights_only, `.safetensors` preferred, both weight-norm spellings, strict names and shapes.
Every variation starts from the fixture's own files, changed in a temporary directory."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mossserve.api import default_codec
from mossserve.errors import CheckpointError
from mossserve.models.codecs.fish_dac import FishDac
from mossserve.models.codecs.fish_dac_loader import load_fish_dac_file
from mossserve.models.registry import load_codec

FISH_DIR = Path(__file__).parent / "fixtures" / "fish_s2_pro"
CONV_G = "decoder.model.6.conv.parametrizations.weight.original0"
PROJ_V = "quantizer.quantizer.quantizers.3.out_proj.weight_v"
W3 = "quantizer.pre_module.layers.1.feed_forward.w3.weight"


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(FISH_DIR / "codec.safetensors")


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_fish_dac_file(FISH_DIR / "codec.safetensors").state_dict()


def write(directory: Path, tensors: dict[str, torch.Tensor], kind: str = "safetensors", config: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if config:
        shutil.copy(FISH_DIR / "codec_config.json", directory)
    if kind == "safetensors":
        save_file(tensors, directory / "codec.safetensors")
    else:
        torch.save(tensors, directory / "codec.pth")
    return directory


def assert_same_modules(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_pth_and_safetensors_give_identical_modules(reference) -> None:
    assert_same_modules(load_fish_dac_file(FISH_DIR / "codec.pth").state_dict(), reference)


def test_fixture_pth_is_a_flat_weights_only_state_dict(tensors) -> None:
    loaded = torch.load(FISH_DIR / "codec.pth", weights_only=True)
    assert loaded.keys() == tensors.keys()


def _swap_spelling(name: str) -> str:
    """parametrizations.weight.original0/1 <-> weight_g/weight_v."""
    for new, old in ((".weight_g", ".parametrizations.weight.original0"), (".weight_v", ".parametrizations.weight.original1")):
        if name.endswith(old):
            return name[: -len(old)] + new
        if name.endswith(new):
            return name[: -len(new)] + old
    return name


def test_both_weight_norm_spellings(tmp_path, tensors, reference) -> None:
    swapped = {_swap_spelling(k): v for k, v in tensors.items()}
    assert sum(k.endswith(".weight_g") for k in swapped) > sum(k.endswith(".weight_g") for k in tensors)
    model = FishDac.from_pretrained(write(tmp_path, swapped))
    assert_same_modules(model.state_dict(), reference)


@pytest.mark.parametrize("wrap", ["state_dict", "generator"])
def test_wrapped_pth(tmp_path, tensors, reference, wrap) -> None:
    """The reference also accepts the dict under "state_dict" or with a "generator." prefix
    (training checkpoints; other modules' tensors are dropped)."""
    if wrap == "state_dict":
        saved = {"state_dict": tensors}
    else:
        saved = {f"generator.{k}": v for k, v in tensors.items()} | {"discriminator.w": torch.zeros(2)}
    model = FishDac.from_pretrained(write(tmp_path, saved, kind="pth"))
    assert_same_modules(model.state_dict(), reference)


def test_derived_transformer_buffers_in_a_pth_are_recomputed(tmp_path, tensors, reference) -> None:
    """fish-speech saved each codec transformer's RoPE table (bf16) and bool causal mask as persistent
    buffers until mid-2025 (KV caches once set up): a published codec.pth may hold them; the reference's
    non-strict load skips them, and so does ours. Other non-float or unknown tensors are still refused."""
    saved = dict(tensors)
    for module in ("encoder.block.4.block.5", "quantizer.pre_module", "quantizer.post_module"):
        saved[f"{module}.freqs_cis"] = torch.randn(64, 8, 2).bfloat16()
        saved[f"{module}.causal_mask"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))
    saved["quantizer.pre_module.layers.0.attention.kv_cache.k_cache"] = torch.zeros(1, 2, 64, 16)
    assert_same_modules(FishDac.from_pretrained(write(tmp_path / "with", saved, kind="pth")).state_dict(), reference)
    saved["quantizer.pre_module.mask"] = torch.ones(4, dtype=torch.bool)
    with pytest.raises(CheckpointError, match="quantizer.pre_module.mask has dtype torch.bool"):
        FishDac.from_pretrained(write(tmp_path / "other", saved, kind="pth"))


def test_safetensors_preferred_over_pth(tmp_path, tensors) -> None:
    write(tmp_path, tensors)
    (tmp_path / "codec.pth").write_bytes(b"not a checkpoint")
    assert isinstance(FishDac.from_pretrained(tmp_path), FishDac)


def test_without_codec_config_the_published_shapes_are_expected(tmp_path, tensors) -> None:
    """(The published codec has 4 encoder and 8 quantizer transformer layers; the tiny one fewer.)"""
    with pytest.raises(CheckpointError, match=r"do not match the codec config: missing \d+ tensor\(s\): encoder\.block\.4\.block\.5\.layers\.1\."):
        FishDac.from_pretrained(write(tmp_path, tensors, config=False))


@pytest.mark.parametrize("removed, named", [
    ([CONV_G], CONV_G),
    ([PROJ_V], PROJ_V),
    ([W3], W3),
    ([CONV_G, CONV_G.replace("original0", "original1")], "decoder.model.6.conv.weight"),
    (["quantizer.semantic_quantizer.quantizers.0.codebook.weight"], "quantizer.semantic_quantizer.quantizers.0.codebook.weight"),
])
def test_missing_tensor_is_named(tmp_path, tensors, removed, named) -> None:
    changed = {k: v for k, v in tensors.items() if k not in removed}
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {re.escape(named)}$"):
        FishDac.from_pretrained(write(tmp_path, changed))


def test_unexpected_tensor_is_named(tmp_path, tensors) -> None:
    changed = dict(tensors)
    changed["quantizer.quantizer.quantizers.9.codebook.weight"] = torch.zeros(1024, 8)  # a 10th residual stage
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): quantizer\.quantizer\.quantizers\.9\.codebook\.weight"):
        FishDac.from_pretrained(write(tmp_path, changed))


def test_both_spellings_of_one_weight_is_an_error(tmp_path, tensors) -> None:
    changed = dict(tensors)
    changed[_swap_spelling(CONV_G)] = tensors[CONV_G].clone()
    with pytest.raises(CheckpointError, match="fill the same parameter"):
        FishDac.from_pretrained(write(tmp_path, changed))


def test_wrong_shape_is_named(tmp_path, tensors) -> None:
    changed = dict(tensors)
    changed["quantizer.upsample.0.1.gamma"] = torch.zeros(65)
    with pytest.raises(CheckpointError, match=r"quantizer\.upsample\.0\.1\.gamma gives shape \[65\], expected \[64\]"):
        FishDac.from_pretrained(write(tmp_path, changed))


@pytest.mark.parametrize("change, message", [
    (lambda w: w.T.contiguous(), r"feed_forward\.w1\.weight \[\d+, \d+\] and .*w3\.weight \[\d+, \d+\]: two matrices of one shape"),
    (lambda w: w[:, :-1].contiguous(), "two matrices of one shape"),
], ids=["transposed", "narrow"])
def test_gate_and_up_projections_of_different_shapes_are_named(tmp_path, tensors, change, message) -> None:
    """They are joined into one matrix: torch.cat's "Sizes of tensors must match" named no tensor."""
    changed = dict(tensors)
    w1 = W3.replace(".w3.", ".w1.")
    changed[w1] = change(tensors[w1])
    with pytest.raises(CheckpointError, match=message):
        FishDac.from_pretrained(write(tmp_path, changed))


def test_a_one_dimensional_weight_normed_weight_is_named(tmp_path, tensors) -> None:
    changed = dict(tensors)
    changed[PROJ_V] = tensors[PROJ_V].flatten()
    with pytest.raises(CheckpointError, match="one gain per row of a weight of 2 or more dimensions"):
        FishDac.from_pretrained(write(tmp_path, changed))


def test_a_damaged_legacy_pth_is_a_checkpoint_error(tmp_path, tensors) -> None:
    """The pre-zip torch.save format with its storage key changed: torch.load fails with an AssertionError."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    key = re.search(rb"\d{6,}", data)
    changed = b"1" if key.group(0)[:1] != b"1" else b"2"
    write(tmp_path, {}, kind="pth")
    (tmp_path / "codec.pth").write_bytes(data[:key.start()] + changed + data[key.start() + 1:])
    with pytest.raises(CheckpointError, match="cannot read codec weights"):
        FishDac.from_pretrained(tmp_path)


def test_pickled_objects_are_refused(tmp_path, tensors) -> None:
    """codec.pth is read with weights_only=True: anything but tensors and plain containers fails."""
    write(tmp_path, {"weights": tensors, "callback": print}, kind="pth", config=True)
    with pytest.raises(CheckpointError, match="cannot read codec weights"):
        FishDac.from_pretrained(tmp_path)


@pytest.mark.parametrize("content", [b"\x00" * 16, b""], ids=["zeros", "empty"])
@pytest.mark.parametrize("name", ["codec.safetensors", "codec.pth"])
def test_unreadable_files(tmp_path, name, content) -> None:
    """An empty codec.pth (a download cut short) raises an EOFError with no message: still one line."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read codec weights"):
        FishDac.from_pretrained(tmp_path)


def test_directory_without_codec_weights(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no codec weights"):
        FishDac.from_pretrained(tmp_path)


def test_registry_and_default_codec_take_a_fish_model_directory() -> None:
    assert isinstance(load_codec(FISH_DIR), FishDac)
    assert Path(default_codec(FISH_DIR)) == FISH_DIR


def test_a_fish_model_without_its_codec_file_is_refused_naming_it(tmp_path: Path) -> None:
    """It fell back to the MOSS codec: a 7 GB download for a codec the model then refused."""
    with pytest.raises(CheckpointError, match=r"no codec\.safetensors or codec\.pth beside the model"):
        default_codec(tmp_path, "fish")
    assert Path(default_codec(FISH_DIR, "fish")) == FISH_DIR


@pytest.mark.parametrize("error", [MemoryError(), RecursionError(),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 1073741824 bytes.")])
def test_running_out_of_memory_while_reading_is_not_called_damage(monkeypatch, tmp_path, tensors, error) -> None:
    write(tmp_path, tensors, kind="pth")

    def out_of_memory(*_, **__):
        raise error

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(type(error)) as raised:
        FishDac.from_pretrained(tmp_path)
    assert raised.value is error
