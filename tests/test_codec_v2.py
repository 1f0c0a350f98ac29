"""The v2 / Nano codec (fixture README 7): channel interleave, v2 config fields, rounded windows,
16 codebooks.

No v2 weights exist, so the tests use the equivalence that section 7 implies: a stereo v2 config
whose network is the `tiny` fixture's (patch product 1920 = 2 channels x downsample_rate 960,
stage rates from sampling_rate 12000 x 2) interleaves a stereo clip L0 R0 L1 R1 ... into the
`tiny` model's mono input. So the stereo clip (even samples, odd samples) of a golden clip must
encode to that clip's golden codes, and the golden audio must come back de-interleaved.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mossserve.errors import CheckpointError, InvalidRequestError
from mossserve.models.codecs import MossAudioTokenizer, MossAudioTokenizerConfig
from mossserve.models.codecs.moss_transformer import ProjectedTransformer

FIXTURES = Path(__file__).parent / "fixtures" / "moss_audio_tokenizer"
TINY = FIXTURES / "tiny"
WAVE_TOL = 1e-3



def v2_config(**changes) -> dict:
    config = json.loads((TINY / "config.json").read_text())
    config.update(sampling_rate=12000, downsample_rate=960, channels_numbers=2, enable_channel_interleave=True,
                  attention_backend="sdpa", codec_compute_dtype="fp32", codec_load_dtype="fp32")
    config.update(changes)
    return config


def write_checkpoint(directory: Path, config: dict, n_quantizers: int = 32) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(TINY / "model.safetensors")
    keep = {k: v for k, v in tensors.items()
            if not k.startswith("quantizer.quantizers.") or int(k.split(".")[2]) < n_quantizers}
    save_file(keep, directory / "model.safetensors")
    return directory


def stereo(x: torch.Tensor) -> torch.Tensor:
    """A mono stream read as interleaved stereo: (2, N/2)."""
    return torch.stack([x[0::2], x[1::2]])


@pytest.fixture(scope="module")
def goldens() -> dict[str, torch.Tensor]:
    return load_file(TINY / "goldens.safetensors")


@pytest.fixture(scope="module")
def stereo_codec(tmp_path_factory) -> MossAudioTokenizer:
    return MossAudioTokenizer.from_pretrained(write_checkpoint(tmp_path_factory.mktemp("v2"), v2_config()))


def test_config_fields_and_aliases():
    c = MossAudioTokenizerConfig.from_dict(v2_config(codec_compute_dtype="bf16", attention_backend="flash"))
    assert (c.number_channels, c.enable_channel_interleave, c.interleaved) == (2, True, True)
    assert (c.sampling_rate, c.downsample_rate, c.frame_rate) == (12000, 960, 12.5)
    assert c.compute_dtype == torch.bfloat16 and c.weight_dtype == torch.float32
    assert c.attention_implementation == "flash"
    c = MossAudioTokenizerConfig.from_dict(v2_config(number_channels=2, compute_dtype="fp16", codec_weight_dtype="bf16"))
    assert c.compute_dtype == torch.float16 and c.weight_dtype == torch.bfloat16
    # v2 defaults where the config is silent.
    d = v2_config()
    del d["sampling_rate"], d["downsample_rate"]
    with pytest.raises(CheckpointError, match="7680"):  # 48 kHz stereo needs patches multiplying to 2 x 3840
        MossAudioTokenizerConfig.from_dict(d)


def contexts(config: MossAudioTokenizerConfig) -> tuple[list[int], list[int]]:
    return ([s.context for s in config.encoder if hasattr(s, "context")],
            [s.context for s in config.decoder if hasattr(s, "context")])


def test_context_rounding_and_per_stage_duration():
    # 0.3 s at 100/50/25/12.5 Hz: v1 truncates (7.5 -> 7, 3.75 -> 3), v2 rounds (8, 4).
    v2 = v2_config(causal_transformer_context_duration=0.3)
    v2["decoder_kwargs"][0]["context_duration"] = 1.0  # 12.5 tokens: Python's round, as the reference -> 12
    assert contexts(MossAudioTokenizerConfig.from_dict(v2)) == ([30, 15, 8, 4], [12, 8, 15, 30])
    v1 = json.loads((FIXTURES / "tiny_ctx" / "config.json").read_text())
    assert contexts(MossAudioTokenizerConfig.from_dict(v1)) == ([30, 15, 7, 3], [3, 7, 15, 30])


def test_stereo_encode_decode_equals_interleaved_mono(stereo_codec, goldens):
    m, g = stereo_codec, goldens
    assert (m.channels, m.sample_rate, m.samples_per_frame) == (2, 12000, 960)
    for clip in ("zh", "en", "demo"):
        x, codes = stereo(g[f"clip/{clip}"]), g[f"encode/{clip}/audio_codes"]
        n = int(g[f"encode/{clip}/audio_codes_lengths"][0])
        out = m.encode_batch([x])
        assert torch.equal(out.codes, codes) and int(out.lengths[0]) == n
        assert torch.equal(m.encode(x), codes[:, 0, :n])
        audio = m.decode(codes[:, 0, :n])
        assert audio.shape == (2, n * 960) and audio.dtype == torch.float32
        assert (audio - stereo(g[f"decode/{clip}/k32/audio"][0, 0])).abs().max().item() <= WAVE_TOL


def test_stereo_batch(stereo_codec, goldens):
    m, g = stereo_codec, goldens
    order = ("zh", "en", "demo")
    out = m.encode_batch([stereo(g[f"clip/{c}"]) for c in order])
    assert torch.equal(out.codes, g["batch/encode/audio_codes"])
    assert torch.equal(out.lengths, g["batch/encode/audio_codes_lengths"])
    dec = m.decode_batch([g["batch/encode/audio_codes"][:, b, :n] for b, n in enumerate(out.lengths.tolist())])
    assert torch.equal(dec.lengths, g["batch/decode/audio_lengths"] // 2)
    for b, n in enumerate(dec.lengths.tolist()):
        want = stereo(g["batch/decode/audio"][b, 0, : 2 * n])
        assert (dec.audio[b, :, :n] - want).abs().max().item() <= WAVE_TOL


def test_stereo_input_shapes(stereo_codec):
    m = stereo_codec
    for bad in (torch.zeros(960), torch.zeros(1, 960), torch.zeros(3, 960), torch.zeros(2, 2, 960)):
        with pytest.raises(InvalidRequestError):
            m.encode(bad)
    with pytest.raises(InvalidRequestError):
        m.encode_batch([torch.zeros(2, 960), torch.zeros(960)])
    with pytest.raises(InvalidRequestError):
        m.encode_padded(torch.zeros(1, 1, 960))


@pytest.mark.parametrize("chunk", ["0p08", "0p24"])
def test_stereo_chunked_streaming(stereo_codec, goldens, chunk):
    """0.08 s is one 960-sample frame per channel: the tiny fixture's streaming goldens apply."""
    m, g, d = stereo_codec, goldens, float(chunk.replace("p", "."))
    out = m.encode_chunked(stereo(g["clip/zh"]), d)
    assert torch.equal(out.codes, g[f"stream/c{chunk}/zh/encode/audio_codes"])
    audio = m.decode(g["encode/zh/audio_codes"][:, 0, :31], chunk_duration=d)
    assert (audio - stereo(g[f"stream/c{chunk}/zh/decode/audio"][0, 0])).abs().max().item() <= WAVE_TOL


def test_stereo_multistream_equals_offline(tmp_path):
    """A stereo v2 codec with a 0.3 s window (8 / 4 / 30 tokens after rounding): streams outrun it."""
    m = MossAudioTokenizer.from_pretrained(
        write_checkpoint(tmp_path, v2_config(causal_transformer_context_duration=0.3)))
    assert [s.spec.context for s in m.decoder if isinstance(s, ProjectedTransformer)] == [4, 8, 15, 30]
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    streams = [torch.randint(0, 1024, (32, n), generator=gen) for n in (37, 5, 23, 50)]
    decoder = m.streaming_decoder(max_streams=4, max_chunk_frames=12)
    ids = [decoder.open() for _ in streams]
    done, outs = [0] * 4, [[] for _ in streams]
    while any(done[i] < s.shape[1] for i, s in enumerate(streams)):
        call = [i for i, s in enumerate(streams) if done[i] < s.shape[1] and rng.random() < 0.7]
        chunks = [streams[i][:, done[i]: done[i] + rng.randint(1, 12)] for i in call]
        for i, chunk, out in zip(call, chunks, decoder.decode([ids[i] for i in call], chunks)):
            assert out.shape == (2, chunk.shape[1] * 960)
            done[i] += chunk.shape[1]
            outs[i].append(out)
    for codes, out in zip(streams, outs):
        assert (torch.cat(out, -1) - m.decode(codes)).abs().max().item() <= WAVE_TOL


def test_sixteen_codebooks(tmp_path, goldens):
    """A Nano-like stereo config with 16 codebooks: the first 16 stages of the tiny quantizer."""
    config = v2_config()
    config["quantizer_kwargs"]["num_quantizers"] = 16
    m = MossAudioTokenizer.from_pretrained(write_checkpoint(tmp_path, config, n_quantizers=16))
    g = goldens
    assert m.num_quantizers == 16
    codes = m.encode(stereo(g["clip/en"]))
    assert torch.equal(codes, g["encode/en/audio_codes"][:16, 0])
    audio = m.decode(codes)
    assert (audio - stereo(g["decode/en/k16/audio"][0, 0])).abs().max().item() <= WAVE_TOL
    with pytest.raises(InvalidRequestError):
        m.decode(g["encode/en/audio_codes"][:, 0])  # 32 rows for a 16-codebook codec
    decoder = m.streaming_decoder(1, 8)
    sid = decoder.open()
    streamed = torch.cat([decoder.decode([sid], [codes[:, s: s + 8]])[0] for s in range(0, 32, 8)], -1)
    assert (streamed - audio).abs().max().item() <= WAVE_TOL
