"""Offline parity of the MOSS-Audio-Tokenizer with the reference goldens (fixture README 3-4).

Tolerances (README 3): codes and lengths exact; waveforms max abs diff <= 1e-3 up to the valid
length; intermediates assert_close(rtol=1e-4, atol=1e-4). Goldens come from the fixtures only.
Every tensor of goldens.safetensors must be checked by some test here or in
test_codec_streaming.py (test_every_golden_is_covered).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mossserve.errors import InvalidRequestError


FIXTURES = Path(__file__).parent / "fixtures" / "moss_audio_tokenizer"
WAVE_TOL = 1e-3
VARIANTS = ("tiny", "tiny_ctx")

# Golden names and where they are checked; "input" = an input of some other check.
COVERAGE = {
    r"clip/\w+": "input",
    r"encode/\w+/(audio_codes|audio_codes_lengths|audio_codes_nq8|encoder_hidden_states)": "test_encode",
    r"encode/\w+/lfq_gap": "input",
    r"decode/\w+/k\d+/(audio|audio_lengths)": "test_decode",
    r"decode/\w+/k32_padded_codes/audio": "test_decode_padded_codes",
    r"random/(codes|padding_mask)": "input",
    r"random/row0/k\d+/audio": "test_random_codes",
    r"random/batch/(audio|audio_lengths)": "test_random_codes_padding_mask",
    r"batch/encode/\w+": "test_batch_encode",
    r"batch/decode(_nq8_mixed)?/\w+": "test_batch_decode",
    r"inter/.+": "test_intermediates_*",
    r"stream/c\w+/\w+/(encode|decode)/\w+": "test_codec_streaming.py::test_chunked_*",
    r"cb/call\d+/(codes|codes_lengths)": "input",
    r"cb/call\d+/(audio|audio_lengths)": "test_codec_streaming.py::test_continuous_batching_goldens",
}


def golden_names(variant: str, pattern: str) -> list[str]:
    tensors = json.loads((FIXTURES / variant / "goldens.json").read_text())["tensors"]
    return sorted(n for n in tensors if re.fullmatch(pattern, n))




def assert_wave(ours: torch.Tensor, golden: torch.Tensor, length: int | None = None) -> None:
    n = golden.shape[-1] if length is None else length
    assert ours.shape[-1] >= n
    err = (ours[..., :n].float() - golden[..., :n]).abs().max().item()
    assert err <= WAVE_TOL, f"max abs diff {err:.3g} > {WAVE_TOL}"


def clips(variant: str) -> list[str]:
    return [n.split("/")[1] for n in golden_names(variant, r"clip/\w+")]


CASES = [(v, c) for v in VARIANTS for c in clips(v)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_golden_is_covered(variant):
    names = json.loads((FIXTURES / variant / "goldens.json").read_text())["tensors"]
    uncovered = [n for n in names if not any(re.fullmatch(p, n) for p in COVERAGE)]
    assert not uncovered, f"goldens no test checks: {uncovered}"


@pytest.mark.parametrize("variant,clip", CASES)
def test_encode(codec_models, codec_goldens, variant, clip):
    m, g = codec_models[variant], codec_goldens[variant]
    x = g[f"clip/{clip}"]
    out = m.encode_batch([x])
    assert torch.equal(out.codes, g[f"encode/{clip}/audio_codes"])  # incl. the padded frame's codes
    assert torch.equal(out.lengths.cpu(), g[f"encode/{clip}/audio_codes_lengths"])
    torch.testing.assert_close(out.hidden, g[f"encode/{clip}/encoder_hidden_states"], rtol=1e-4, atol=1e-4)
    assert torch.equal(m.encode_batch([x], n_quantizers=8).codes, g[f"encode/{clip}/audio_codes_nq8"])
    n = int(out.lengths[0])
    assert torch.equal(m.encode(x), g[f"encode/{clip}/audio_codes"][:, 0, :n])  # valid frames only
    assert torch.equal(m.encode(x[None], n_quantizers=8), g[f"encode/{clip}/audio_codes_nq8"][:, 0, :n])


@pytest.mark.parametrize("variant,clip", CASES)
def test_decode(codec_models, codec_goldens, variant, clip):
    m, g = codec_models[variant], codec_goldens[variant]
    codes = g[f"encode/{clip}/audio_codes"][:, 0]
    n = int(g[f"encode/{clip}/audio_codes_lengths"][0])
    names = golden_names(variant, rf"decode/{clip}/k\d+/audio")
    assert names
    for name in names:
        k = int(name.split("/")[2][1:])
        golden = g[name][0]
        assert_wave(m.decode(codes[:k, :n]), golden)
        assert_wave(m.decode(codes[:, :n], n_quantizers=k), golden)
        out = m.decode_padded(codes[:k, None, :n])
        assert torch.equal(out.lengths.cpu(), g[f"decode/{clip}/k{k}/audio_lengths"])


@pytest.mark.parametrize("variant,name", [(v, n) for v in VARIANTS
                                          for n in golden_names(v, r"decode/\w+/k32_padded_codes/audio")])
def test_decode_padded_codes(codec_models, codec_goldens, variant, name):
    """Clips with a partial last frame, decoded with the padded frame's codes (README 4b)."""
    m, g = codec_models[variant], codec_goldens[variant]
    clip = name.split("/")[1]
    assert_wave(m.decode(g[f"encode/{clip}/audio_codes"][:, 0]), g[name][0])


def test_random_codes(codec_models, codec_goldens):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    codes = g["random/codes"]
    frames = g["random/padding_mask"].sum(-1)
    for name in golden_names("tiny", r"random/row0/k\d+/audio"):
        k = int(name.split("/")[2][1:])
        assert_wave(m.decode(codes[:k, 0, : int(frames[0])]), g[name][0])


def test_random_codes_padding_mask(codec_models, codec_goldens):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    out = m.decode_padded(g["random/codes"], g["random/padding_mask"].sum(-1))
    assert torch.equal(out.lengths.cpu(), g["random/batch/audio_lengths"])
    for b, n in enumerate(g["random/batch/audio_lengths"].tolist()):
        assert_wave(out.audio[b], g["random/batch/audio"][b], n)


def test_batch_encode(codec_models, codec_goldens):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    order = json.loads((FIXTURES / "tiny" / "goldens.json").read_text())["batch"]["order"]
    out = m.encode_batch([g[f"clip/{c}"] for c in order])
    assert torch.equal(out.codes, g["batch/encode/audio_codes"])
    assert torch.equal(out.lengths.cpu(), g["batch/encode/audio_codes_lengths"])
    torch.testing.assert_close(out.hidden, g["batch/encode/encoder_hidden_states"], rtol=1e-4, atol=1e-4)
    # The same through encode_padded with explicit lengths (the reference's padding_mask).
    longest = max(g[f"clip/{c}"].shape[0] for c in order)
    x = torch.zeros(len(order), 1, longest)
    for i, c in enumerate(order):
        x[i, 0, : g[f"clip/{c}"].shape[0]] = g[f"clip/{c}"]
    lengths = torch.tensor([g[f"clip/{c}"].shape[0] for c in order])
    assert torch.equal(m.encode_padded(x, lengths).codes, g["batch/encode/audio_codes"])


def test_batch_decode(codec_models, codec_goldens):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    order = json.loads((FIXTURES / "tiny" / "goldens.json").read_text())["batch"]["order"]
    valid = [g[f"encode/{c}/audio_codes"][:, 0, : int(g[f"encode/{c}/audio_codes_lengths"][0])] for c in order]
    for name, codes_list, k in [
        ("batch/decode", valid, None),
        ("batch/decode_nq8_mixed", [valid[0], valid[1][:16], valid[2][:8]], 8),
    ]:
        out = m.decode_batch(codes_list, n_quantizers=k)
        assert torch.equal(out.lengths.cpu(), g[f"{name}/audio_lengths"])
        for b, n in enumerate(g[f"{name}/audio_lengths"].tolist()):
            assert_wave(out.audio[b], g[f"{name}/audio"][b], n)
    with pytest.raises(ValueError, match="different quantizer counts"):
        m.decode_batch([valid[0], valid[1][:16]])
    with pytest.raises(ValueError):
        m.decode_batch([valid[0], valid[1][:4]], n_quantizers=8)


@pytest.mark.parametrize("change, n_quantizers, message", [
    (lambda c: [c.float() + 0.7], None, "must be an integer tensor"),  # decode refuses these; the batch truncated them
    (lambda c: [c[0]], None, "must be an integer tensor"),  # 1-D read the frame count as a quantizer count
    (lambda c: [c], -1, r"n_quantizers must be in 1\.\.32, got -1"),  # torch's "Dimension size must be non-negative"
    (lambda c: [c, c[:16], c[:8]], 0, "different quantizer counts"),  # 0 is "all": took a set's arbitrary element
])
def test_batch_decode_checks_as_decode_does(codec_models, codec_goldens, change, n_quantizers, message):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    codes = g["encode/zh/audio_codes"][:, 0, :20]
    with pytest.raises(InvalidRequestError, match=message):
        m.decode_batch(change(codes), n_quantizers=n_quantizers)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_nan_and_infinite_audio(codec_models, bad):
    """Every encode entry point: the encoder would turn such samples into codes without complaint."""
    m = codec_models["tiny"]
    wave = torch.zeros(1, 2000)
    wave[0, 1234] = bad
    for encode in (lambda: m.encode(wave), lambda: m.encode(wave, chunk_duration=m.config.context_duration),
                   lambda: m.encode_batch([torch.zeros(1, 500), wave])):
        with pytest.raises(InvalidRequestError, match=r"audio contains invalid samples \(NaN or infinity\)"):
            encode()


def test_encode_refuses_audio_that_overflows_the_encoder(codec_models):
    """Finite samples of 1e20 (a damaged float file) overflowed the encoder to NaN, which quantized
    to codes of 0 without complaint."""
    m = codec_models["tiny"]
    wave = torch.full((1, 2000), 1e20)
    for encode in (lambda: m.encode(wave), lambda: m.encode(wave, chunk_duration=m.config.context_duration),
                   lambda: m.encode_batch([torch.zeros(1, 500), wave])):
        with pytest.raises(InvalidRequestError, match="the codec's encoder overflowed on this audio"):
            encode()


# --------------------------------------------------------------------- intermediates (README 4g)


def _hooks(store: dict, points: dict) -> list:
    """points: golden name -> (module, how): "out" (its output), "in" (its input), "q" / "k" (from
    the RoPE output (B, T, 2, H, D), as (B, H, T, D)), "pair" (stage output and lengths)."""
    handles = []
    for name, (module, how) in points.items():
        if how == "in":
            handles.append(module.register_forward_pre_hook(lambda mod, args, n=name: store.__setitem__(n, args[0])))
        elif how == "pair":
            handles.append(module.register_forward_hook(
                lambda mod, args, out, n=name: store.update({f"{n}_out": out[0], f"{n}_lengths": out[1]})))
        else:
            pick = {"out": lambda out: out, "q": lambda out: out[:, :, 0].transpose(1, 2),
                    "k": lambda out: out[:, :, 1].transpose(1, 2)}[how]
            handles.append(module.register_forward_hook(
                lambda mod, args, out, n=name, pick=pick: store.__setitem__(n, pick(out))))
    return handles


def _check(store: dict, g: dict, prefix: str) -> None:
    expected = golden_names("tiny", rf"inter/{prefix}.*")
    missing = [n for n in expected if n.removeprefix("inter/") not in store]
    assert not missing, missing
    for n in expected:
        ours, golden = store[n.removeprefix("inter/")], g[n]
        if golden.dtype == torch.int64:
            assert torch.equal(ours.cpu(), golden), n
        else:
            torch.testing.assert_close(ours.float(), golden, rtol=1e-4, atol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


def _layer_points(prefix: str, layer, names: list[str]) -> dict:
    attn = layer.self_attn
    table = {
        "norm1_out": (layer.norm1, "out"), "qkv_proj": (attn.in_proj, "out"), "q_rope": (attn.rope, "q"),
        "k_rope": (attn.rope, "k"), "attn_heads_merged": (attn.out_proj, "in"), "self_attn_out": (attn.out_proj, "out"),
        "layer_scale_1_out": (layer.layer_scale_1, "out"), "norm2_out": (layer.norm2, "out"),
        "linear1_out": (layer.linear1, "out"), "gelu_out": (layer.linear2, "in"), "linear2_out": (layer.linear2, "out"),
        "layer_out": (layer, "out"),
    }
    return {f"{prefix}/l0/{n}": table[n] for n in names}


def test_intermediates_encode(codec_models, codec_goldens):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    stage = m.encoder[1]
    layer_names = [n.split("/")[-1] for n in golden_names("tiny", r"inter/enc1/l0/\w+")]
    points = {f"enc/m{i}": (mod, "pair") for i, mod in enumerate(m.encoder)}
    points |= {"enc1/input_proj_out": (stage.input_proj, "out"), "enc1/transformer_out": (stage.transformer, "out"),
               "q/input_proj_out": (m.quantizer.input_proj, "out")}
    points |= _layer_points("enc1", stage.transformer.layers[0], layer_names)
    store: dict = {}
    handles = _hooks(store, points)
    try:
        out = m.encode_batch([g["clip/zh"]])
    finally:
        for h in handles:
            h.remove()
    # Quantizer stages, through the quantizer's own stage functions (spec 5.5).
    q = m.quantizer
    residual = store["q/input_proj_out"]
    mask = (torch.arange(residual.shape[2]) < out.lengths[:, None])[:, None, :]
    total = torch.zeros_like(residual)
    for i in range(q.spec.num_quantizers):
        store[f"q/q{i:02d}/masked_residual_in"] = residual * mask
        store[f"q/q{i:02d}/z_e"] = z_e = q.stage_in(i, residual * mask)
        idx = q.nearest(i, z_e)
        assert torch.equal(idx, out.codes[i])
        store[f"q/q{i:02d}/z_q"] = z_q = q.stage_out(i, idx)
        residual, total = residual - z_q * mask, total + z_q * mask
    store["q/sum_before_output_proj"] = total
    store["q/output_proj_out"] = q.output_proj(total)
    _check(store, g, "enc")
    _check(store, g, "q/")


def test_intermediates_decode(codec_models, codec_goldens):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    stage = m.decoder[0]
    codes = g["encode/zh/audio_codes"][:, :, : int(g["encode/zh/audio_codes_lengths"][0])]
    layer_names = [n.split("/")[-1] for n in golden_names("tiny", r"inter/dec0/l0/\w+")]
    points = {f"dec/m{i}": (mod, "pair") for i, mod in enumerate(m.decoder)}
    points |= {"dec0/input_proj_out": (stage.input_proj, "out"),
               "dq/sum_before_output_proj": (m.quantizer.output_proj, "in"),
               "dq/output_proj_out": (m.quantizer.output_proj, "out")}
    points |= _layer_points("dec0", stage.transformer.layers[0], layer_names)
    store: dict = {}
    handles = _hooks(store, points)
    try:
        m.decode_padded(codes)
    finally:
        for h in handles:
            h.remove()
    for i in range(codes.shape[0]):
        store[f"dq/q{i:02d}/out_proj_out"] = m.quantizer.stage_out(i, codes[i])
    _check(store, g, "dq/")
    _check(store, g, "dec")
