"""The codec runner's rounds with a stand-in codec: which chunks a round decodes, and what a drop
from another thread or a failing decode call does to the streams of the others."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from mossserve.engine.codec_runner import CodecRunner
from mossserve.engine.pipeline import CodecWork
from mossserve.engine.request import EngineRequest
from mossserve.models.family import Prompt
from mossserve.sampling import SamplingParams

CODEBOOKS, SAMPLES_PER_FRAME = 4, 2


@dataclass
class Decoder:
    """Streams as a set; each decode call recorded; `during` runs inside a call (another thread's work)."""

    n_quantizers: int = CODEBOOKS
    max_streams: int = 8
    max_chunk_frames: int = 16
    samples_per_frame: int = SAMPLES_PER_FRAME
    open_ids: set = field(default_factory=set)
    calls: list = field(default_factory=list)
    fail_at: int | None = None  # quantizer count whose calls raise
    during: object = None
    busy: bool = False
    _next: int = 0

    def open(self) -> int:
        self._next += 1
        self.open_ids.add(self._next)
        return self._next

    def close(self, stream_id: int) -> None:
        assert not self.busy, "a stream closed while a decode call runs"
        self.open_ids.remove(stream_id)

    def decode(self, ids: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        assert set(ids) <= self.open_ids
        self.calls.append((self.n_quantizers, list(ids)))
        if self.during is not None:
            self.busy = True
            try:
                self.during()
            finally:
                self.busy = False
        if self.n_quantizers == self.fail_at:
            raise RuntimeError("bad chunk")
        return [torch.ones(1, c.shape[1] * SAMPLES_PER_FRAME) for c in chunks]


@dataclass
class Codec:
    decoder: Decoder
    sample_rate: int = 24000
    device: str = "cpu"

    def streaming_decoder(self, max_streams: int, max_chunk_frames: int, n_quantizers: int) -> Decoder:
        return self.decoder


class Ends:
    def __init__(self) -> None:
        self.chunks, self.finals, self.errors = [], [], []

    def sink(self, chunk) -> None:
        self.chunks.append(chunk)


def request(name: str, ends: Ends) -> EngineRequest:
    prompt = Prompt(rows=np.zeros((1, 1 + CODEBOOKS), dtype=np.int64), start_length=0)
    return EngineRequest(id=name, prompt=prompt, sampling=SamplingParams.greedy(), sink=ends.sink, max_new_frames=8)


def runner(decoder: Decoder, ends: Ends) -> CodecRunner:
    return CodecRunner(lambda: Codec(decoder), 8, 16, CODEBOOKS, ends.finals.append,
                       lambda r, message: ends.errors.append((r.id, message)))


def work(r: EngineRequest, codebooks: int = CODEBOOKS, frames: int = 2, final: bool = True) -> CodecWork:
    return CodecWork(r, segment=0, codes=np.zeros((frames, codebooks), dtype=np.int64), frame_start=0, trim=0,
                     final=final)


def test_a_drop_during_the_decode_closes_the_stream_after_the_round() -> None:
    """Closing a stream while a decode call reads the decoder's slots could hand them to another
    stream: a drop from another thread during the round closes it when the round ends."""
    ends, decoder = Ends(), Decoder()
    codec = runner(decoder, ends)
    kept, dropped = request("kept", ends), request("dropped", ends)
    codec.submit(work(kept))
    codec.submit(work(dropped))
    decoder.during = lambda: codec.drop(dropped)
    assert codec.run_once()
    assert decoder.calls == [(CODEBOOKS, [1, 2])]
    assert [c.request_id for c in ends.chunks] == ["kept"] and ends.finals == [kept]
    assert decoder.open_ids == {1} and codec.open_streams == 1  # kept's stream stays for its next chunk


def test_a_failing_call_retries_only_its_own_chunks() -> None:
    """A round of two codebook counts (a request at reduced depth) makes two calls; when the second
    fails, its chunks are retried one at a time and the first call's chunks are not decoded again
    (that would advance their streams twice)."""
    ends, decoder = Ends(), Decoder(fail_at=2)
    codec = runner(decoder, ends)
    full, a, b = (request(name, ends) for name in ("full", "a", "b"))
    codec.submit(work(full))
    codec.submit(work(a, codebooks=2))
    codec.submit(work(b, codebooks=2))
    assert codec.run_once()
    assert decoder.calls == [(CODEBOOKS, [1]), (2, [2, 3]), (2, [2]), (2, [3])]
    assert [c.request_id for c in ends.chunks] == ["full"] and ends.finals == [full]
    assert sorted(name for name, _ in ends.errors) == ["a", "b"]
    assert all("codec decode failed: bad chunk" in message for _, message in ends.errors)


def test_an_interrupt_in_the_decode_ends_the_rounds_requests_and_goes_on() -> None:
    """Ctrl-C in a caller that steps the engine (threaded=False) landed in a decode call: the chunks
    the round took were lost and their streams stayed open, and once every stream was taken no
    audio request could run again."""
    ends, decoder = Ends(), Decoder()
    codec = runner(decoder, ends)
    kept, dropped = request("a", ends), request("b", ends)
    codec.submit(work(kept))
    codec.submit(work(dropped))

    def interrupt() -> None:
        codec.drop(dropped)  # another thread's drop during the round: closed when the round ends
        raise KeyboardInterrupt

    decoder.during = interrupt
    with pytest.raises(KeyboardInterrupt):
        codec.run_once()
    assert decoder.open_ids == set() and codec.open_streams == 0
    assert [name for name, _ in ends.errors] == ["a"] and "KeyboardInterrupt" in ends.errors[0][1]
    decoder.during = None
    later = request("c", ends)
    codec.submit(work(later))
    assert codec.run_once() and ends.finals == [later]


@pytest.mark.parametrize("where", ["codec", "decoder"])
def test_a_round_that_fails_outside_the_decode_fails_its_requests(where: str) -> None:
    """A codec that cannot load (or a bug in the round) must not swallow the chunks the round took:
    their requests end with the error, and the runner keeps serving."""
    ends, decoder = Ends(), Decoder()
    if where == "codec":
        def get_codec():
            raise OSError("codec checkpoint not found")
        codec = CodecRunner(get_codec, 8, 16, CODEBOOKS, ends.finals.append,
                            lambda r, message: ends.errors.append((r.id, message)))
    else:
        codec = runner(decoder, ends)
        decoder.open = lambda: (_ for _ in ()).throw(RuntimeError("out of streams"))
    first, second = request("first", ends), request("second", ends)
    codec.submit(work(first, final=False))
    codec.submit(work(first))
    codec.submit(work(second))
    assert codec.run_once()
    assert sorted(name for name, _ in ends.errors) == ["first", "second"]
    assert all(message.startswith("codec stage failed: ") for _, message in ends.errors)
    assert codec.queued == 0 and codec.open_streams == 0 and not codec.run_once()



@pytest.mark.parametrize("fault", ["transient", "sticky"])
def test_a_call_that_fails_on_a_full_pool_is_retried_exactly(codec_models, monkeypatch, fault: str) -> None:
    """With every stream in the call the real codec decodes in place, stage by stage: a fault in its
    last stage left the earlier stages advanced, and the one-chunk retry then failed every request
    (or decoded a chunk twice). Transient (the call fails once): both requests' audio equals their
    decode. Sticky (b's middle chunk fails whenever decoded): b alone fails, a's audio is right."""
    from mossserve.models.codecs.moss_transformer import Patch

    m = codec_models["tiny_ctx"]  # windows of 3..30 tokens: the 14-frame streams wrap their rings
    last = max(i for i, s in enumerate(m.decoder) if not isinstance(s, Patch))
    tokens = int(np.prod([s.patch_size for s in m.decoder[:last] if isinstance(s, Patch)]))
    step, armed = m.decoder[last].step, {"calls": 0}

    def faulty(h, state, lengths, ring=False):
        if armed["calls"] > 0 and (fault == "transient" or int(lengths.max()) == 8 * tokens):
            armed["calls"] -= fault == "transient"
            raise RuntimeError("injected fault")
        return step(h, state, lengths, ring)

    monkeypatch.setattr(m.decoder[last], "step", faulty)
    ends = Ends()
    codec = CodecRunner(lambda: m, 2, 8, m.num_quantizers, ends.finals.append,
                        lambda r, message: ends.errors.append((r.id, message)))
    gen = torch.Generator().manual_seed(0)
    codes = {"a": torch.randint(0, 1024, (32, 14), generator=gen), "b": torch.randint(0, 1024, (32, 14), generator=gen)}
    for name, sizes in (("a", (5, 3, 6)), ("b", (2, 8, 4))):
        r, start = request(name, ends), 0
        for n, size in enumerate(sizes):
            chunk = codes[name][:, start: start + size].T.numpy()
            codec.submit(CodecWork(r, segment=0, codes=chunk, frame_start=start, trim=0, final=n == 2))
            start += size
    for round_ in range(3):  # the fault is armed in the second round
        armed["calls"] = int(round_ == 1)
        codec.run_once()
    failed = ["b"] if fault == "sticky" else []
    assert [name for name, _ in ends.errors] == failed
    assert all("injected fault" in message for _, message in ends.errors)
    for name in sorted(set(codes) - set(failed)):
        audio = np.concatenate([c.audio for c in ends.chunks if c.request_id == name], axis=-1)
        expected = m.decode(codes[name]).numpy()
        assert audio.shape == expected.shape and np.abs(audio - expected).max() <= 1e-3, name
