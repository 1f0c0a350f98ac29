"""Streaming decode/encode of the MOSS-Audio-Tokenizer.

* the reference's chunked streaming (`chunk_duration`, README 4d / 5.7) against its codec_goldens,
  including tiny_ctx, where the ring buffer makes streaming differ from offline by design;
* the continuous-batching call sequences (README 4f / 5.9) through the multi-stream decoder;
* the multi-stream decoder's own contract (exact window): streams join and leave at random, chunk
  sizes differ within and across calls, streams idle for several calls and outrun the attention
  window, and each stream's output still equals its offline decode; idle streams are untouched;
  state per stream does not grow with length.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from mossserve.errors import InvalidRequestError
from mossserve.models.codecs import MossAudioTokenizer
from mossserve.models.codecs.moss_transformer import Patch

FIXTURES = Path(__file__).parent / "fixtures" / "moss_audio_tokenizer"
WAVE_TOL = 1e-3
VARIANTS = ("tiny", "tiny_ctx")




def manifest(variant: str) -> dict:
    return json.loads((FIXTURES / variant / "goldens.json").read_text())


def max_err(ours: torch.Tensor, golden: torch.Tensor) -> float:
    assert ours.shape[-1] == golden.shape[-1], (ours.shape, golden.shape)
    return (ours.float() - golden).abs().max().item()


STREAM_CASES = [
    (v, m[1], m[2])
    for v in VARIANTS
    for n in manifest(v)["tensors"]
    if (m := re.fullmatch(r"stream/c(\w+)/(\w+)/decode/audio", n))
]


@pytest.mark.parametrize("variant,chunk,clip", STREAM_CASES)
def test_chunked_encode(codec_models, codec_goldens, variant, chunk, clip):
    m, g, p = codec_models[variant], codec_goldens[variant], f"stream/c{chunk}/{clip}/encode"
    out = m.encode_chunked(g[f"clip/{clip}"], float(chunk.replace("p", ".")))
    assert torch.equal(out.codes, g[f"{p}/audio_codes"])
    assert torch.equal(out.lengths.cpu(), g[f"{p}/audio_codes_lengths"])
    torch.testing.assert_close(out.hidden, g[f"{p}/encoder_hidden_states"], rtol=1e-4, atol=1e-4)
    if chunk == "0p24":  # the one-clip API is the same call, valid frames only
        assert torch.equal(m.encode(g[f"clip/{clip}"], chunk_duration=0.24), g[f"{p}/audio_codes"][:, 0])


@pytest.mark.parametrize("variant,chunk,clip", STREAM_CASES)
def test_chunked_decode(codec_models, codec_goldens, variant, chunk, clip):
    m, g = codec_models[variant], codec_goldens[variant]
    n = int(g[f"encode/{clip}/audio_codes_lengths"][0])
    audio = m.decode(g[f"encode/{clip}/audio_codes"][:, 0, :n], chunk_duration=float(chunk.replace("p", ".")))
    assert max_err(audio, g[f"stream/c{chunk}/{clip}/decode/audio"][0]) <= WAVE_TOL


def test_chunk_duration_rules(codec_models):
    m = codec_models["tiny_ctx"]
    codes = torch.zeros(32, 10, dtype=torch.long)
    for bad in (0.0, -0.08, 0.1, 0.4):  # not > 0, not whole frames, longer than the 0.3 s window
        with pytest.raises(InvalidRequestError):
            m.decode(codes, chunk_duration=bad)


def _run_cb(m: MossAudioTokenizer, g: dict, calls: list[dict], window: str) -> float:
    """Drive the reference call sequence: new rows open streams, finalized rows close them."""
    decoder, ids, worst = None, {}, 0.0
    for call in calls:
        kw, n = call["kwargs"], call["call"]
        if kw.get("reset_stream"):
            decoder, ids = m.streaming_decoder(kw["max_batch_size"], 3, window=window), {}
        for row in call["new_rows_tail_appended"]:
            ids[row] = decoder.open()
        codes, lengths = g[f"cb/call{n}/codes"], g[f"cb/call{n}/codes_lengths"].tolist()
        rows = call["logical_rows"]
        outs = decoder.decode([ids[r] for r in rows], [codes[:, b, : lengths[b]] for b in range(len(rows))])
        assert g[f"cb/call{n}/audio_lengths"].tolist() == [o.shape[-1] for o in outs]
        for b, out in enumerate(outs):
            worst = max(worst, max_err(out, g[f"cb/call{n}/audio"][b, :, : out.shape[-1]]))
        for row in call["finalized_rows"]:
            decoder.close(ids.pop(row))
        assert decoder.num_open == len(ids)
    return worst


@pytest.mark.parametrize("variant,window", [("tiny", "exact"), ("tiny", "ring"), ("tiny_ctx", "ring")])
def test_continuous_batching_goldens(codec_models, codec_goldens, variant, window):
    # tiny never outruns its 10 s window (both windows agree); tiny_ctx pins the ring buffer.
    assert _run_cb(codec_models[variant], codec_goldens[variant], manifest(variant)["cb"]["calls"], window) <= WAVE_TOL


def test_ring_window_is_the_reference_chunking(codec_models, codec_goldens):
    """One stream, window='ring', chunks of 2 frames = the reference's chunk_duration=0.16 decode;
    the exact window instead equals the offline decode (they differ on tiny_ctx by design)."""
    m, g = codec_models["tiny_ctx"], codec_goldens["tiny_ctx"]
    codes = g["encode/en/audio_codes"][:, 0]
    outs = {}
    for window in ("ring", "exact"):
        decoder = m.streaming_decoder(1, 2, window=window)
        sid = decoder.open()
        outs[window] = torch.cat([decoder.decode([sid], [codes[:, s: s + 2]])[0] for s in range(0, 32, 2)], -1)
    assert max_err(outs["ring"], g["stream/c0p16/en/decode/audio"][0]) <= WAVE_TOL
    assert max_err(outs["exact"], g["decode/en/k32/audio"][0]) <= WAVE_TOL
    assert max_err(outs["ring"], outs["exact"]) > 0.1


def _pool_rows(decoder, slot: int) -> list[torch.Tensor]:
    return [t[slot].clone() for s in decoder._pool.values() for t in (s.offset, *s.keys, *s.values)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multistream_equals_offline(codec_models, seed):
    """tiny_ctx windows are 3..30 tokens (0.3 s); streams run up to 60 frames (4.8 s)."""
    m = codec_models["tiny_ctx"]
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    todo = [torch.randint(0, 1024, (32, rng.randint(1, 60)), generator=gen) for _ in range(9)]
    decoder = m.streaming_decoder(max_streams=4, max_chunk_frames=12)
    state_bytes = decoder.state_bytes()
    shapes = [t.shape for s in decoder._pool.values() for t in (s.offset, *s.keys, *s.values)]
    active: dict[int, list] = {}  # stream id -> [codes, frames done, outputs]
    worst, mixed_calls, idle_max = 0.0, 0, 0
    idle = {}
    while todo or active:
        while todo and decoder.num_open < decoder.max_streams and rng.random() < 0.6:
            active[decoder.open()] = [todo.pop(), 0, []]
        ids = [s for s in active if rng.random() < 0.6] or list(active)[:1]
        if not ids:
            continue
        chunks = [active[s][0][:, active[s][1]: active[s][1] + rng.randint(1, 12)] for s in ids]
        mixed_calls += len({c.shape[1] for c in chunks}) > 1
        untouched = {s: _pool_rows(decoder, decoder.streams.row(s)) for s in active if s not in ids}
        outs = decoder.decode(ids, chunks)
        for s, rows in untouched.items():  # streams not in the call keep their state bit for bit
            assert all(torch.equal(a, b) for a, b in zip(rows, _pool_rows(decoder, decoder.streams.row(s))))
            idle[s] = idle.get(s, 0) + 1
            idle_max = max(idle_max, idle[s])
        for s, chunk, out in zip(ids, chunks, outs):
            idle[s] = 0
            assert out.shape == (1, chunk.shape[1] * m.samples_per_frame)
            entry = active[s]
            entry[1] += chunk.shape[1]
            entry[2].append(out)
            if entry[1] == entry[0].shape[1]:
                worst = max(worst, max_err(torch.cat(entry[2], -1), m.decode(entry[0])))
                decoder.close(s)
                del active[s]
    assert worst <= WAVE_TOL, worst
    assert mixed_calls > 0 and idle_max >= 3  # the scenario really mixed chunk sizes and idled
    assert decoder.num_open == 0 and decoder.state_bytes() == state_bytes
    assert shapes == [t.shape for s in decoder._pool.values() for t in (s.offset, *s.keys, *s.values)]



@pytest.mark.parametrize("streams", [2, 3])  # every slot in the call (in place) / a gathered copy
def test_a_failed_call_leaves_the_streams_as_they_were(codec_models, monkeypatch, streams):
    """A call that raises in the last stage (earlier stages already ran), then again: the streams'
    outputs are bit for bit those of a decoder whose calls never failed, across ring wrap-arounds."""
    m = codec_models["tiny_ctx"]
    last = max(i for i, s in enumerate(m.decoder) if not isinstance(s, Patch))
    step, fail = m.decoder[last].step, {"now": False}

    def faulty(*args, **kwargs):
        if fail["now"]:
            fail["now"] = False
            raise RuntimeError("injected fault")
        return step(*args, **kwargs)

    monkeypatch.setattr(m.decoder[last], "step", faulty)
    gen = torch.Generator().manual_seed(4)
    codes = [torch.randint(0, 1024, (32, 40), generator=gen) for _ in range(2)]
    clean, faulted = (m.streaming_decoder(max_streams=streams, max_chunk_frames=6) for _ in range(2))
    ids = {d: [d.open(), d.open()] for d in (clean, faulted)}
    sizes = [(5, 2), (3, 6), (6, 1), (1, 4), (4, 4), (6, 6), (2, 3), (6, 6), (5, 5), (2, 3)]
    starts = [0, 0]
    for n, pair in enumerate(sizes):
        chunks = [c[:, s: s + t] for c, s, t in zip(codes, starts, pair)]
        if n % 2:
            fail["now"] = True
            with pytest.raises(RuntimeError, match="injected"):
                faulted.decode(ids[faulted], chunks)
        assert all(torch.equal(a, b) for a, b in zip(clean.decode(ids[clean], chunks),
                                                     faulted.decode(ids[faulted], chunks))), n
        starts = [s + t for s, t in zip(starts, pair)]
    assert min(starts) == 40


def test_state_does_not_grow_with_length(codec_models):
    m = codec_models["tiny_ctx"]
    decoder = m.streaming_decoder(max_streams=1, max_chunk_frames=4)
    sid = decoder.open()
    before = decoder.state_bytes()
    codes = torch.randint(0, 1024, (32, 400), generator=torch.Generator().manual_seed(3))
    for s in range(0, 400, 4):
        decoder.decode([sid], [codes[:, s: s + 4]])
    assert decoder.state_bytes() == before
    # Window + one chunk of keys per layer, whatever the stream's length (32 s here).
    for i, state in decoder._pool.items():
        ring = m.decoder[i].spec.context - 1 + 4 * _tokens_per_frame(m, i)
        assert all(t.shape[2] == ring for t in (*state.keys, *state.values))
        assert int(state.offset[decoder.streams.row(sid)]) == 400 * _tokens_per_frame(m, i)


def _tokens_per_frame(m: MossAudioTokenizer, stage: int) -> int:
    n = 1
    for s in m.decoder[:stage]:
        n *= getattr(s, "patch_size", 1)
    return n


def test_n_quantizers(codec_models, codec_goldens):
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    codes = g["encode/demo/audio_codes"][:, 0, :27]
    decoder = m.streaming_decoder(2, 12, n_quantizers=8)
    sid = decoder.open()
    out = torch.cat([decoder.decode([sid], [codes[:, s: s + 5]])[0] for s in range(0, 27, 5)], -1)
    assert max_err(out, g["decode/demo/k8/audio"][0]) <= WAVE_TOL


def test_unsigned_codes_stream_as_they_decode_offline(codec_models, codec_goldens):
    """uint16 codes (a compact .npy) decode offline; streamed, `codes < 0` raised NotImplementedError."""
    m, g = codec_models["tiny"], codec_goldens["tiny"]
    codes = g["encode/demo/audio_codes"][:, 0, :10]
    decoder = m.streaming_decoder(1, 12)
    [audio] = decoder.decode([decoder.open()], [codes.to(torch.uint16)])
    assert max_err(audio, m.decode(codes)) <= WAVE_TOL


def test_decoder_errors(codec_models):
    m = codec_models["tiny_ctx"]
    decoder = m.streaming_decoder(max_streams=2, max_chunk_frames=4)
    a, b = decoder.open(), decoder.open()
    with pytest.raises(InvalidRequestError, match="in use"):
        decoder.open()
    codes = torch.zeros(32, 2, dtype=torch.long)
    for ids, chunks in [
        ([a, a], [codes, codes]),  # a stream twice in one call
        ([a], [torch.zeros(32, 5, dtype=torch.long)]),  # longer than max_chunk_frames
        ([a], [torch.zeros(8, 2, dtype=torch.long)]),  # too few quantizers
        ([a], [torch.full((32, 2), 1024)]),  # out of the codebook
        ([a, b], [codes]),
    ]:
        with pytest.raises(InvalidRequestError):
            decoder.decode(ids, chunks)
    decoder.close(a)
    with pytest.raises(InvalidRequestError, match="not open"):
        decoder.decode([a], [codes])
    c = decoder.open()
    assert c not in (a, b)  # ids are never reused
    with pytest.raises(InvalidRequestError, match="ring"):
        m.streaming_decoder(2, 4, window="ring")  # 4 frames do not fit the 3-token window


def test_bench_smoke():
    """run_codec_bench on the tiny fixture: batched and one-at-a-time streaming agree."""
    from mossserve.bench.codec import run_codec_bench

    report = run_codec_bench(streams=3, seconds=0.8, checkpoint=FIXTURES / "tiny_ctx", repeats=1)
    assert report["streams"] == 3 and report["audio_seconds_per_stream"] == 0.8
    assert report["batched_audio_s_per_s"] > 0 and report["sequential_audio_s_per_s"] > 0
    assert report["max_abs_diff_batched_vs_sequential"] <= WAVE_TOL
