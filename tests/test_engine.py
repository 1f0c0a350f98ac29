"""The engine: continuous batching against the reference goldens, seeds, aborts, limits, failures.

Most tests drive an unthreaded engine step by step, so that requests join, finish and are
aborted at exactly chosen steps; the stress test runs the threaded engine.
"""
from __future__ import annotations

import queue
import random

import numpy as np
import pytest
import torch

from conftest import CODEC_DIR, DELAY_DIR, fixed_shape_engine, load_delay_model
from delay_cases import generation_cases
from mossserve.config import ChunkSchedule, EngineConfig, RunawayGuard
from mossserve.engine.engine import Engine
from mossserve.errors import EngineFullError, InvalidRequestError
from mossserve.models.codecs import MossAudioTokenizer
from mossserve.models.family import Prompt
from mossserve.models.moss_delay_family import MossDelayFamily
from mossserve.sampling import SamplingParams

PAD_TEXT, PAD_CODE = 151643, 1024
_codec = {}


def codec() -> MossAudioTokenizer:
    if "tiny" not in _codec:
        _codec["tiny"] = MossAudioTokenizer.from_pretrained(CODEC_DIR / "tiny")
    return _codec["tiny"]


def family(checkpoint: str) -> MossDelayFamily:
    return MossDelayFamily(load_delay_model(DELAY_DIR / checkpoint), tokenizer=None)


class Outbox:
    """Collects every request's chunks."""

    def __init__(self) -> None:
        self.chunks: dict[str, list] = {}

    def sink(self, chunk) -> None:
        self.chunks.setdefault(chunk.request_id, []).append(chunk)

    def final(self, request_id: str):
        chunks = self.chunks[request_id]
        assert chunks[-1].final and sum(c.final for c in chunks) == 1
        return chunks[-1]


def tts_rows():
    """The prompt rows of tiny_nvq16's first tts golden request: a plain request to run."""
    return next(r for n, r, *_ in golden_requests("tiny_nvq16") if n == "tts/0")


def final_queue():
    """(queue, sink): the sink puts each request's final chunk in the queue (threaded engines)."""
    finals: queue.Queue = queue.Queue()
    return finals, lambda chunk: finals.put(chunk) if chunk.final else None


def golden_requests(checkpoint: str, seeded: bool = False):
    """(name, prompt rows, sampling, cap, golden rows, golden frames, golden segment lengths) per fixture request
    that a single request reproduces: every greedy one, and the seeded single request."""
    out = []
    for case in generation_cases(DELAY_DIR / checkpoint):
        if (case.seed is not None) != seeded or (seeded and len(case.prompts) > 1):
            continue
        g = case.golden
        for b, rows in enumerate(case.prompts):
            out.append((f"{case.name}/{b}", rows, case.sampling, case.max_new_tokens, g["new_rows"][b],
                        g[f"segments_{b}"], list(g[f"segment_lengths_{b}"])))
    return out


def check_against_golden(generation, golden_rows, golden_frames, golden_lengths, columns: int) -> None:
    steps = len(generation.rows)
    assert np.array_equal(generation.rows, golden_rows[:steps])
    pad_row = np.array([PAD_TEXT] + [PAD_CODE] * (columns - 1))
    assert (golden_rows[steps:] == pad_row).all(), "the request ended before the reference did"
    assert np.array_equal(generation.frames, golden_frames.reshape(-1, columns - 1))
    assert generation.segment_lengths == golden_lengths


def run_greedy_goldens(engine: Engine, checkpoint: str) -> None:
    """Every greedy golden request of `checkpoint`, all submitted at once, each checked against its golden."""
    fam = engine.family
    outbox = Outbox()
    requests = golden_requests(checkpoint)
    for name, rows, _, cap, *_ in requests:
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, request_id=name,
                           max_new_frames=cap, decode_audio=False)
    engine.run_until_idle()
    for name, _, _, _, rows, frames, lengths in requests:
        check_against_golden(outbox.final(name).generation, rows, frames, lengths, fam.columns)


@pytest.mark.parametrize("checkpoint", ["tiny_nvq32", "tiny_nvq16"])
@pytest.mark.parametrize("prefill_tokens", [512, 16])
def test_continuous_batching_reproduces_every_greedy_golden(checkpoint: str, prefill_tokens: int) -> None:
    """Requests join at staggered steps, finish at different steps, and decoys around them are
    aborted (waiting, prefilling and decoding); every request still equals its golden. With
    prefill_tokens=16, long prompts are prefilled in pieces between decode steps."""
    fam = family(checkpoint)
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=5, prefill_tokens=prefill_tokens))
    outbox = Outbox()
    requests = golden_requests(checkpoint)
    pending = list(requests)
    decoys, step = [], 0
    while pending or engine.stats()["live"]:
        if pending and step % 3 == 0:  # one new request every third step
            name, rows, sampling, cap, *_ = pending.pop(0)
            engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, request_id=name,
                               max_new_frames=cap, decode_audio=False)
            decoy = engine.add_request(fam.prompt_from_rows(rows), SamplingParams(seed=step), outbox.sink,
                                       request_id=f"decoy-{step}", max_new_frames=cap, decode_audio=False)
            decoys.append((decoy.id, step + (step % 4) * 3))  # aborted 0..9 steps later
        for decoy_id, when in decoys:
            if when == step:
                engine.abort(decoy_id)
        engine.step()
        step += 1
    for name, _, _, _, rows, frames, lengths in requests:
        final = outbox.final(name)
        assert final.finish_reason in ("stop", "length")
        check_against_golden(final.generation, rows, frames, lengths, fam.columns)
        codes = np.concatenate([c.codes for c in outbox.chunks[name]])
        assert np.array_equal(codes, final.generation.frames)
    reasons = {outbox.final(d).finish_reason for d, _ in decoys}
    assert "aborted" in reasons
    stats = engine.stats()
    assert stats["cache_slots_used"] == 0 and stats["running"] == 0 and stats["live"] == 0


def test_static_shape_decode_steps_match_the_goldens() -> None:
    """The fixed-shape decode (padded batch, bucketed key length: what CUDA graphs capture) gives the goldens."""
    fam = family("tiny_nvq32")
    engine = fixed_shape_engine(fam, 6, "static", (1, 2, 4, 8))
    run_greedy_goldens(engine, "tiny_nvq32")
    assert {size for size, _ in engine.runner._steps} >= {4, 6}  # padded up to a captured size
    assert engine.runner.slots_in_use == 0


def test_a_full_batch_reads_the_kv_cache_as_a_view(monkeypatch) -> None:
    """Slots come out of order once a finished request has left a kept prefix behind (the free,
    unlabelled slots go first); the decode batch still runs in slot order, so a full batch's
    attention reads the cache as a view and gathers no row's keys."""
    import mossserve.layers.batch_context as batch_context

    fam = family("tiny_nvq32")
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=4))
    outbox = Outbox()
    requests = golden_requests("tiny_nvq32")
    engine.add_request(fam.prompt_from_rows(requests[0][1]), SamplingParams.greedy(), outbox.sink,
                       max_new_frames=2, decode_audio=False)
    engine.run_until_idle()
    runs = []
    build = batch_context.BatchContext.build

    def recording(starts, num_tokens, slots, device):
        ctx = build(starts, num_tokens, slots, device)
        if num_tokens == 1 and len(slots) == 4:
            runs.append((list(slots), ctx.slot_run_start))
        return ctx

    monkeypatch.setattr(batch_context.BatchContext, "build", staticmethod(recording))
    for name, rows, _, cap, *_ in requests[1:5]:
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, request_id=name,
                           max_new_frames=cap, decode_audio=False)
    engine.run_until_idle()
    assert runs and all(slots == [0, 1, 2, 3] and start == 0 for slots, start in runs)
    for name, _, _, _, rows, frames, lengths in requests[1:5]:
        check_against_golden(outbox.final(name).generation, rows, frames, lengths, fam.columns)


@pytest.mark.parametrize("checkpoint", ["tiny_nvq32", "tiny_nvq16"])
def test_seeded_request_gives_the_same_codes_alone_and_in_a_crowd(checkpoint: str) -> None:
    """The seeded golden (the reference's seeded run) replays alone and among other sampled requests."""
    fam = family(checkpoint)
    (name, rows, sampling, cap, golden_rows, golden_frames, lengths), = golden_requests(checkpoint, seeded=True)
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=8))
    outbox = Outbox()
    others = golden_requests(checkpoint)
    for i, (_, other_rows, *_rest) in enumerate(others[:4]):
        engine.add_request(fam.prompt_from_rows(other_rows), sampling.with_overrides(seed=100 + i), outbox.sink,
                           max_new_frames=cap, decode_audio=False)
    engine.step()
    engine.step()
    engine.add_request(fam.prompt_from_rows(rows), sampling, outbox.sink, request_id=name, max_new_frames=cap,
                       decode_audio=False)
    for i, (_, other_rows, *_rest) in enumerate(others[4:8]):
        engine.add_request(fam.prompt_from_rows(other_rows), sampling.with_overrides(seed=200 + i), outbox.sink,
                           max_new_frames=cap, decode_audio=False)
    engine.run_until_idle()
    check_against_golden(outbox.final(name).generation, golden_rows, golden_frames, lengths, fam.columns)


def test_streamed_chunks_follow_the_schedule_and_equal_the_offline_decode() -> None:
    fam = family("tiny_nvq32")
    engine = Engine(fam, codec, EngineConfig(threaded=False, max_running=4))
    outbox = Outbox()
    requests = golden_requests("tiny_nvq32")
    schedules = {}
    for i, (name, rows, _, cap, *_) in enumerate(requests):
        schedules[name] = ChunkSchedule(2, 12) if i % 2 == 0 else ChunkSchedule(3, 5)
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, request_id=name,
                           max_new_frames=cap, schedule=schedules[name])
    engine.run_until_idle()
    spf = codec().samples_per_frame
    checked_continuation, checked_schedule = False, set()
    for name, *_ in requests:
        final = outbox.final(name)
        generation = final.generation
        chunks = outbox.chunks[name][:-1]
        assert final.audio is None and not final.codes.size
        # Offline: every clip decoded at once; the prefix frames' samples cut from the first clip.
        expected, at = [np.zeros((codec().channels, 0), dtype=np.float32)], 0
        for index, length in enumerate(generation.segment_lengths):
            clip = generation.frames[at : at + length]
            at += length
            with torch.inference_mode():
                wave = codec().decode(torch.from_numpy(clip.T.copy())).numpy()
            if index == 0 and generation.start_length > 0:
                wave = wave[:, min(generation.start_length, length) * spf :]
                checked_continuation = True
            expected.append(wave)
        streamed = np.concatenate([expected[0]] + [c.audio for c in chunks], axis=-1)
        # The codec spec's waveform rule is <= 1e-3 (fp32 lands near 2e-5); batched chunks stay well inside.
        np.testing.assert_allclose(streamed, np.concatenate(expected, axis=-1), rtol=0, atol=1e-4)
        # Chunk sizes follow the schedule, except where a clip or the request ends. (In continuation
        # the prompt's frames go first and the first start_length frames' audio is cut, so chunks
        # that hold only cut audio are not delivered: check those by their audio alone.)
        assert all(c.audio.shape[-1] == (c.frame_end - max(c.frame_start, generation.start_length)) * spf
                   for c in chunks)
        if chunks:
            assert chunks[-1].frame_end == len(generation.frames)
        if generation.start_length == 0 and chunks:
            clip_ends = set(np.cumsum(generation.segment_lengths).tolist())
            sizes = [c.frame_end - c.frame_start for c in chunks]
            assert [c.frame_start for c in chunks] == [0, *np.cumsum(sizes)[:-1].tolist()]
            for k, (chunk, size) in enumerate(zip(chunks, sizes)):
                if chunk.frame_end not in clip_ends:
                    assert size == schedules[name].size(k), (name, sizes)
                checked_schedule.add(schedules[name])
    assert checked_continuation and len(checked_schedule) == 2


def test_hundreds_of_requests_with_random_aborts_leave_nothing_behind(delay_tts) -> None:
    """500 short requests on the threaded engine, a third aborted at random moments: every request
    ends exactly once, and every slot, codec stream and table entry is returned."""
    tts = delay_tts("tiny_nvq16")
    fam = tts.talker
    engine = Engine(fam, lambda: tts.codec, EngineConfig(max_running=8, max_queued=600))
    engine.start()
    try:
        rng = random.Random(0)
        case_rows = [r for _, r, *_ in golden_requests("tiny_nvq16")]
        finals: queue.Queue = queue.Queue()
        counts: dict[str, int] = {}

        def sink(chunk) -> None:
            counts[chunk.request_id] = counts.get(chunk.request_id, 0) + 1
            if chunk.final:
                finals.put(chunk)

        ids = []
        for i in range(500):
            request = engine.add_request(fam.prompt_from_rows(rng.choice(case_rows)), SamplingParams(seed=i), sink,
                                         max_new_frames=rng.randint(1, 20), decode_audio=rng.random() < 0.5)
            ids.append(request.id)
            if rng.random() < 0.33:
                engine.abort(rng.choice(ids))
        ended = [finals.get(timeout=300) for _ in ids]
        assert sorted(c.request_id for c in ended) == sorted(ids)
        assert {c.finish_reason for c in ended} <= {"stop", "length", "aborted"}
        assert any(c.finish_reason == "aborted" for c in ended)
        engine.shutdown()  # joins both threads: nothing is mid-flight
        stats = engine.stats()
        assert stats["cache_slots_used"] == 0 and stats["codec_streams_open"] == 0
        assert stats["live"] == stats["running"] == stats["queued"] == stats["codec_chunks_queued"] == 0
        assert stats["outputs_open"] == 0 and not any(engine.runner.state.admitted)
        assert stats["finished"] + stats["aborted"] == 500 and stats["failed"] == 0
    finally:
        engine.shutdown()


def test_free_slots_take_requests_beyond_the_queue_bound() -> None:
    """Every request waits in the queue until the next step; `max_queued` bounds those that will have
    to wait for a slot, so four free slots take four requests at once even with max_queued=0."""
    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=4, max_queued=0))
    prompt = fam.prompt_from_rows(golden_requests("tiny_nvq16")[0][1])
    for i in range(4):
        engine.add_request(prompt, SamplingParams.greedy(), lambda c: None, max_new_frames=2, decode_audio=False)
    with pytest.raises(EngineFullError, match="max_running=4, max_queued=0"):
        engine.add_request(prompt, SamplingParams.greedy(), lambda c: None, decode_audio=False)
    engine.step()
    assert engine.stats()["running"] == 4


@pytest.mark.parametrize("rows", [np.zeros((0, 17), dtype=np.int64), np.zeros((3, 16), dtype=np.int64),
                                  np.zeros(17, dtype=np.int64)])
def test_a_prompt_of_no_rows_or_the_wrong_width_is_refused(rows) -> None:
    """(An empty prompt was admitted and spun for ever holding its slot.)"""
    engine = Engine(family("tiny_nvq16"), None, EngineConfig(threaded=False))
    with pytest.raises(InvalidRequestError, match=r"prompt matrix must have shape \(T, 17\)"):
        engine.add_request(Prompt(rows=rows), SamplingParams.greedy(), lambda c: None, decode_audio=False)
    assert not engine.has_work()


@pytest.mark.parametrize("where, value, message", [((3, 0), 10**6, "text ids must lie in"),
                                                   ((-1, 5), -7, "audio codes must lie in")])
def test_a_hand_made_prompt_the_model_cannot_embed_is_refused_alone(where, value, message) -> None:
    """It failed in the embedding, and so did every request prefilled with it (on CUDA an
    out-of-range index is a device assert that ends the process)."""
    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(threaded=False))
    good = fam.prompt_from_rows(golden_requests("tiny_nvq16")[0][1])
    rows = good.rows.copy()
    rows[where] = value
    outbox = Outbox()
    engine.add_request(good, SamplingParams.greedy(), outbox.sink, request_id="good", max_new_frames=4,
                       decode_audio=False)
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request(Prompt(rows=rows, start_length=good.start_length, info=dict(good.info)),
                           SamplingParams.greedy(), outbox.sink, max_new_frames=4, decode_audio=False)
    while engine.has_work():
        engine.step()
    assert outbox.final("good").finish_reason != "error"


def test_a_full_queue_refuses_new_work_and_the_engine_keeps_serving() -> None:
    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=1, max_queued=2))
    outbox = Outbox()
    (name, rows, _, cap, golden_rows, frames, lengths), *_ = golden_requests("tiny_nvq16")
    prompt = fam.prompt_from_rows(rows)
    engine.add_request(prompt, SamplingParams.greedy(), outbox.sink, request_id="a", max_new_frames=cap, decode_audio=False)
    engine.step()  # "a" runs; the queue is empty again
    engine.add_request(prompt, SamplingParams.greedy(), outbox.sink, request_id="b", max_new_frames=cap, decode_audio=False)
    engine.add_request(prompt, SamplingParams.greedy(), outbox.sink, request_id="c", max_new_frames=cap, decode_audio=False)
    with pytest.raises(EngineFullError, match="full"):
        engine.add_request(prompt, SamplingParams.greedy(), outbox.sink, request_id="d", decode_audio=False)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(prompt, SamplingParams.greedy(), outbox.sink, request_id="b", decode_audio=False)
    with pytest.raises(InvalidRequestError, match="no codec"):
        engine.add_request(prompt, SamplingParams.greedy(), outbox.sink)
    engine.run_until_idle()
    for rid in "abc":
        check_against_golden(outbox.final(rid).generation, golden_rows, frames, lengths, fam.columns)
    assert "d" not in outbox.chunks


def test_an_error_inside_one_request_fails_only_that_request(monkeypatch) -> None:
    """A request whose admission raises, and one whose codec decode raises, fail with a message;
    the requests beside them finish with their golden output."""
    fam = family("tiny_nvq32")
    requests = golden_requests("tiny_nvq32")[:3]
    bad_admit = fam.prompt_from_rows(requests[0][1])
    admit = fam.admit

    def failing_admit(state, slot, prompt, sampling):
        if prompt is bad_admit:
            raise RuntimeError("boom in admit")
        return admit(state, slot, prompt, sampling)

    monkeypatch.setattr(fam, "admit", failing_admit)
    engine = Engine(fam, codec, EngineConfig(threaded=False, max_running=4))
    outbox = Outbox()
    engine.add_request(bad_admit, SamplingParams.greedy(), outbox.sink, request_id="bad-admit", decode_audio=False)
    bad_codec = engine.add_request(fam.prompt_from_rows(requests[1][1]), SamplingParams.greedy(), outbox.sink,
                                   request_id="bad-codec")
    for name, rows, _, cap, *_ in requests:
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, request_id=name,
                           max_new_frames=cap)
    engine.step()
    decoder = engine.codec._ensure_decoder()
    decode = decoder.decode
    bad_stream = []

    def failing_decode(stream_ids, chunks):
        sid = engine.codec._streams.get(bad_codec.id, (None, None))[1]
        if sid in stream_ids:
            bad_stream.append(sid)
            raise RuntimeError("boom in the codec")
        return decode(stream_ids, chunks)

    monkeypatch.setattr(decoder, "decode", failing_decode)
    engine.run_until_idle()
    assert outbox.final("bad-admit").finish_reason == "error" and "boom in admit" in outbox.final("bad-admit").error
    assert outbox.final("bad-codec").finish_reason == "error" and "boom in the codec" in outbox.final("bad-codec").error
    assert bad_stream
    for name, _, _, _, rows, frames, lengths in requests:
        final = outbox.final(name)
        assert final.finish_reason == "stop"
        check_against_golden(final.generation, rows, frames, lengths, fam.columns)
        assert sum(c.audio.shape[-1] for c in outbox.chunks[name][:-1]) > 0
    stats = engine.stats()
    assert stats["failed"] == 2 and stats["cache_slots_used"] == 0 and stats["codec_streams_open"] == 0


def test_runaway_guard_ends_a_generation_past_its_text_bound() -> None:
    fam = family("tiny_nvq16")
    guard = RunawayGuard(min_frames=4, frames_per_token=1.0)
    engine = Engine(fam, None, EngineConfig(threaded=False, runaway=guard))
    outbox = Outbox()
    (name, rows, _, cap, *_), = [r for r in golden_requests("tiny_nvq16") if r[0] == "tts/0"]
    prompt = fam.prompt_from_rows(rows)
    prompt.info.update(text_tokens=3)
    engine.add_request(prompt, SamplingParams.greedy(), outbox.sink, request_id="guarded", decode_audio=False)
    unguarded = fam.prompt_from_rows(rows)
    unguarded.info.update(text_tokens=3, runaway_guard=False)  # e.g. a sound effect
    engine.add_request(unguarded, SamplingParams.greedy(), outbox.sink, request_id="free", decode_audio=False)
    engine.add_request(prompt, SamplingParams.greedy(), outbox.sink, request_id="off", decode_audio=False, guard=False)
    engine.run_until_idle()
    guarded = outbox.final("guarded")
    assert guarded.finish_reason == "runaway" and len(guarded.generation.rows) == 7
    assert outbox.final("free").finish_reason == "stop" and outbox.final("off").finish_reason == "stop"
    assert guard.frame_bound(10, 200) == max(4 + 10, 2 * 200 + 4)
    assert RunawayGuard(enabled=False).frame_bound(10, None) is None


def test_a_sound_effect_is_not_guarded_from_a_conversation_file_either(delay_tts) -> None:
    """`say --conversation` builds the prompt from messages, not a request: an ambient sound there is
    as free of the runaway guard as a sound-effect request, and a text to speak is not."""
    from mossserve.speech_request import SpeechRequest
    from mossserve.text.delay_prompt import build_user_message

    fam = delay_tts("tiny_nvq16").talker
    sound = fam.prompt_from_conversation([build_user_message(ambient_sound="雷声隆隆。", tokens=125)], "generation")
    speech = fam.prompt_from_conversation([build_user_message(text="Hello.")], "generation")
    request = fam.build_prompt(SpeechRequest(input="雷声隆隆。", task="sound_effect"))
    as_dict = fam.prompt_from_conversation([{"role": "user", "ambient_sound": "雷声隆隆。", "tokens": 125}], "generation")
    assert sound.info["runaway_guard"] is False and request.info["runaway_guard"] is False
    assert as_dict.info["runaway_guard"] is False and speech.info["runaway_guard"] is True


def test_runaway_guard_means_the_same_seconds_at_another_frame_rate() -> None:
    """Fish S2 Pro runs at 44100 / 2048 = 21.5 frames/s: the default guard's 4 s loop and 10 s floor."""
    fish = RunawayGuard().at_frame_rate(44100 / 2048)
    assert fish.repeat_frames == round(50 * 44100 / 2048 / 12.5) == 86
    assert fish.min_frames == round(125 * 44100 / 2048 / 12.5) and fish.frame_rate == 44100 / 2048
    assert fish.frame_bound(10, None) == fish.min_frames + int(15.0 * 44100 / 2048 / 12.5 * 10)
    assert RunawayGuard().at_frame_rate(12.5) == RunawayGuard()
    assert Engine(family("tiny_nvq16"), None, EngineConfig(threaded=False)).guard == RunawayGuard()


def test_runaway_guard_ends_a_loop_on_one_frame() -> None:
    """Greedy decoding with a huge repetition bonus on the tiny model loops on one frame; the guard ends it."""
    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(threaded=False, runaway=RunawayGuard(repeat_frames=5)))
    outbox = Outbox()
    rows = tts_rows()
    sampling = SamplingParams.greedy().with_overrides(audio_repetition_penalty=0.01)  # < 1 favours repeats
    engine.add_request(fam.prompt_from_rows(rows), sampling, outbox.sink, request_id="loop", max_new_frames=200,
                       decode_audio=False)
    engine.run_until_idle()
    final = outbox.final("loop")
    frames = final.generation.frames
    assert final.finish_reason == "runaway"
    assert (frames[-5:, :4] == frames[-1, :4]).all() and len(frames) >= 5


def test_runaway_guard_allows_the_pauses_the_text_asks_for(delay_tts) -> None:
    """`[pause 3.2s]` (MOSS-TTS v1.5) is silence the request wants: the loop limit grows by the longest
    pause and the text bound by all of them, so a long pause is not cut as a loop on silence."""
    from mossserve.speech_request import SpeechRequest

    prompt = delay_tts("tiny_nvq16").prompt(SpeechRequest(input="Wait [pause 3.2s] for it [PAUSE 0.8 s]. [pause]"))
    assert prompt.info["pauses"] == [3.2, 0.8]
    from mossserve.text.pauses import pause_seconds

    assert pause_seconds("[pause 100000s] x [pause " + "9" * 400 + "s]") == [60.0, 60.0]  # guard kept; no overflow
    # adjacent markers are one silence: [pause 5s][pause 5s] was two of 5 s, and the loop guard cut it at 9 s
    assert pause_seconds("Wait [pause 5s][pause 5s] go, [pause 1s], [pause 2s]. Then [pause 40s] [pause 40s]") == [
        10.0, 3.0, 60.0]
    # markers the normalizer makes adjacent (a zero-width space, a list's lines) are read as the model reads them
    for text in ("Wait [pause 5s]\u200b[pause 5s] go.", "- Wait [pause 5s]\n- [pause 5s] go."):
        assert delay_tts("tiny_nvq16").prompt(SpeechRequest(input=text)).info["pauses"] == [10.0]
    guard = RunawayGuard()
    assert guard.repeat_limit(prompt.info["pauses"]) == 50 + 40
    assert guard.frame_bound(10, None, prompt.info["pauses"]) == guard.frame_bound(10, None) + 50
    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(threaded=False, runaway=RunawayGuard(repeat_frames=5)))
    outbox = Outbox()
    sampling = SamplingParams.greedy().with_overrides(audio_repetition_penalty=0.01)  # loops, as above
    for rid, pauses in (("loop", []), ("pause", [0.8])):  # 0.8 s: 10 frames of silence asked for
        looping = fam.prompt_from_rows(tts_rows())
        looping.info["pauses"] = pauses
        engine.add_request(looping, sampling, outbox.sink, request_id=rid, max_new_frames=200, decode_audio=False)
    engine.run_until_idle()
    loop, pause = outbox.final("loop"), outbox.final("pause")
    assert loop.finish_reason == pause.finish_reason == "runaway"
    assert len(pause.generation.frames) == len(loop.generation.frames) + 10
    assert (pause.generation.frames[-15:, :4] == pause.generation.frames[-1, :4]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_steps_match_the_goldens() -> None:
    from mossserve.loader import build_on_meta, load_weights, weight_files
    from mossserve.models.moss_delay import MossDelayModel
    from mossserve.models.moss_delay_config import MossDelayConfig

    path = DELAY_DIR / "tiny_nvq32"
    config = MossDelayConfig.from_file(path / "config.json")
    model = build_on_meta(lambda: MossDelayModel(config), torch.float32, "cuda")
    load_weights(model, weight_files(path), model.checkpoint_layout())
    fam = MossDelayFamily(model.eval().requires_grad_(False), tokenizer=None)
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=6, max_len=1024))
    assert engine.runner.mode == "graphs"
    run_greedy_goldens(engine, "tiny_nvq32")
    assert all(step.graph is not None for step in engine.runner._steps.values())


def test_a_long_prefill_does_not_stall_the_running_batch() -> None:
    """With a budget of 16 prompt positions per step, a long prompt is prefilled over many steps,
    and a request already decoding emits a row in every one of them."""
    fam = family("tiny_nvq32")
    # Every prompt row computed (no copied template prefix), so the count of prefill steps is known.
    engine = Engine(fam, None, EngineConfig(threaded=False, prefill_tokens=16, shared_prefix_rows=0))
    outbox = Outbox()
    requests = {name: (rows, cap) for name, rows, _, cap, *_ in golden_requests("tiny_nvq32")}
    short_rows, _ = requests["tts/0"]
    long_rows, _ = requests["continuation/0"]
    running = engine.add_request(fam.prompt_from_rows(short_rows), SamplingParams.greedy(), outbox.sink,
                                 max_new_frames=200, decode_audio=False, guard=False)
    while running.steps == 0:
        engine.step()
    waiting = engine.add_request(fam.prompt_from_rows(long_rows), SamplingParams.greedy(), outbox.sink,
                                 decode_audio=False)
    prefill_steps = 0
    while waiting.prefilled < len(long_rows):
        before = running.steps
        engine.step()
        prefill_steps += 1
        assert running.steps == before + 1 or running.status.done
    assert prefill_steps == -(-len(long_rows) // 16) > 3


def test_prompt_and_generation_fit_max_len() -> None:
    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(threaded=False, max_len=80))
    outbox = Outbox()
    rows = tts_rows()
    with pytest.raises(InvalidRequestError, match="allows 80"):
        engine.add_request(fam.prompt_from_rows(np.concatenate([rows, rows, rows])), SamplingParams.greedy(),
                           outbox.sink, decode_audio=False)
    request = engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink,
                                 max_new_frames=1000, decode_audio=False, guard=False)
    assert request.max_new_frames == 80 - len(rows) > 0
    engine.run_until_idle()
    generation = outbox.final(request.id).generation
    assert len(rows) + len(generation.rows) <= 80


def test_abort_reaches_a_request_still_draining_through_the_codec(monkeypatch) -> None:
    fam = family("tiny_nvq16")
    engine = Engine(fam, codec, EngineConfig(threaded=False))
    outbox = Outbox()
    rows = tts_rows()
    run_once = engine.codec.run_once
    monkeypatch.setattr(engine.codec, "run_once", lambda: False)  # hold the codec back
    request = engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink)
    while not request.status.done:
        engine.step()
    assert engine.codec.queued > 0 and request.id not in outbox.chunks
    engine.abort(request.id)
    engine.step()
    monkeypatch.setattr(engine.codec, "run_once", run_once)
    engine.step()
    (final,) = outbox.chunks[request.id]
    assert final.final and final.finish_reason == "aborted"
    stats = engine.stats()
    assert stats["live"] == stats["codec_chunks_queued"] == stats["codec_streams_open"] == 0


def test_a_request_dropped_while_the_codec_holds_its_chunk_leaves_no_stream(monkeypatch) -> None:
    """On CUDA the codec runs on its own thread: a request may be dropped (aborted, by the talker's
    thread) after the codec took its chunk. Dropped before its stream is opened, it gets none;
    dropped after, its stream is read under the lock and closed, and the round goes on."""
    fam = family("tiny_nvq16")
    engine = Engine(fam, codec, EngineConfig(threaded=False))
    outbox = Outbox()
    rows = tts_rows()
    run_once = engine.codec.run_once
    monkeypatch.setattr(engine.codec, "run_once", lambda: False)  # hold the codec back
    first, second = (engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink)
                     for _ in range(2))
    while not (first.status.done and second.status.done):
        engine.step()
    ensure_decoder, decode = engine.codec._ensure_decoder, engine.codec._decode

    def drop_then(request, call):
        def run(*args):
            engine.codec.drop(request)
            return call(*args)
        return run

    monkeypatch.setattr(engine.codec, "_ensure_decoder", drop_then(first, ensure_decoder))
    monkeypatch.setattr(engine.codec, "_decode", drop_then(second, decode))
    assert run_once()
    assert engine.codec.open_streams == 0 and engine.codec.queued == 0
    assert first.id not in outbox.chunks and second.id not in outbox.chunks


def test_a_slow_codec_on_its_own_thread_holds_new_requests_in_the_queue(monkeypatch) -> None:
    """Finished requests whose audio waits on the codec are at most max_running: a talker faster
    than the codec stops admitting (new requests wait in the queue, which the server bounds with
    503s) instead of piling audio up; once the codec drains them, the rest run."""
    import threading

    fam = family("tiny_nvq16")
    engine = Engine(fam, codec, EngineConfig(max_running=2, codec_thread=True))
    release = threading.Event()
    decode = engine.codec._decode

    def slow_decode(*args):
        release.wait()
        return decode(*args)

    monkeypatch.setattr(engine.codec, "_decode", slow_decode)
    engine.start()
    try:
        rows = tts_rows()
        finals, sink = final_queue()
        for _ in range(5):
            engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), sink, max_new_frames=24, guard=False)
        engine._worker.wait_idle()  # the talker: requests run to their end until it may start none
        stats = engine.stats()
        # admission stops once two wait on the codec (three, if one started while the first waited)
        assert stats["running"] == 0 and stats["queued"] >= 2 and stats["live"] == 5
        release.set()
        assert [finals.get(timeout=60).finish_reason for _ in range(5)] == ["length"] * 5
        engine.wait_idle()
        assert engine.stats()["live"] == 0
    finally:
        release.set()
        engine.shutdown()


def test_shutdown_ends_the_requests_in_flight_and_refuses_later_ones() -> None:
    """A caller waiting on a request when the engine shuts down (TTS.close, the server stopping)
    gets a final chunk with the reason; a request after it is refused, not queued forever."""
    from mossserve.errors import EngineClosedError

    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(threaded=False))
    outbox = Outbox()
    rows = tts_rows()
    running = engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink,
                                 max_new_frames=200, decode_audio=False)
    engine.step()
    queued = engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, decode_audio=False)
    engine.shutdown()
    for request in (running, queued):
        final = outbox.final(request.id)
        assert final.finish_reason == "aborted" and final.error == "the engine shut down"
    assert engine.stats()["live"] == 0
    with pytest.raises(EngineClosedError):
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), outbox.sink, decode_audio=False)


def test_a_request_half_ended_by_a_failing_step_still_gets_its_final(monkeypatch) -> None:
    """The step that fails may be ending a request (out of the batch already, its slot's release
    raising): the crash handler finds it in the live table and closes it."""
    fam = family("tiny_nvq16")
    engine = Engine(fam, None, EngineConfig(max_running=4))
    engine.start()
    try:
        rows = tts_rows()
        finals, sink = final_queue()
        release = engine.runner.release
        calls = []

        def release_once_failing(slot, kept=None):
            calls.append(slot)
            if len(calls) == 1:
                raise RuntimeError("release bug")
            release(slot, kept)

        monkeypatch.setattr(engine.runner, "release", release_once_failing)
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), sink, max_new_frames=3,
                           decode_audio=False)
        final = finals.get(timeout=60)
        assert final.finish_reason == "error" and "release bug" in final.error
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), sink, max_new_frames=3,
                           decode_audio=False)
        assert finals.get(timeout=60).finish_reason == "length"
    finally:
        engine.shutdown()


def test_a_bug_in_a_round_fails_the_requests_in_flight_and_serving_goes_on(monkeypatch, caplog) -> None:
    """An exception that escapes the per-request guards (a bug) must not leave callers waiting
    forever or stop the threads: the requests in flight end with the error, later ones run."""
    fam = family("tiny_nvq16")
    engine = Engine(fam, codec, EngineConfig(max_running=4))
    engine.start()
    try:
        rows = tts_rows()
        finals, sink = final_queue()
        push = engine.pipeline.push
        monkeypatch.setattr(engine.pipeline, "push", lambda *a: (_ for _ in ()).throw(RuntimeError("talker bug")))
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), sink)
        final = finals.get(timeout=60)
        assert final.finish_reason == "error" and "talker bug" in final.error
        monkeypatch.setattr(engine.pipeline, "push", push)
        take = engine.codec._take
        monkeypatch.setattr(engine.codec, "_take", lambda: (_ for _ in ()).throw(RuntimeError("codec bug")))
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), sink)
        final = finals.get(timeout=60)
        assert final.finish_reason == "error" and "codec bug" in final.error
        monkeypatch.setattr(engine.codec, "_take", take)
        engine.add_request(fam.prompt_from_rows(rows), SamplingParams.greedy(), sink)
        assert finals.get(timeout=60).finish_reason == "stop"
        engine.shutdown()
        stats = engine.stats()
        assert stats["live"] == stats["cache_slots_used"] == stats["codec_streams_open"] == stats["outputs_open"] == 0
    finally:
        engine.shutdown()


def test_a_kv_cache_too_large_counts_its_slots_not_requests() -> None:
    """With CUDA graphs it said "the KV cache for 17 requests" for --max-running 16: the scratch slot
    that padded rows write into is no request."""
    from mossserve.engine.kv_cache import SlotKVCache

    with pytest.raises(InvalidRequestError, match=r"the KV cache of 17 slots \(one a running request, plus a scratch"):
        SlotKVCache(1, 17, 2**40, 1, 1, torch.float32, "cpu")
