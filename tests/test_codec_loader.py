"""Strict checkpoint loading of the MOSS-Audio-Tokenizer (fixture README 5.1-5.2).

Every variation starts from the tiny fixture checkpoint, changed in a temporary directory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mossserve.errors import CheckpointError
from mossserve.models.codecs import MossAudioTokenizer, MossAudioTokenizerConfig

FIXTURES = Path(__file__).parent / "fixtures" / "moss_audio_tokenizer"
TINY = FIXTURES / "tiny"



@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(TINY / "model.safetensors")


@pytest.fixture(scope="module")
def goldens() -> dict[str, torch.Tensor]:
    return load_file(TINY / "goldens.safetensors")


def checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or json.loads((TINY / "config.json").read_text())))
    save_file(tensors, directory / "model.safetensors")
    return directory


def decode_error(m: MossAudioTokenizer, g: dict) -> float:
    codes = g["encode/zh/audio_codes"][:, 0, :31]
    return (m.decode(codes).cpu() - g["decode/zh/k32/audio"][0]).abs().max().item()


LAYER = "decoder.0.transformer.layers.1"
WN = "quantizer.quantizers.5.in_proj.parametrizations.weight.original0"


@pytest.mark.parametrize("name", ["decoder.6.output_proj.weight", WN, f"{LAYER}.norm2.bias",
                                  "quantizer.quantizers.31.codebook.weight"])
def test_missing_tensor(tmp_path, tensors, name):
    changed = dict(tensors)
    del changed[name]
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {name}"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, changed))


def test_unexpected_tensor(tmp_path, tensors):
    changed = dict(tensors)
    changed["quantizer.quantizers.32.codebook.weight"] = torch.zeros(1024, 8)  # a 33rd stage
    changed["encoder.2.weight"] = torch.zeros(3)  # a patch stage has no parameters
    with pytest.raises(CheckpointError, match=r"unexpected 2 tensor\(s\): encoder.2.weight, quantizer.quantizers.32"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, changed))


@pytest.mark.parametrize("name,shape", [("quantizer.quantizers.3.codebook.weight", (1024, 9)),
                                        (WN, (8, 1)), (f"{LAYER}.self_attn.in_projs.0.weight", (144, 47))])
def test_wrong_shape(tmp_path, tensors, name, shape):
    changed = dict(tensors)
    changed[name] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=rf"{name} has shape {list(shape)}".replace("[", r"\[").replace("]", r"\]")):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, changed))


def test_non_float_tensor(tmp_path, tensors):
    changed = dict(tensors)
    changed[f"{LAYER}.norm1.weight"] = torch.zeros(48, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="norm1.weight has dtype I32"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, changed))


@pytest.mark.parametrize("path,field", [
    ((), "decoder_kwargs"),
    ((), "quantizer_kwargs"),
    (("encoder_kwargs", 1), "d_model"),
    (("decoder_kwargs", 1), "patch_size"),
    (("quantizer_kwargs",), "codebook_dim"),
])
def test_missing_config_field(tmp_path, tensors, path, field):
    config = json.loads((TINY / "config.json").read_text())
    node = config
    for key in path:
        node = node[key]
    del node[field]
    with pytest.raises(CheckpointError, match=f"missing config field '{field}'"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, tensors, config))


def test_inconsistent_config(tmp_path, tensors):
    config = json.loads((TINY / "config.json").read_text())
    config["decoder_kwargs"][2]["input_dimension"] = 25
    with pytest.raises(CheckpointError, match=r"decoder_kwargs\[2\]: input_dimension 25, but 24 channels arrive"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, tensors, config))
    config = json.loads((TINY / "config.json").read_text())
    config["downsample_rate"] = 960
    with pytest.raises(CheckpointError, match="multiply to 1920, expected 960"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, tensors, config))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(tmp_path, tensors, damage):
    directory = checkpoint(tmp_path, tensors)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00\x01not a safetensors file" * 10,
                      "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MossAudioTokenizer.from_pretrained(directory)


def test_missing_files(tmp_path, tensors):
    directory = checkpoint(tmp_path, tensors)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        MossAudioTokenizer.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        MossAudioTokenizer.from_pretrained(directory)
    with pytest.raises(CheckpointError, match="not found"):
        MossAudioTokenizer.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="is a file"):
        MossAudioTokenizer.from_pretrained(TINY / "config.json")


def test_sharded_checkpoint(tmp_path, tensors, goldens):
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (tmp_path / "config.json").write_text((TINY / "config.json").read_text())
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert decode_error(MossAudioTokenizer.from_pretrained(tmp_path), goldens) <= 1e-3
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        MossAudioTokenizer.from_pretrained(tmp_path)
    save_file({n: tensors[n] for n in shards["model-00002-of-00002.safetensors"][1:]},
              tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=f"missing 1 tensor\\(s\\): {names[1]}"):
        MossAudioTokenizer.from_pretrained(tmp_path)


def test_older_attention_names(tmp_path, tensors, goldens):
    changed = dict(tensors)
    changed["encoder.1.transformer.layers.0.self_attn.in_proj_weight"] = changed.pop(
        "encoder.1.transformer.layers.0.self_attn.in_projs.0.weight")
    changed[f"{LAYER}.self_attn.in_proj.weight"] = changed.pop(f"{LAYER}.self_attn.in_projs.0.weight")
    changed[f"{LAYER}.self_attn.out_proj.weight"] = changed.pop(f"{LAYER}.self_attn.out_projs.0.weight")
    m = MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, changed))
    assert decode_error(m, goldens) <= 1e-3
    assert torch.equal(m.encode(goldens["clip/zh"]), goldens["encode/zh/audio_codes"][:, 0, :31])
    changed[f"{LAYER}.self_attn.in_projs.0.weight"] = tensors[f"{LAYER}.self_attn.in_projs.0.weight"].clone()
    with pytest.raises(CheckpointError, match="appears twice"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path / "both", changed))


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float16])
def test_half_precision_weights(tmp_path, tensors, goldens, weights):
    """bf16 / fp16 checkpoints load into an fp32 model (rounded weights: close, not golden)."""
    m = MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, {k: v.to(weights) for k, v in tensors.items()}))
    assert m.dtype == torch.float32 and m.quantizer.codebooks.dtype == torch.float32
    golden = goldens["decode/zh/k32/audio"][0]
    assert decode_error(m, goldens) / golden.abs().max().item() < 0.05


def test_bf16_compute(goldens):
    m = MossAudioTokenizer.from_pretrained(TINY, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.quantizer.codebooks.dtype == torch.float32  # quantizer stays fp32
    audio = m.decode(goldens["encode/zh/audio_codes"][:, 0, :31])
    assert audio.dtype == torch.float32
    golden = goldens["decode/zh/k32/audio"][0]
    assert (audio - golden).abs().max().item() / golden.abs().max().item() < 0.1


def test_config_spellings(tmp_path, tensors, goldens):
    """The released file: model_type speech_tokenizer, both rate keys; also sample_rate alone."""
    config = json.loads((TINY / "config.json").read_text())
    config["model_type"] = "speech_tokenizer"
    config["sample_rate"] = config.pop("sampling_rate")
    m = MossAudioTokenizer.from_pretrained(checkpoint(tmp_path, tensors, config))
    assert m.sample_rate == 24000 and decode_error(m, goldens) <= 1e-3
    config["model_type"] = "dac"
    with pytest.raises(CheckpointError, match="model_type 'dac'"):
        MossAudioTokenizer.from_pretrained(checkpoint(tmp_path / "other", tensors, config))


def test_released_config():
    c = MossAudioTokenizerConfig.from_dict(json.loads((FIXTURES / "real_config.json").read_text()))
    assert (c.sampling_rate, c.downsample_rate, c.number_channels, c.interleaved) == (24000, 1920, 1, False)
    assert [s.context for s in c.encoder if hasattr(s, "context")] == [1000, 500, 250, 125]
    assert [s.context for s in c.decoder if hasattr(s, "context")] == [125, 250, 500, 1000]
    assert (c.quantizer.num_quantizers, c.quantizer.codebook_size, c.quantizer.rvq_dim) == (32, 1024, 512)


def test_the_quantizer_projections_cuda_form():
    """On CUDA the quantizer's 1x1 convolutions run as a float32 matmul (cuDNN would take TF32):
    the same products as the convolution, summed in another order; on CPU the convolution itself."""
    from mossserve.models.codecs.moss_quantizer import pointwise, pointwise_by_matmul

    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((3, 64, 17), (48, 64), (48,)))
    conv = torch.nn.functional.conv1d(x, weight[:, :, None], bias)
    assert torch.equal(pointwise(x, weight, bias), conv)
    assert torch.allclose(pointwise_by_matmul(x, weight, bias), conv, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda(goldens):
    m = MossAudioTokenizer.from_pretrained(TINY, device="cuda")
    assert torch.equal(m.encode(goldens["clip/zh"]).cpu(), goldens["encode/zh/audio_codes"][:, 0, :31])
    assert decode_error(m, goldens) <= 1e-3
    decoder = m.streaming_decoder(2, 4)
    sid = decoder.open()
    codes = goldens["encode/zh/audio_codes"][:, 0, :31].cuda()
    out = torch.cat([decoder.decode([sid], [codes[:, s: s + 4]])[0] for s in range(0, 31, 4)], -1)
    assert (out.cpu() - goldens["decode/zh/k32/audio"][0]).abs().max().item() <= 1e-3


def test_unreleased_variants(tmp_path):
    """Spec 5.1-5.2 options no released checkpoint uses: RMS norms (`alpha`), gated MLP
    (`gating.linear_in/out`), sin / sin_rope embeddings, plain RVQ. Published names and shapes
    load strictly, and streaming still equals offline."""
    from mossserve.bench.codec import write_random_checkpoint

    config = json.loads((TINY / "config.json").read_text())
    config["causal_transformer_context_duration"] = 0.3
    config["quantizer_kwargs"]["quantizer_type"] = "rvq"
    first, last = config["decoder_kwargs"][0], config["decoder_kwargs"][6]
    first.update(norm="rms_norm", gating="silu", positional_embedding="sin_rope")
    last.update(norm="rms_norm_f32", positional_embedding="sin", layer_scale=None)
    m = MossAudioTokenizer.from_pretrained(write_random_checkpoint(tmp_path, config, seed=1))
    names = set(load_file(tmp_path / "model.safetensors"))
    hidden = (21 * 48) // 8
    assert {"decoder.0.transformer.layers.0.norm1.alpha", "decoder.0.transformer.layers.1.gating.linear_in.weight",
            "decoder.6.transformer.layers.0.norm2.alpha"} <= names
    assert m.decoder[0].transformer.layers[1].gating.linear_in.weight.shape == (2 * hidden, 48)
    assert not any(n.startswith("decoder.6.") and "layer_scale" in n for n in names)
    codes = torch.randint(0, 1024, (32, 40), generator=torch.Generator().manual_seed(0))
    decoder = m.streaming_decoder(1, 3)
    sid = decoder.open()
    streamed = torch.cat([decoder.decode([sid], [codes[:, s: s + 3]])[0] for s in range(0, 40, 3)], -1)
    assert (streamed - m.decode(codes)).abs().max().item() <= 1e-3
    assert m.encode(torch.randn(4000)).shape == (32, 2)
    config["decoder_kwargs"][0]["gating"] = "swish"
    with pytest.raises(CheckpointError, match="unsupported gating 'swish'"):
        MossAudioTokenizerConfig.from_dict(config)


def test_a_model_directory_given_as_codec_points_to_its_codec() -> None:
    """`codec encode --codec <model dir>` said only that the type is not supported."""
    from mossserve.api import DEMO_MODEL
    from mossserve.errors import CheckpointError
    from mossserve.models.registry import load_codec

    with pytest.raises(CheckpointError, match=f"a model directory: its codec is {re.escape(str(DEMO_MODEL / 'codec'))}"):
        load_codec(DEMO_MODEL)
