"""The Fish codec's multi-stream streaming decoder (the engine's side of the codec seam): chunked
output equals the offline decode (fixtures/fish_s2_pro/README.md 8.4: every stage is causal),
streams join and leave at any call, batched equals one stream at a time."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mossserve.errors import InvalidRequestError
from mossserve.models.codecs.base import StreamingDecoder
from mossserve.models.codecs.fish_dac import FishDac

FISH_DIR = Path(__file__).parent / "fixtures" / "fish_s2_pro"
ENCODE = np.load(FISH_DIR / "codec_encode.npz")
DECODE = np.load(FISH_DIR / "codec_decode.npz")
WAVE_ATOL = 2e-5


@pytest.fixture(scope="module")
def codec() -> FishDac:
    return FishDac.from_pretrained(FISH_DIR)


def clips() -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Codes (n_q, F) and the reference's waveform of each golden clip: recorded speech (143
    frames, far past the post transformer's 16-frame window) and LM codes (clamped residuals)."""
    out = {"recording": (torch.from_numpy(ENCODE["codes"]), ENCODE["recon"])}
    for case in ("clone", "multi_speaker", "emotion", "plain"):
        out[case] = (torch.from_numpy(DECODE[f"{case}__codes"]), DECODE[f"{case}__wav"])
    return out


def stream_alone(codec: FishDac, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    decoder = codec.streaming_decoder(1, max(sizes))
    sid = decoder.open()
    pieces, start = [], 0
    for size in sizes:
        pieces.append(decoder.decode([sid], [codes[:, start: start + size]])[0])
        start += size
    return torch.cat(pieces, dim=-1)


def schedule(frames: int, first: int = 2, then: int = 12) -> list[int]:
    """The engine's chunk schedule: a small first chunk, then larger ones."""
    sizes = [min(first, frames)]
    while sum(sizes) < frames:
        sizes.append(min(then, frames - sum(sizes)))
    return sizes


def test_is_the_seams_streaming_decoder(codec) -> None:
    assert isinstance(codec.streaming_decoder(2, 4), StreamingDecoder)


@pytest.mark.parametrize("case", ["recording", "clone"])
def test_chunked_stream_equals_offline(codec, case) -> None:
    codes, golden = clips()[case]
    audio = stream_alone(codec, codes, schedule(codes.shape[1]))
    assert audio.shape == (1, 2048 * codes.shape[1])
    np.testing.assert_allclose(audio[0].numpy(), golden, rtol=0, atol=WAVE_ATOL)


def test_one_frame_at_a_time(codec) -> None:
    codes, golden = clips()["multi_speaker"]
    audio = stream_alone(codec, codes, [1] * codes.shape[1])
    np.testing.assert_allclose(audio[0].numpy(), golden, rtol=0, atol=WAVE_ATOL)


def test_streams_join_and_leave(codec) -> None:
    """Three slots, five clips: each call takes a seeded random subset of the open streams with
    random chunk sizes; a stream opens when a slot frees. Every stream's audio equals its
    reference waveform, and every chunk equals the same chunk decoded by a lone stream."""
    data = clips()
    gen = torch.Generator().manual_seed(9)
    decoder = codec.streaming_decoder(3, 7)
    waiting = list(data)
    open_: dict[str, tuple[int, int]] = {}  # name -> (stream id, frames done)
    chunks: dict[str, list[int]] = {name: [] for name in data}
    audio: dict[str, list[torch.Tensor]] = {name: [] for name in data}
    while waiting or open_:
        while waiting and decoder.num_open < decoder.max_streams:
            name = waiting.pop(0)
            open_[name] = (decoder.open(), 0)
        names = [n for n in open_ if torch.rand((), generator=gen) < 0.7] or [next(iter(open_))]
        ids, parts = [], []
        for name in names:
            sid, done = open_[name]
            size = min(int(torch.randint(1, 8, (), generator=gen)), data[name][0].shape[1] - done)
            ids.append(sid)
            parts.append(data[name][0][:, done: done + size])
            chunks[name].append(size)
            open_[name] = (sid, done + size)
        for name, wave in zip(names, decoder.decode(ids, parts)):
            audio[name].append(wave)
            if open_[name][1] == data[name][0].shape[1]:
                decoder.close(open_.pop(name)[0])
    assert decoder.num_open == 0
    for name, (codes, golden) in data.items():
        streamed = torch.cat(audio[name], dim=-1)
        np.testing.assert_allclose(streamed[0].numpy(), golden, rtol=0, atol=WAVE_ATOL, err_msg=name)
        alone = stream_alone(codec, codes, chunks[name])
        np.testing.assert_allclose(streamed.numpy(), alone.numpy(), rtol=0, atol=1e-5, err_msg=name)


def test_reduced_quantizers(codec) -> None:
    """The engine's codec runner lowers `n_quantizers` for requests with fewer codebooks."""
    codes = clips()["clone"][0][:4]
    decoder = codec.streaming_decoder(2, 12, n_quantizers=4)
    sid = decoder.open()
    audio = torch.cat([decoder.decode([sid], [codes[:, s: s + 6]])[0] for s in range(0, codes.shape[1], 6)], dim=-1)
    np.testing.assert_allclose(audio.numpy(), codec.decode(codes).numpy(), rtol=0, atol=WAVE_ATOL)


def test_reopened_slot_starts_fresh_and_state_is_fixed(codec) -> None:
    codes, golden = clips()["emotion"]
    decoder = codec.streaming_decoder(1, 12)
    size = decoder.state_bytes()
    first = decoder.open()
    decoder.decode([first], [clips()["recording"][0][:, :12]])
    decoder.close(first)
    second = decoder.open()
    audio = decoder.decode([second], [codes])[0]
    np.testing.assert_allclose(audio[0].numpy(), golden, rtol=0, atol=WAVE_ATOL)
    assert decoder.state_bytes() == size


def test_bad_calls(codec) -> None:
    decoder = codec.streaming_decoder(1, 4)
    sid = decoder.open()
    codes = torch.zeros(10, 2, dtype=torch.long)
    with pytest.raises(InvalidRequestError, match="in use"):
        decoder.open()
    with pytest.raises(InvalidRequestError, match="not open"):
        decoder.decode([sid + 1], [codes])
    with pytest.raises(InvalidRequestError, match="once per call"):
        decoder.decode([sid, sid], [codes, codes])
    with pytest.raises(InvalidRequestError, match=r"1\.\.4"):
        decoder.decode([sid], [torch.zeros(10, 5, dtype=torch.long)])
    with pytest.raises(InvalidRequestError, match="0..4095"):
        decoder.decode([sid], [torch.full((10, 2), 5000)])
    decoder.close(sid)
    with pytest.raises(InvalidRequestError, match="not open"):
        decoder.close(sid)
