"""Fish S2 Pro codec (modded DAC): encode / decode parity with the reference's goldens
(fixtures/fish_s2_pro/README.md sections 8 and 9.5, tolerances of 9.6), config and input checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mossserve.errors import CheckpointError, InvalidRequestError
from mossserve.models.codecs.fish_dac import FishDac
from mossserve.models.codecs.fish_dac_config import FishDacConfig

FISH_DIR = Path(__file__).parent / "fixtures" / "fish_s2_pro"
ENCODE = np.load(FISH_DIR / "codec_encode.npz")
DECODE = np.load(FISH_DIR / "codec_decode.npz")
GENERATION = np.load(FISH_DIR / "generation.npz")
CASES = ["plain", "clone", "multi_speaker", "emotion", "maxlen"]
LATENT_ATOL, WAVE_ATOL = 5e-5, 2e-5


@pytest.fixture(scope="module")
def codec() -> FishDac:
    return FishDac.from_pretrained(FISH_DIR)


@pytest.fixture(scope="module")
def wav() -> torch.Tensor:
    return torch.from_numpy(ENCODE["wav"])


@pytest.fixture(scope="module")
def codes(codec, wav) -> torch.Tensor:
    return codec.encode(wav)


def test_encoder_output_and_quantizer_input(codec, wav) -> None:
    np.testing.assert_allclose(codec.encoder_out(wav)[0].numpy(), ENCODE["encoder_out"], rtol=0, atol=LATENT_ATOL)
    np.testing.assert_allclose(codec.prequant(wav)[0].numpy(), ENCODE["prequant"], rtol=0, atol=LATENT_ATOL)


def test_encode_codes_exact_outside_near_ties(codes) -> None:
    """Every frame whose best code wins by >= 1e-4 in every stage matches exactly (README 9.6)."""
    assert codes.dtype == torch.int64 and codes.shape == ENCODE["codes"].shape
    assert codes.shape[1] == int(ENCODE["feature_length"][0])
    robust = ENCODE["vq_margin"].min(axis=0) >= 1e-4
    assert robust.sum() >= codes.shape[1] - 4
    assert np.array_equal(codes.numpy()[:, robust], ENCODE["codes"][:, robust])


def test_encode_fewer_quantizers_is_a_prefix(codec, wav, codes) -> None:
    assert torch.equal(codec.encode(wav, n_quantizers=3), codes[:3])


def test_encode_batch_equals_single(codec, wav, codes) -> None:
    """Clips of different lengths encoded together: each gets its own frames (the encoder is causal)."""
    short = 100_000  # 48.8 frames: the last one is partial
    out = codec.encode_batch([wav, wav[:short]])
    assert out.lengths.tolist() == [codes.shape[1], -(-short // 2048)]
    assert torch.equal(out.codes[:, 0], codes)
    robust = ENCODE["vq_margin"].min(axis=0) >= 1e-4
    whole = short // 2048
    assert np.array_equal(out.codes[:, 1, :whole].numpy()[:, robust[:whole]], ENCODE["codes"][:, :whole][:, robust[:whole]])
    assert torch.equal(out.codes[:, 1, : out.lengths[1]], codec.encode(wav[:short]))


def test_dequantize_and_reconstruction(codec) -> None:
    golden = torch.from_numpy(ENCODE["codes"])
    dequant = codec.dequantize(codec.checked_codes(golden[None], None))[0]
    np.testing.assert_allclose(dequant.numpy(), ENCODE["dequant"], rtol=0, atol=LATENT_ATOL)
    recon = codec.decode(golden)
    assert recon.shape == (1, 2048 * golden.shape[1]) and recon.dtype == torch.float32
    np.testing.assert_allclose(recon[0].numpy(), ENCODE["recon"], rtol=0, atol=WAVE_ATOL)


@pytest.mark.parametrize("case", CASES)
def test_decode_generated_codes(codec, case) -> None:
    """LM codes (residual codes up to 4095 included) decode to the reference's waveform; the
    caller's tensor is left as it was (the reference clamps it in place)."""
    codes = torch.from_numpy(DECODE[f"{case}__codes"])
    before = codes.clone()
    wave = codec.decode(codes)
    np.testing.assert_allclose(wave[0].numpy(), DECODE[f"{case}__wav"], rtol=0, atol=WAVE_ATOL)
    assert torch.equal(codes, before)


def test_long_encode_runs_in_chunks(codec, wav, codes, monkeypatch) -> None:
    """Past ENCODE_CHUNK_FRAMES the encode streams internally (its memory grew with the audio: ~65 MB a
    second for the published codec): the goldens' codes and quantizer input, alone and in a batch."""
    whole = codec.encode_batch([wav, wav[:100_000]])
    monkeypatch.setattr("mossserve.models.codecs.fish_dac.ENCODE_CHUNK_FRAMES", 40)  # 143 frames: 40, 40, 40, 23
    robust = ENCODE["vq_margin"].min(axis=0) >= 1e-4
    assert np.array_equal(codec.encode(wav).numpy()[:, robust], ENCODE["codes"][:, robust])
    np.testing.assert_allclose(codec.encode_batch([wav]).hidden[0].numpy(), ENCODE["prequant"], rtol=0, atol=LATENT_ATOL)
    chunked = codec.encode_batch([wav, wav[:100_000]])
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.lengths, whole.lengths)


def test_long_decode_runs_in_chunks(codec, monkeypatch) -> None:
    """Past DECODE_CHUNK_FRAMES the offline decode streams internally: the same waveform."""
    monkeypatch.setattr("mossserve.models.codecs.fish_dac.DECODE_CHUNK_FRAMES", 40)
    recon = codec.decode(torch.from_numpy(ENCODE["codes"]))  # 143 frames: chunks 40, 40, 40, 23
    np.testing.assert_allclose(recon[0].numpy(), ENCODE["recon"], rtol=0, atol=WAVE_ATOL)


def test_out_of_range_residual_codes_are_clamped(codec) -> None:
    codes = torch.from_numpy(DECODE["clone__codes"])
    assert bool((codes[1:] >= 1024).any())  # the golden exercises the clamp
    clamped = torch.cat([codes[:1].clamp(max=4095), codes[1:].clamp(max=1023)])
    assert torch.equal(codec.decode(codes), codec.decode(clamped))


def test_segment_decodes_as_the_server_sends_them(codec) -> None:
    """`multi_speaker__wav_segments`: each text batch's codes decoded on their own, concatenated."""
    codes = torch.from_numpy(DECODE["multi_speaker__codes"])
    first = GENERATION["multi_speaker__b0__codes"].shape[1]
    segments = torch.cat([codec.decode(codes[:, :first]), codec.decode(codes[:, first:])], dim=-1)
    np.testing.assert_allclose(segments[0].numpy(), DECODE["multi_speaker__wav_segments"], rtol=0, atol=WAVE_ATOL)


def test_batched_decode_equals_single(codec) -> None:
    """Causal: a clip right-padded inside a batch decodes to its own audio."""
    long, short = (torch.from_numpy(DECODE[f"{c}__codes"]) for c in ("clone", "plain"))
    padded = torch.zeros_like(long)
    padded[:, : short.shape[1]] = short
    audio = codec.decode_batch(torch.stack([long, padded]))
    np.testing.assert_allclose(audio[0, 0].numpy(), DECODE["clone__wav"], rtol=0, atol=WAVE_ATOL)
    np.testing.assert_allclose(audio[1, 0, : 2048 * short.shape[1]].numpy(), DECODE["plain__wav"], rtol=0, atol=WAVE_ATOL)


def test_rotary_tables_are_the_references_bf16_tables(codec) -> None:
    golden = np.load(FISH_DIR / "rope.npz")["codec_pre_module_freqs_cis"]  # (positions, hd / 2, cos|sin)
    rotary = codec.quantizer.pre_module.rotary
    positions = torch.arange(golden.shape[0])[None]
    cos, sin = rotary.cos_sin(positions, golden.shape[0], torch.float32)
    half = golden.shape[1]
    assert cos.shape == sin.shape == (1, golden.shape[0], 1, 2 * half)  # (B, T, 1, hd)
    assert np.array_equal(cos[0, :, 0, :half].numpy(), golden[..., 0])
    assert np.array_equal(sin[0, :, 0, half:].numpy(), golden[..., 1])
    assert np.array_equal(sin[0, :, 0, :half].numpy(), -golden[..., 1])  # signed for rotate()


def test_seam_attributes(codec) -> None:
    config = json.loads((FISH_DIR / "codec_config.json").read_text())
    assert codec.sample_rate == config["sample_rate"] == 44100
    assert codec.channels == 1
    assert codec.samples_per_frame == 2048 and codec.frame_rate == pytest.approx(44100 / 2048)
    assert codec.num_quantizers == 1 + config["quantizer"]["n_codebooks"]
    assert codec.codebook_size == config["quantizer"]["semantic_codebook_size"]


def test_config_from_file_and_published_defaults() -> None:
    config = FishDacConfig.from_dict(json.loads((FISH_DIR / "codec_config.json").read_text()), "codec_config.json")
    assert (config.latent_dim, config.decoder_dim, config.encoder_transformer_layers) == (64, 64, (0, 0, 0, 1))
    assert (config.post_module.n_layer, config.post_module.n_head, config.post_module.head_dim) == (2, 2, 32)
    assert (config.post_module.intermediate_size, config.post_module.window) == (192, 16)
    published = FishDacConfig()  # README 8: the real S2 Pro codec, used when codec_config.json is absent
    assert (published.latent_dim, published.decoder_dim, published.hop_length, published.frame_length) == (1024, 1536, 512, 2048)
    assert (published.num_quantizers, published.codebook_size, published.semantic_codebook_size) == (10, 1024, 4096)
    assert (published.post_module.n_layer, published.post_module.window, published.encoder_window) == (8, 128, 512)


def test_bad_config_is_a_clear_error() -> None:
    config = json.loads((FISH_DIR / "codec_config.json").read_text())
    config["quantizer"]["post_module"]["config"]["dim"] = 32
    with pytest.raises(CheckpointError, match="input_dim != dim"):
        FishDacConfig.from_dict(config, "codec_config.json")
    config["quantizer"]["post_module"]["input_dim"] = 32
    with pytest.raises(CheckpointError, match="post_module dim 32 != latent dim 64"):
        FishDacConfig.from_dict(config, "codec_config.json")
    config = json.loads((FISH_DIR / "codec_config.json").read_text())
    config["encoder_transformer_layers"] = [1, 0, 0, 0]  # block 0 is 8 wide: no 64-wide head fits
    with pytest.raises(CheckpointError, match="encoder block 0 width 8 is not a multiple of head_dim 64"):
        FishDacConfig.from_dict(config, "codec_config.json")
    with pytest.raises(CheckpointError, match="malformed"):
        FishDacConfig.from_dict({"encoder_rates": "fast"}, "codec_config.json")


@pytest.mark.parametrize("codes, message", [
    (torch.zeros(10, 3), "integers"),
    (torch.full((10, 3), -1), "0..4095"),
    (torch.full((10, 3), 4096), "0..4095"),
    (torch.zeros(11, 3, dtype=torch.long), "codebooks"),
    (torch.zeros(10, 0, dtype=torch.long), "frames >= 1"),
    (torch.zeros(10, dtype=torch.long), "n_quantizers, frames"),
])
def test_bad_codes(codec, codes, message) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        codec.decode(codes)


@pytest.mark.parametrize("wave, message", [
    (torch.zeros(2, 100), "mono"),
    (torch.zeros(0), "empty"),
    (torch.zeros(100, dtype=torch.long), "floating-point"),
    (torch.tensor([0.1, float("nan"), 0.2]), r"invalid samples \(NaN or infinity\)"),
    (torch.tensor([0.1, float("-inf")]), r"invalid samples \(NaN or infinity\)"),
    (torch.tensor([1e39], dtype=torch.float64), r"invalid samples \(NaN or infinity\)"),  # inf in float32
    (torch.full((4096,), 1e38), "the codec's encoder overflowed on this audio"),  # finite, but far past [-1, 1]
])
def test_bad_audio(codec, wave, message) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        codec.encode(wave)


def test_bad_quantizer_count(codec) -> None:
    with pytest.raises(InvalidRequestError, match="n_quantizers must be in 1..10"):
        codec.decode(torch.zeros(10, 2, dtype=torch.long), n_quantizers=11)


def test_bf16_encode_on_cpu_is_within_bf16_rounding(wav) -> None:
    """torch's CPU bf16 conv1d returned garbage for the fixture encoder's kernel-16 stride-8 conv
    (every semantic code wrong); the codec convolves half precision on a CPU in float32. bf16
    layers drift ~1e-2 relative, which still flips a few near-tie codes."""
    codec = FishDac.from_pretrained(FISH_DIR, dtype=torch.bfloat16)
    latents = codec.encoder_out(wav)[0].float()
    golden = torch.from_numpy(ENCODE["encoder_out"])
    assert float((latents - golden).norm() / golden.norm()) < 0.05
    semantic = codec.encode(wav)[0].numpy()
    assert (semantic == ENCODE["codes"][0]).mean() >= 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_encode_and_decode_match_the_goldens(wav) -> None:
    """cuDNN runs float32 convolutions in TF32 by default, which missed the latents by 6e-3 (emulated
    on a CPU): the loader turns that off on CUDA."""
    codec = FishDac.from_pretrained(FISH_DIR, device="cuda")
    assert not torch.backends.cudnn.allow_tf32
    latents = codec.encoder_out(wav.cuda())[0].cpu().numpy()
    np.testing.assert_allclose(latents, ENCODE["encoder_out"], rtol=0, atol=LATENT_ATOL)
    codes = codec.encode(wav.cuda()).cpu().numpy()
    robust = ENCODE["vq_margin"].min(axis=0) >= 1e-4
    assert np.array_equal(codes[:, robust], ENCODE["codes"][:, robust])
    wave = codec.decode(torch.from_numpy(DECODE["plain__codes"]).cuda())
    np.testing.assert_allclose(wave[0].cpu().numpy(), DECODE["plain__wav"], rtol=0, atol=WAVE_ATOL)
