"""TTS.stream / synthesize / synthesize_batch and AsyncEngine over the threaded engine."""
from __future__ import annotations

import asyncio
import shutil
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import AUDIO_DIR, CODEC_DIR
from mossserve import (AsyncEngine, AudioError, EngineConfig, EngineFullError, InvalidRequestError, MossServeError,
                       RequestAborted, SamplingParams, SpeechRequest)
from mossserve.api import TTS
from mossserve.config import ChunkSchedule, RunawayGuard

TEXTS = ["Hello there.", "A longer sentence, to stop at another step.", "Short.", "你好，世界。"]


def test_stream_concatenates_to_synthesize_and_starts_small(delay_tts) -> None:
    tts = delay_tts("tiny_nvq16")
    request = SpeechRequest(input="Hello, streaming world.")
    audio = tts.synthesize(request, SamplingParams.greedy())
    chunks = list(tts.stream(request, SamplingParams.greedy()))
    assert chunks[-1].final and chunks[-1].finish_reason in ("stop", "length")
    data = [c for c in chunks if c.audio is not None]
    assert data[0].frame_end - data[0].frame_start == 2  # the default schedule's first chunk
    streamed = np.concatenate([c.audio for c in data], axis=-1)
    np.testing.assert_array_equal(streamed, audio.samples)
    assert np.array_equal(np.concatenate([c.codes for c in data]), audio.codes)


def test_leaving_a_stream_early_aborts_the_request(delay_model_dirs) -> None:
    """Unthreaded, so the request cannot run to its end between the first chunk and the close (a
    threaded engine on a loaded machine sometimes finished it first)."""
    with closing(TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                                     engine_config=EngineConfig(threaded=False))) as tts:
        stream = tts.stream(SpeechRequest(input="Stop listening after the first chunk."), SamplingParams.greedy(),
                            max_new_frames=60)
        first = next(stream)
        assert not first.final
        stream.close()  # the generator's finally aborts the request
        tts.synthesize(SpeechRequest(input="Still serving."), SamplingParams.greedy(), max_new_frames=5)
        stats = tts.stats()
    assert stats["live"] == 0 and stats["cache_slots_used"] == 0
    assert (stats["aborted"], stats["finished"]) == (1, 1)


def test_synthesize_batch_returns_each_request_in_order(delay_tts) -> None:
    tts = delay_tts("tiny_nvq32")
    requests = [SpeechRequest(input=t) for t in TEXTS]
    together = tts.synthesize_batch(requests, SamplingParams.greedy())
    for request, audio in zip(requests, together):
        alone = tts.synthesize(request, SamplingParams.greedy())
        assert np.array_equal(alone.codes, audio.codes)
        np.testing.assert_allclose(alone.samples, audio.samples, rtol=0, atol=1e-4)
    assert len({a.codes.tobytes() for a in together}) > 1  # not all alike, so the order is checked


@pytest.mark.parametrize("threaded", [True, False])
def test_run_feeds_more_prompts_than_the_engine_queues(delay_model_dirs, threaded: bool) -> None:
    """max_running + max_queued = 3: ten prompts go in as earlier ones finish (EngineFullError at the
    fourth before); one the engine refuses comes back as an error with raise_errors=False."""
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(max_running=2, max_queued=1, threaded=threaded))
    try:
        prompt = tts.prompt(SpeechRequest(input="Fed in turn."))
        too_long = tts.talker.prompt_from_rows(np.repeat(prompt.rows, 200, axis=0))
        results = tts.run([prompt] * 5 + [too_long] + [prompt] * 4, SamplingParams.greedy(), max_new_frames=8,
                          decode_audio=False, raise_errors=False)
        alone = tts.run([prompt], SamplingParams.greedy(), max_new_frames=8, decode_audio=False)[0][0]
        assert [g.finish_reason == "error" for g, _ in results] == [False] * 5 + [True] + [False] * 4
        assert "positions" in results[5][0].error
        assert all(np.array_equal(g.frames, alone.frames) for i, (g, _) in enumerate(results) if i != 5)
        with pytest.raises(InvalidRequestError, match="positions"):
            tts.run([prompt, too_long], decode_audio=False)
    finally:
        tts.close()


def test_run_waits_for_room_that_other_callers_hold(delay_model_dirs) -> None:
    """Two threads share one TTS whose engine takes three requests at once: neither call fails for
    the other's requests (the second raised EngineFullError at once)."""
    import threading

    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(max_running=2, max_queued=1))
    try:
        prompt = tts.prompt(SpeechRequest(input="Shared."))
        results, errors = {}, []

        def call(name: str) -> None:
            try:
                results[name] = tts.run([prompt] * 6, SamplingParams.greedy(), max_new_frames=6, decode_audio=False)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=call, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and all(len(r) == 6 for r in results.values())
    finally:
        tts.close()


def test_an_interrupted_run_on_an_unthreaded_engine_leaves_room_for_the_next(delay_model_dirs) -> None:
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(max_running=2, max_queued=1, threaded=False))
    try:
        prompt = tts.prompt(SpeechRequest(input="Interrupted."))

        def interrupt(index, chunk) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            tts.run([prompt] * 3, SamplingParams.greedy(), max_new_frames=6, decode_audio=False, on_chunk=interrupt)
        assert len(tts.run([prompt] * 3, SamplingParams.greedy(), max_new_frames=6, decode_audio=False)) == 3
        with pytest.raises(InvalidRequestError, match="max_new_frames must be at least 1"):  # the call's own mistake
            tts.run([prompt] * 2, max_new_frames=0, decode_audio=False, raise_errors=False)
    finally:
        tts.close()


def test_sampling_is_the_models_card_with_overrides() -> None:
    """`SamplingParams.greedy()` is MOSS-TTS's card made greedy: on another model it dropped that model's
    repetition rules (Realtime's 1.1 over a 50-frame window); `tts.sampling` keeps them."""
    from realtime_cases import REALTIME_DIR

    tts = TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")
    try:
        card = tts.talker.default_sampling()
        greedy = tts.sampling(greedy=True)
        assert greedy.audio_temperature == greedy.text_temperature == 0.0
        assert (greedy.audio_repetition_penalty, greedy.audio_repetition_window) == (1.1, 50)
        assert SamplingParams.greedy().audio_repetition_window != 50
        seeded = tts.sampling(seed=3, audio_top_k=None)
        assert seeded.seed == 3 and seeded.audio_top_k == card.audio_top_k == 30
        with pytest.raises(InvalidRequestError, match="audio_top_p"):
            tts.sampling(audio_top_p=2.0)
        # greedy is temperature 0: a temperature beside it was silently dropped
        with pytest.raises(InvalidRequestError, match="give greedy or audio_temperature, not both"):
            tts.sampling(greedy=True, audio_temperature=1.0)
        assert tts.sampling(greedy=True, audio_temperature=None).audio_temperature == 0.0
        assert tts.sampling(greedy=True, audio_temperature=0).audio_temperature == 0.0  # the server's temperature 0
        for zeros in (np.zeros(tts.talker.codebooks), [0.0] * tts.talker.codebooks):  # an array raised ValueError
            assert tts.sampling(greedy=True, audio_temperature=zeros).audio_temperature == [0.0] * tts.talker.codebooks
        with pytest.raises(InvalidRequestError, match="not both"):
            tts.sampling(greedy=True, audio_temperature=np.full(tts.talker.codebooks, 0.5))
    finally:
        tts.close()


def test_a_seed_replays_in_any_company(delay_tts) -> None:
    tts = delay_tts("tiny_nvq32")
    seeded = tts.talker.default_sampling().with_overrides(seed=7)
    alone = tts.generate_codes(SpeechRequest(input=TEXTS[1]), seeded)
    crowd = [SpeechRequest(input=t) for t in TEXTS]
    samplings = [tts.talker.default_sampling().with_overrides(seed=100 + i) for i in range(len(crowd))]
    samplings[1] = seeded
    results = tts.generate([tts.prompt(r) for r in crowd], samplings)
    assert np.array_equal(results[1].frames, alone)
    assert not np.array_equal(results[0].frames[: len(alone)], alone[: len(results[0].frames)])


def test_async_engine_shares_one_encode_per_voice_and_survives_bad_voices(delay_model_dirs, tmp_path: Path) -> None:
    voice = tmp_path / "me.wav"
    shutil.copy(AUDIO_DIR / "reference_zh.wav", voice)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    engine = AsyncEngine.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny")

    async def collect(request: SpeechRequest):
        return [chunk async for chunk in engine.submit(request, SamplingParams.greedy(), max_new_frames=20)]

    async def main():
        with pytest.raises(AudioError, match="notes.wav"):
            await engine.submit(SpeechRequest(input="Bad voice.", voice=not_audio))
        results = await asyncio.gather(*(collect(SpeechRequest(input=t, voice=voice)) for t in TEXTS))
        stream = await engine.submit(SpeechRequest(input="Abort me."), SamplingParams.greedy(), max_new_frames=60)
        await stream.__anext__()
        await stream.aclose()
        return results

    try:
        results = asyncio.run(main())
        speakers = engine.stats()["speakers"]
        assert speakers["encodes"] == 1  # four requests, one voice: one encode (the bad voice never encodes)
        assert speakers["hits"] + speakers["misses"] == len(TEXTS) + 1
        reference = engine.tts.synthesize_batch([SpeechRequest(input=t, voice=voice) for t in TEXTS],
                                                SamplingParams.greedy(), max_new_frames=20)
        for chunks, audio in zip(results, reference):
            assert chunks[-1].final
            assert np.array_equal(np.concatenate([c.codes for c in chunks]), audio.codes)
        stats = engine.stats()
        assert stats["live"] == 0 and stats["cache_slots_used"] == 0 and stats["aborted"] == 1
    finally:
        engine.close()


def test_async_engine_refuses_work_beyond_its_queue(delay_model_dirs) -> None:
    engine = AsyncEngine(TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                                             engine_config=EngineConfig(max_running=1, max_queued=1, threaded=False)))
    prompt = engine.tts.prompt(SpeechRequest(input="Queued."))

    async def main():
        first = await engine.submit(prompt, decode_audio=False)
        second = await engine.submit(prompt, decode_audio=False)  # max_running + max_queued = 2 at once
        with pytest.raises(EngineFullError):
            await engine.submit(prompt, decode_audio=False)
        await second.aclose()
        engine.tts.engine.run_until_idle()
        return [c async for c in first]

    try:
        chunks = asyncio.run(main())
        assert chunks[-1].final and chunks[-1].finish_reason in ("stop", "length", "runaway")
    finally:
        engine.close()


def test_a_failed_request_raises_in_its_stream_only(delay_tts, monkeypatch) -> None:
    tts = delay_tts("tiny_nvq16")
    engine = tts.engine
    prompt = tts.prompt(SpeechRequest(input="This one fails."))
    admit = tts.talker.admit
    monkeypatch.setattr(tts.talker, "admit",
                        lambda state, slot, p, s: (_ for _ in ()).throw(RuntimeError("boom")) if p is prompt
                        else admit(state, slot, p, s))
    with pytest.raises(MossServeError, match="boom"):
        list(tts.stream(prompt, SamplingParams.greedy()))
    assert len(tts.synthesize(SpeechRequest(input="Fine."), SamplingParams.greedy(), max_new_frames=5).codes) >= 0
    assert engine.stats()["live"] == 0


def test_a_closed_tts_refuses_work_instead_of_starting_a_new_engine(delay_model_dirs) -> None:
    from mossserve import EngineClosedError

    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny")
    assert tts.synthesize(SpeechRequest(input="Once."), SamplingParams.greedy(), max_new_frames=3).codes.shape[1] == 16
    tts.close()
    with pytest.raises(EngineClosedError):
        tts.synthesize(SpeechRequest(input="Twice."), SamplingParams.greedy(), max_new_frames=3)
    with pytest.raises(EngineClosedError):
        tts.stats()


@pytest.mark.parametrize("codec_thread", [True, None])
def test_a_dropped_tts_frees_its_engine_and_threads(delay_model_dirs, codec_thread) -> None:
    """Engine, codec and speaker threads hold their owners weakly: a TTS that goes out of scope
    (or is created again in a notebook) is collected with its KV cache, and its threads end. On CPU
    the codec runs on the engine's thread unless asked for a thread of its own."""
    import gc
    import threading
    import weakref

    before = set(threading.enumerate())
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(codec_thread=codec_thread))
    tts.synthesize(SpeechRequest(input="Goodbye.", voice=AUDIO_DIR / "reference_zh.wav"), SamplingParams.greedy(),
                   max_new_frames=5)
    threads = [t for t in threading.enumerate() if t not in before]
    codec = {"mossserve-codec"} if codec_thread else set()
    assert {t.name for t in threads} == {"mossserve-engine", "mossserve-speakers"} | codec
    refs = {name: weakref.ref(x) for name, x in (("tts", tts), ("engine", tts.engine), ("speakers", tts.speakers))}
    tts.wait_idle()  # a thread still finishing the round that delivered the last chunk holds its owner
    del tts
    gc.collect()
    assert [name for name, r in refs.items() if r() is not None] == []
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()


def test_the_codec_on_its_own_thread_or_between_steps_gives_the_same_audio(delay_model_dirs) -> None:
    """On CPU the engine's thread decodes audio between steps (one OpenMP pool, mossserve/openmp.py);
    a codec thread of its own (CUDA's default) streams the same chunks and audio."""
    request = SpeechRequest(input="Between the steps.", voice=AUDIO_DIR / "reference_zh.wav")
    results = []
    for codec_thread in (None, True):
        tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                                  engine_config=EngineConfig(codec_thread=codec_thread))
        try:
            chunks = list(tts.stream(request, SamplingParams.greedy(), max_new_frames=40))
        finally:
            tts.close()
        results.append(chunks)
    between, threaded = results
    assert len(between) == len(threaded) > 2
    for a, b in zip(between, threaded):
        assert (a.frame_start, a.frame_end) == (b.frame_start, b.frame_end)
        np.testing.assert_array_equal(a.audio, b.audio)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_the_codec_thread_streams_the_cpu_audio(delay_model_dirs) -> None:
    """On CUDA the codec decodes on its own thread and CUDA stream while the talker steps. Two
    decoder streams serve four requests, so reused streams must start from state zeroed on the
    codec's stream: every request's codes and audio are the CPU run's."""
    requests = [SpeechRequest(input=text) for text in ("One.", "Two words.", "Three more words.", "Four.")]
    results = {}
    for device in ("cpu", "cuda"):
        tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny", device=device,
                                  engine_config=EngineConfig(max_running=2, codec_streams=2))
        try:
            results[device] = tts.synthesize_batch(requests, SamplingParams.greedy(), max_new_frames=30)
        finally:
            tts.close()
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        np.testing.assert_array_equal(cpu.codes, cuda.codes)
        assert cpu.samples.shape == cuda.samples.shape and np.abs(cpu.samples - cuda.samples).max() <= 1e-3



def test_an_async_stream_left_or_closed_early_aborts_its_request(delay_model_dirs) -> None:
    """Breaking out of `async for` closes nothing on a plain async iterator: the collected stream
    aborts its request; `aclose()` before the request was queued aborts it once queued."""
    import gc

    engine = AsyncEngine.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny")
    request = SpeechRequest(input="Stop listening after the first chunk.")

    async def main() -> None:
        async for chunk in engine.submit(request, SamplingParams.greedy(), max_new_frames=200):
            break
        gc.collect()
        stream = engine.submit(request, SamplingParams.greedy(), max_new_frames=200)
        await stream.aclose()
        await asyncio.sleep(0)  # lets the queued start run
        await stream._started

    try:
        asyncio.run(main())
        engine.tts.wait_idle()
        stats = engine.stats()
        assert stats["aborted"] == 2 and stats["finished"] == 0 and stats["live"] == 0
    finally:
        engine.close()


def test_a_stream_collected_after_its_engine_closed_says_nothing(delay_model_dirs) -> None:
    """Its request ended with the engine: nothing to abort (it printed an ignored EngineClosedError)."""
    import gc
    import sys

    engine = AsyncEngine.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny")
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append

    async def main() -> None:
        stream = await engine.submit(SpeechRequest(input="Left."), SamplingParams.greedy(), max_new_frames=200)
        async for chunk in stream:
            break
        engine.close()
        del stream, chunk
        gc.collect()

    try:
        asyncio.run(main())
    finally:
        sys.unraisablehook = hook
        engine.close()
    assert unraisable == []


def test_a_refused_stream_never_iterated_logs_nothing(delay_model_dirs) -> None:
    """Its start failed and nobody awaited it: asyncio logged 'Task exception was never retrieved'.
    Iterated, the same stream still raises the refusal."""
    import gc

    engine = AsyncEngine.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny")
    logged = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: logged.append(context["message"]))
        stream = engine.submit(SpeechRequest(input="No voice.", mode="continuation"))
        await asyncio.wait([stream._started])
        del stream
        gc.collect()
        with pytest.raises(InvalidRequestError, match="continuation needs a voice"):
            async for _ in engine.submit(SpeechRequest(input="No voice.", mode="continuation")):
                pass

    try:
        asyncio.run(main())
    finally:
        engine.close()
    assert logged == []


def test_sampling_that_does_not_fit_is_refused_before_anything_runs(delay_tts) -> None:
    tts = delay_tts("tiny_nvq16")
    requests = [SpeechRequest(input="One."), SpeechRequest(input="Two.")]
    with pytest.raises(InvalidRequestError, match="1 sampling settings for 2 prompts"):
        tts.synthesize_batch(requests, [SamplingParams.greedy()])  # it waited forever for the second
    for bad, message in ((SamplingParams(audio_top_p=[0.8] * 3), "audio_top_p has 3 values; the model has 16"),
                         (SamplingParams(audio_temperature=1e300), "audio_temperature must be 0"),
                         (SamplingParams(audio_top_k=2**70), "audio_top_k must be a non-negative integer"),
                         (SamplingParams(audio_top_k=None), "audio_top_k must be a number"),
                         (SamplingParams(audio_temperature=True), "audio_temperature must be a finite number"),
                         # text settings as lists passed, then failed the whole batch in `admit`
                         (SamplingParams(text_temperature=[1.0] * 16), "text_temperature takes one number"),
                         (SamplingParams(text_top_k=[5] * 16), "text_top_k takes one number"),
                         # a window the Delay family's penalty has not was accepted and ignored
                         (SamplingParams(audio_repetition_window=5), "audio_repetition_window is not a setting")):
        with pytest.raises(InvalidRequestError, match=message):
            tts.synthesize(requests[0], bad)
    with pytest.raises(InvalidRequestError, match=r"requests\[1\]: voice"):
        tts.synthesize_batch([requests[0], SpeechRequest(input="x", voice=np.zeros((3, 4), np.int64))])
    with pytest.raises(InvalidRequestError, match="max_new_frames must be an integer"):
        tts.synthesize(requests[0], SamplingParams.greedy(), max_new_frames=1.5)
    assert tts.stats()["live"] == 0


def test_a_plain_string_is_a_request(delay_tts) -> None:
    tts = delay_tts("tiny_nvq16")
    assert np.array_equal(tts.generate_codes("Hello.", SamplingParams.greedy(), 20),
                          tts.generate_codes(SpeechRequest(input="Hello."), SamplingParams.greedy(), 20))


def test_an_unthreaded_engine_serves_callers_on_several_threads(delay_model_dirs, delay_tts) -> None:
    """Each waiting caller steps the engine; one at a time (two steps at once broke every request)."""
    from concurrent.futures import ThreadPoolExecutor

    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(threaded=False))
    texts = [f"Caller number {i}." for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: tts.synthesize(SpeechRequest(input=t), SamplingParams.greedy(), 30), texts))
    expected = delay_tts("tiny_nvq16").synthesize_batch([SpeechRequest(input=t) for t in texts],
                                                       SamplingParams.greedy(), 30)
    for got, want in zip(results, expected):
        assert np.array_equal(got.codes, want.codes)
    assert tts.stats()["live"] == 0


def test_an_open_tts_is_closed_at_interpreter_exit(tmp_path: Path) -> None:
    """A script that never calls close(): its engine's daemon threads, still inside torch while the
    interpreter finalised, aborted the process about one run in four ("terminate called ...")."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "from mossserve.api import TTS\n"
        "close = TTS.close\n"
        "def closing(self):\n"
        "    print('closed at exit', flush=True)\n"
        "    close(self)\n"
        "TTS.close = closing\n"
        "tts = TTS.from_pretrained(None)\n"
        "print(tts.synthesize('Hi.').samples.shape, flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "closed at exit"


def test_a_closed_tts_refuses_voices_too_and_starts_no_thread(delay_model_dirs) -> None:
    """Before, a voice after close() restarted the speaker cache's thread (none encoded yet), or
    raised a bare RuntimeError (one encoded before)."""
    import threading

    from mossserve import EngineClosedError

    voice = AUDIO_DIR / "reference_zh.wav"
    for encode_first in (False, True):
        tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny")
        if encode_first:
            tts.encode_voice(voice)
        tts.close()
        before = {t for t in threading.enumerate() if t.name.startswith("mossserve-speakers")}
        for call in (lambda: tts.encode_voice(voice), lambda: tts.prompt(SpeechRequest(input="Hi.", voice=voice)),
                     lambda: asyncio.run(AsyncEngine(tts).encode_voice(voice))):
            with pytest.raises(EngineClosedError):
                call()
        after = {t for t in threading.enumerate() if t.name.startswith("mossserve-speakers")}
        assert after <= before


def test_calls_given_the_wrong_kind_of_argument_say_so(delay_tts) -> None:
    tts = delay_tts("tiny_nvq16")
    with pytest.raises(InvalidRequestError, match="takes a list of requests, got str; for one text, call synthesize"):
        tts.synthesize_batch("Hello world")
    with pytest.raises(InvalidRequestError, match=r"prompts\[0\] must be a Prompt"):
        tts.run(["Hello."])
    with pytest.raises(InvalidRequestError, match="prompts must be a list of Prompt, got Prompt"):
        tts.run(tts.prompt("Hello."))
    with pytest.raises(InvalidRequestError, match="expected a SpeechRequest, a Prompt or a string, got int"):
        tts.synthesize(5)


def test_a_prompt_or_a_string_is_taken_wherever_a_request_is(delay_tts) -> None:
    tts = delay_tts("tiny_nvq16")
    prompt = tts.prompt("Hello.")
    assert tts.prompt(prompt) is prompt
    expected = tts.generate_codes("Hello.", SamplingParams.greedy(), 20)
    assert np.array_equal(tts.generate_codes(prompt, SamplingParams.greedy(), 20), expected)

    async def submitted() -> np.ndarray:
        chunks = [c async for c in AsyncEngine(tts).submit("Hello.", SamplingParams.greedy(), max_new_frames=20,
                                                           decode_audio=False)]
        return chunks[-1].generation.frames

    assert np.array_equal(asyncio.run(submitted()), expected)


def test_a_request_changed_after_it_was_made_is_checked_again(delay_tts) -> None:
    request = SpeechRequest(input="Hello.")
    request.mode = "bad"
    with pytest.raises(InvalidRequestError, match="mode must be one of"):
        delay_tts("tiny_nvq16").synthesize(request)


def test_voices_set_after_the_request_was_made_mean_what_they_mean_in_it(delay_tts, tmp_path: Path) -> None:
    """A .npy voice set later was read as an audio file (AudioError), a speaker dict set later
    failed with AttributeError: both are normalised as the constructor normalises them."""
    tts = delay_tts("tiny_nvq16")
    codes = tmp_path / "codes.npy"
    np.save(codes, tts.generate_codes("Hi.", SamplingParams.greedy(), 20))
    later = SpeechRequest(input="Hello.")
    later.voice = str(codes)
    assert np.array_equal(tts.prompt(later).rows, tts.prompt(SpeechRequest(input="Hello.", voice=str(codes))).rows)
    dialogue = dict(input="[S1] Hello.", task="dialogue")
    later = SpeechRequest(**dialogue)
    speaker = {"voice": str(codes), "reference_text": "Hi."}
    later.speakers = [speaker]
    expected = tts.prompt(SpeechRequest(**dialogue, speakers=[speaker])).rows
    assert np.array_equal(tts.prompt(later).rows, expected)
    later.speakers = [{**speaker, "name": "x"}]
    with pytest.raises(InvalidRequestError, match=r"speakers\[0\]: unknown field\(s\) name"):
        tts.prompt(later)


def test_numpy_numbers_are_numbers() -> None:
    params = SamplingParams(seed=np.int64(7), audio_top_k=np.int64(5), audio_top_p=np.float32(0.5),
                            audio_temperature=np.full(16, 1.2), audio_repetition_penalty=[np.float32(1.5)] * 16,
                            text_top_k=np.int32(3))
    params.validate(16)
    assert params.seed == 7 and params.audio_top_k == 5 and params.audio_temperature == [1.2] * 16
    assert params.audio_repetition_penalty == [1.5] * 16 and type(params.text_top_k) is int
    EngineConfig(max_running=np.int64(4), max_len=np.int32(512), threaded=np.False_, codec_streams=0).validate()
    assert SpeechRequest(input="Hi.", duration_seconds=np.float32(2.0)).duration_seconds == 2.0
    with pytest.raises(InvalidRequestError, match="seed must be an integer"):
        SamplingParams(seed=np.bool_(True)).validate()


def test_a_repetition_penalty_past_float32s_reach_is_refused() -> None:
    """1e39 is finite in Python and infinite in the engine's float32 state: a row of seen tokens became NaN."""
    SamplingParams(audio_repetition_penalty=1000).validate()
    for value in (1e39, 1001):
        with pytest.raises(InvalidRequestError, match=r"audio_repetition_penalty must be in 0.001..1000"):
            SamplingParams(audio_repetition_penalty=value).validate()


@pytest.mark.parametrize("config, message", [
    (dict(max_running="4"), "EngineConfig.max_running must be an integer >= 1, got '4'"),
    (dict(max_chunk_frames=0), "EngineConfig.max_chunk_frames must be an integer >= 1, got 0"),
    (dict(threaded="no"), "EngineConfig.threaded must be True or False"),
    (dict(max_queued=-1), "EngineConfig.max_queued must be an integer >= 0, got -1"),
    # 0 has no meaning of its own: every session was refused as if the engine were full
    (dict(max_sessions=0), "EngineConfig.max_sessions must be an integer >= 1, got 0"),
    # a request waiting for text keeps its decoder stream: waiting ones could hold every stream and a
    # finished request's final chunk never come
    (dict(max_running=2, codec_streams=1), "EngineConfig.codec_streams must be 0"),
    # unchecked, these failed at the first call (AttributeError, ZeroDivisionError) or ended every
    # request at once as "runaway"
    (dict(runaway=None), "EngineConfig.runaway must be a RunawayGuard, got None"),
    (dict(chunk_schedule=None), "EngineConfig.chunk_schedule must be a ChunkSchedule, got None"),
    (dict(chunk_schedule=ChunkSchedule(first=1.5)), "chunk sizes must lie in 1..25 frames"),
    (dict(runaway=RunawayGuard(repeat_frames=0)), "RunawayGuard.repeat_frames must be an integer >= 1, got 0"),
    (dict(runaway=RunawayGuard(min_frames=-500)), "RunawayGuard.min_frames must be an integer >= 1, got -500"),
    (dict(runaway=RunawayGuard(repeat_codebooks=0)), "RunawayGuard.repeat_codebooks must be an integer >= 1"),
    (dict(runaway=RunawayGuard(frames_per_token=-1)), "RunawayGuard.frames_per_token must be a positive number"),
    (dict(runaway=RunawayGuard(frame_rate=0)), "RunawayGuard.frame_rate must be a positive number, got 0"),
    (dict(runaway=RunawayGuard(enabled="yes")), "RunawayGuard.enabled must be True or False"),
])
def test_engine_config_mistakes_are_refused_before_the_model_loads(delay_model_dirs, config, message,
                                                                    monkeypatch) -> None:
    """They were reported only after the whole model had loaded."""
    monkeypatch.setattr("mossserve.api.load_talker", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
        TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                            engine_config=EngineConfig(**config))


def test_an_engine_config_that_is_not_one_is_refused(delay_model_dirs, monkeypatch) -> None:
    """A dict failed with AttributeError ('dict' object has no attribute 'validate') after the model loaded."""
    monkeypatch.setattr("mossserve.api.load_talker", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(InvalidRequestError, match=r"engine_config must be an EngineConfig, got dict; write Engine"):
        TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], engine_config={"max_running": 2})


def test_async_engine_takes_the_task_as_tts_does(delay_model_dirs) -> None:
    engine = AsyncEngine.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny", task="dialogue")
    try:
        assert engine.tts.talker.default_task == "dialogue"
    finally:
        engine.close()


def test_none_in_a_list_of_sampling_settings_is_the_models(delay_tts) -> None:
    """None means the model's settings everywhere else; in a list it was refused."""
    tts = delay_tts("tiny_nvq16")
    prompts = [tts.prompt("Hello."), tts.prompt("A second one.")]
    mixed = tts.generate(prompts, [None, SamplingParams.greedy()], 20)
    assert mixed[0].finish_reason != "error"
    assert np.array_equal(mixed[1].frames, tts.generate(prompts[1:], SamplingParams.greedy(), 20)[0].frames)


def test_an_abort_from_elsewhere_raises_in_a_stream_and_ends_an_async_stream(delay_model_dirs) -> None:
    """docs/engine.md: `TTS.stream` raises RequestAborted (a loop collecting audio never takes a cut
    result for a whole one); an AsyncEngine stream, aborted by id, ends with an "aborted" final chunk."""
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(threaded=False))  # aborted at a chosen step
    request = SpeechRequest(input="A sentence long enough to abort after its first chunk.")

    async def aborted_async() -> list:
        engine = AsyncEngine(tts)
        stream = await engine.submit(request, SamplingParams.greedy(), max_new_frames=200)
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            engine.abort(stream.request_id)
        return chunks

    try:
        with pytest.raises(RequestAborted, match="was aborted"):
            for chunk in tts.stream(request, SamplingParams.greedy(), 200):
                tts.engine.abort(chunk.request_id)
        chunks = asyncio.run(aborted_async())
        assert chunks[-1].final and chunks[-1].finish_reason == "aborted" and chunks[-1].error is None
        assert tts.stats()["live"] == 0
    finally:
        tts.close()


def test_auto_dtype_reports_the_dtype_chosen(delay_model_dirs) -> None:
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny", dtype="auto")
    try:
        weights = {str(w.dtype).removeprefix("torch.") for w in tts.talker.decode_weights().values()}
        assert tts.dtype in ("float32", "bfloat16") and tts.dtype in weights
    finally:
        tts.close()


def test_an_unthreaded_async_engine_is_stepped_by_its_streams(delay_model_dirs) -> None:
    """Nothing else steps it: a stream waited forever for its first chunk."""
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(threaded=False))
    expected = tts.generate_codes("Hello.", SamplingParams.greedy(), 20)

    async def both() -> list[np.ndarray]:
        engine = AsyncEngine(tts)

        async def one() -> np.ndarray:
            return [c async for c in engine.submit("Hello.", SamplingParams.greedy(), max_new_frames=20)][-1].generation.frames

        return await asyncio.gather(one(), one())

    try:
        for frames in asyncio.run(both()):
            assert np.array_equal(frames, expected)
        assert tts.stats()["live"] == 0
    finally:
        tts.close()


def test_a_codec_that_does_not_fit_raises_at_the_call(delay_model_dirs) -> None:
    """A Fish model given the MOSS codec: the call raises CheckpointError (each request failed at its
    first codec round, the error wrapped as a MossServeError)."""
    from fish_cases import FISH_DIR

    from mossserve import CheckpointError

    tts = TTS.from_pretrained(FISH_DIR, codec=CODEC_DIR / "tiny")
    try:
        with pytest.raises(CheckpointError, match="does not fit"):
            tts.synthesize("Hello.", max_new_frames=2)
        with pytest.raises(CheckpointError, match="does not fit"):
            next(iter(tts.stream("Hello.", max_new_frames=2)))
        assert tts.stats()["live"] == 0
    finally:
        tts.close()


class StepsToTheEndFirst:
    """A TTS's stepping lock that another caller takes first, stepping the engine until nothing is left."""

    def __init__(self, tts: TTS) -> None:
        self._lock, self._engine, self._first = tts._stepping, tts.engine, True

    def __enter__(self) -> bool:
        if self._first:
            self._first = False
            self._engine.run_until_idle()
        return self._lock.__enter__()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.__exit__(*exc_info)


def test_a_caller_refused_while_another_empties_an_unthreaded_engine_asks_again(delay_model_dirs) -> None:
    """One request at a time, two callers: refused while the other's request was in, the call waited
    for the stepping lock, whose holder stepped that request to its end; it then saw nothing to step
    and raised EngineFullError('the engine is full of requests that nothing runs'), with room free."""
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(threaded=False, max_running=1, max_queued=0))
    try:
        prompt = tts.prompt("Two callers.")
        theirs: list = []
        tts.engine.add_request(prompt, SamplingParams.greedy(), theirs.append, max_new_frames=6, decode_audio=False)
        tts._stepping = StepsToTheEndFirst(tts)
        ours = tts.generate([prompt], SamplingParams.greedy(), 6)
        assert theirs[-1].final and np.array_equal(ours[0].frames, theirs[-1].generation.frames)
    finally:
        tts.close()


def test_wait_idle_steps_an_unthreaded_engine_through_the_abort_of_a_stream_left_early(delay_model_dirs) -> None:
    """Nothing processed the abort until a later call stepped the engine: after wait_idle the request
    still held its slot and codec stream."""
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(threaded=False))
    try:
        stream = tts.stream("Stop listening after the first chunk.", SamplingParams.greedy(), 60)
        assert not next(stream).final
        stream.close()
        tts.wait_idle()
        stats = tts.stats()
        assert stats["aborted"] == 1 and stats["finished"] == 0
        assert [stats[k] for k in ("live", "running", "cache_slots_used", "codec_streams_open")] == [0, 0, 0, 0]
    finally:
        tts.close()


def test_leaving_an_async_with_block_aborts_its_stream_and_closes_its_engine(delay_model_dirs) -> None:
    """`break` out of `async for` over a stream still held closes nothing (the README's
    `stream = await engine.submit(...)` ran on to its cap): `async with` aborts the request on leaving,
    awaited first or not, and an AsyncEngine used so is closed on leaving."""
    request = SpeechRequest(input="Stop listening after the first chunk.")

    async def main() -> tuple[AsyncEngine, list, dict]:
        held = []  # so that no stream is collected: only leaving the block aborts
        async with AsyncEngine.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny") as engine:
            async with engine.submit(request, SamplingParams.greedy(), max_new_frames=200) as stream:
                async for _ in stream:
                    break
            held.append(stream)
            async with await engine.submit(request, SamplingParams.greedy(), max_new_frames=200) as stream:
                async for _ in stream:
                    break
            held.append(stream)
            await asyncio.to_thread(engine.tts.wait_idle)
            stats = engine.stats()
        return engine, held, stats

    engine, held, stats = asyncio.run(main())
    assert stats["aborted"] == 2 and stats["finished"] == 0 and stats["live"] == 0
    assert engine.tts.closed


def test_a_schedule_that_is_not_a_chunk_schedule_is_refused(delay_tts) -> None:
    """A dict failed in the engine with AttributeError ('dict' object has no attribute 'validate')."""
    tts = delay_tts("tiny_nvq16")
    refused = r"schedule must be a ChunkSchedule, got dict; write ChunkSchedule\(\*\*\.\.\.\)"

    async def submitted() -> None:
        await AsyncEngine(tts).submit("Hi.", schedule={"first": 2})

    with pytest.raises(InvalidRequestError, match=refused):
        tts.run([tts.prompt("Hi.")], schedule={"first": 2, "rest": 4})
    with pytest.raises(InvalidRequestError, match=refused):
        next(tts.stream("Hi.", schedule={"first": 2}))
    with pytest.raises(InvalidRequestError, match=refused):
        asyncio.run(submitted())
    with pytest.raises(InvalidRequestError, match="schedule must be a ChunkSchedule, got str$"):
        tts.run([tts.prompt("Hi.")], schedule="fast")
    assert tts.stats()["live"] == 0


def test_a_sampling_override_that_is_no_setting_is_named(delay_tts) -> None:
    """It raised a plain TypeError from dataclasses.replace."""
    with pytest.raises(InvalidRequestError, match=r"unknown sampling setting\(s\) foo, topk; SamplingParams has "
                                                  r"text_temperature, "):
        delay_tts("tiny_nvq16").sampling(topk=5, foo=1)


def test_submit_outside_an_event_loop_says_where_to_call_it(delay_tts) -> None:
    """It raised asyncio's own error (or made a loop nobody ran) and warned that a coroutine was never awaited."""
    import gc
    import warnings

    engine = AsyncEngine(delay_tts("tiny_nvq16"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="AsyncEngine.submit must be called from a running event loop"):
            engine.submit("Hi.")
        gc.collect()
    assert [str(w.message) for w in caught] == []


def test_a_context_full_refusal_pickles_with_its_figures() -> None:
    """It carries its figures, not its message, as arguments: pickling (a final chunk's refusal
    crossing processes) failed on its __init__."""
    import pickle

    from mossserve.errors import ContextFullError

    error = pickle.loads(pickle.dumps(ContextFullError(5, 6, 10)))
    assert (error.held, error.rows, error.max_len, str(error)) == (5, 6, 10, str(ContextFullError(5, 6, 10)))


def test_a_stream_read_in_another_event_loop_says_so(delay_tts) -> None:
    """Its chunks go to the loop that submitted it: read in another, it waited forever (and, that
    loop closed, the engine aborted the request without a word)."""
    engine = AsyncEngine(delay_tts("tiny_nvq16"))

    async def submit():
        return await engine.submit("Read me elsewhere.", SamplingParams.greedy(), max_new_frames=40)

    async def read(stream) -> None:
        async for _ in stream:
            pass

    stream = asyncio.run(submit())
    with pytest.raises(RuntimeError, match="read in the event loop that submitted it"):
        asyncio.run(asyncio.wait_for(read(stream), 60))
    del stream
    engine.tts.wait_idle()
    assert engine.stats()["live"] == 0


@pytest.mark.parametrize("empty", [0, "", {}, []])
def test_an_empty_sampling_that_is_no_sampling_params_is_refused(delay_tts, empty) -> None:
    """`sampling or default` took any falsy value (an empty settings dict from a config) for the default."""
    tts = delay_tts("tiny_nvq16")
    message = "sampling must be a SamplingParams"
    # [] is a list of settings: refused by its count
    with pytest.raises(InvalidRequestError, match=f"{message}|0 sampling settings for 1 prompts"):
        tts.generate_codes("Hi.", empty)
    with pytest.raises(InvalidRequestError, match=message):
        list(tts.stream("Hi.", empty))

    async def submit() -> None:
        await AsyncEngine(tts).submit("Hi.", empty)

    with pytest.raises(InvalidRequestError, match=message):
        asyncio.run(submit())
    assert tts.stats()["live"] == 0
