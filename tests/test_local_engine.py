"""The Local family on the engine (continuous batching, streaming codec) through `TTS`: every
fixture request in one batch equals its golden and its one-at-a-time run, mixed depths share a
batch, and reduced-depth audio is decoded with K quantizers."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import fixed_shape_engine
from local_cases import CODEC_DIR, generation_runs, get_run, make_model_dir

from mossserve.api import TTS
from mossserve.models.moss_local_family import LOCAL_SAMPLING, MossLocalFamily
from mossserve.sampling import SamplingParams
from mossserve.speech_request import SpeechRequest


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    tts = TTS.from_pretrained(make_model_dir(tmp_path_factory.mktemp("local") / "model"), codec=CODEC_DIR)
    yield tts
    tts.close()


def fixture_requests(tts, depths: list[int] | None = None):
    """(prompt, sampling, cap, run, sequence) for every sequence of every generation golden."""
    out = []
    for run in generation_runs():
        for b, rows in enumerate(run.prompts):
            depth = run.depth if depths is None else depths[len(out) % len(depths)]
            out.append((tts.talker.with_depth(tts.talker.prompt_from_rows(rows), depth), run.sampling,
                        run.max_new_frames, run, b))
    return out


def run_all(tts, requests, together: bool):
    if together:
        return [g for g, _ in tts.run([p for p, *_ in requests], [s for _, s, *_ in requests],
                                      max_new_frames=100, decode_audio=False)]
    return [tts.generate([p], s, 100)[0] for p, s, *_ in requests]


def test_loads_as_the_local_family(tts) -> None:
    assert isinstance(tts.talker, MossLocalFamily)
    assert tts.talker.default_sampling() == LOCAL_SAMPLING
    assert tts.talker.model.language_model.embed_tokens is None  # stored upstream, never used: freed


def test_every_fixture_request_in_one_engine_batch(tts) -> None:
    requests = fixture_requests(tts)
    caps = [cap for _, _, cap, *_ in requests]
    together = [g for g, _ in tts.run([p for p, *_ in requests], [s for _, s, *_ in requests],
                                      decode_audio=False, max_new_frames=max(caps))]
    alone = [tts.generate([p], s, cap)[0] for p, s, cap, *_ in requests]
    for (prompt, _, cap, run, b), t, a in zip(requests, together, alone):
        # One cap for the whole call: a request capped lower alone is a prefix of its batched run.
        assert np.array_equal(t.rows[: len(a.rows)], a.rows) and np.array_equal(t.frames[: len(a.frames)], a.frames)
        n = min(len(t.rows), cap)
        rows = np.where(t.rows[:n] == -1, 0, t.rows[:n])
        assert np.array_equal(rows, run.frames[b, :n]), run.name
        stop = run.stop_frames[b]
        assert len(t.rows) >= (stop or cap)
        if stop is not None:
            assert len(t.rows) == stop and t.finish_reason == "stop"
        # Codes handed on: (F, K), the prefix frames first in continuation.
        assert t.frames.shape[1] == run.depth
        if run.codec_inputs and len(t.rows) == (stop or cap):
            assert np.array_equal(t.frames, run.codec_inputs[b][: run.depth, 0].T)


def test_mixed_depths_share_a_batch(tts) -> None:
    requests = fixture_requests(tts, depths=[32, 8, 1, 17, 3, 24])
    together = run_all(tts, requests, together=True)
    alone = run_all(tts, requests, together=False)
    for (prompt, *_), t, a in zip(requests, together, alone):
        assert t.frames.shape[1] == prompt.info["depth"]
        assert np.array_equal(t.rows, a.rows) and np.array_equal(t.frames, a.frames)
    assert len({t.frames.shape[1] for t in together}) == 6


def test_reduced_depth_audio_uses_k_quantizers(tts) -> None:
    """One synthesize_batch call with depth 8 and full depth: each decodes its own codebook count,
    equal to the offline decode of its (F, K) codes with K quantizers."""
    run = get_run("greedy_clone_depth8")
    deep = tts.talker.prompt_from_rows(run.prompts[0])
    shallow = tts.talker.with_depth(deep, 8)
    audios = tts.synthesize_batch([shallow, deep], SamplingParams.greedy())
    assert audios[0].codes.shape == (6, 8) and audios[1].codes.shape[1] == 32
    for audio in audios:
        with torch.inference_mode():
            k = audio.codes.shape[1]
            offline = tts.codec.decode(torch.from_numpy(audio.codes.T.copy()), n_quantizers=k).numpy()
        np.testing.assert_allclose(audio.samples, offline, rtol=0, atol=1e-4)
    with torch.inference_mode():
        upstream_bug = tts.codec.decode(torch.from_numpy(run.codec_inputs[0][:, 0].copy())).numpy()
    assert np.abs(upstream_bug - audios[0].samples).max() > 1e-3  # zeros above K are not "no codebook"


def test_continuation_audio_starts_after_the_prefix(tts) -> None:
    run = get_run("greedy_continuation")
    audio = tts.synthesize(tts.talker.prompt_from_rows(run.prompts[0]), SamplingParams.greedy())
    spf = tts.codec.samples_per_frame
    assert audio.codes.shape == (11, 32) and audio.generation.start_length == 6
    assert audio.samples.shape[-1] == 5 * spf
    with torch.inference_mode():
        offline = tts.codec.decode(torch.from_numpy(audio.codes.T.copy())).numpy()[:, 6 * spf :]
    np.testing.assert_allclose(audio.samples, offline, rtol=0, atol=1e-4)


def test_speech_request_with_depth(tts) -> None:
    """A SpeechRequest's depth (the API and server form of --depth) gives (F, K) codes."""
    run = get_run("greedy_clone")
    from local_cases import goldens

    voice = goldens("prompts")["ref.clone"]
    request = SpeechRequest(input="Please read this sentence in the reference voice.", voice=voice)
    codes = tts.generate_codes(request, SamplingParams.greedy())
    assert np.array_equal(codes, run.frames[0, :, 1:])
    request.depth = 8
    shallow = tts.generate_codes(request, SamplingParams.greedy())
    prompt = tts.talker.with_depth(tts.talker.prompt_from_rows(run.prompts[0]), 8)
    assert shallow.shape[1] == 8 and np.array_equal(shallow, tts.generate([prompt], SamplingParams.greedy())[0].frames)


def test_every_chunk_of_a_reduced_depth_holds_k_codebooks(tts) -> None:
    """The final chunk (and an empty Generation) said n_vq wide at depth K: a stream's codes did not join."""
    request = SpeechRequest(input="Hello world", depth=8)
    chunks = list(tts.stream(request, SamplingParams.greedy()))
    assert len(chunks) > 1 and {c.codes.shape[1] for c in chunks} == {8}
    assert np.array_equal(np.concatenate([c.codes for c in chunks]), tts.generate_codes(request, SamplingParams.greedy()))
    ended = []
    handle = tts.engine.add_request(tts.prompt(request), SamplingParams.greedy(), ended.append)
    tts.engine.abort(handle.id)  # before its first frame
    tts.engine.wait_idle()
    final = next(c for c in ended if c.final)
    assert final.codes.shape == (0, 8) and final.generation.frames.shape == (0, 8)


def test_a_prompt_at_a_reduced_depth_is_checked_below_it_and_skipped_above_it(tts) -> None:
    """The engine checks prompts it is given; a depth-K prompt holds SKIPPED above channel K."""
    from mossserve.errors import InvalidRequestError
    from mossserve.models.family import Prompt

    talker = tts.talker
    prompt = talker.with_depth(talker.prompt_from_rows(get_run("greedy_clone").prompts[0]), 8)
    talker.check_prompt(prompt)
    for column, value, message in [(9, 0, "must hold -1 \\(not embedded\\) in the channels above 8; it holds codes"),
                                   (8, -1, "audio codes must lie in"), (1, talker.config.audio_pad_code + 1, "audio codes")]:
        rows = prompt.rows.copy()
        rows[-1, column] = value
        with pytest.raises(InvalidRequestError, match=message):
            talker.check_prompt(Prompt(rows=rows, start_length=prompt.start_length, info=prompt.info))


def fixed_shape_run(fam, requests, mode: str) -> list:
    """Every request in one engine whose runner decodes at fixed shapes (`mode` static or graphs):
    the backbone step and the depth loop padded to 1, 2, 4, 8 or 12 rows."""
    slots = len(requests) + 2
    engine = fixed_shape_engine(fam, slots, mode, (1, 2, 4, 8))
    finals = {}
    for i, (prompt, sampling, cap, *_) in enumerate(requests):
        engine.add_request(prompt, sampling, lambda chunk: finals.update({chunk.request_id: chunk} if chunk.final else {}),
                           request_id=str(i), max_new_frames=cap, decode_audio=False)
    engine.run_until_idle()
    calls = engine.runner.state.depth_calls
    assert calls is not None and calls.graphs == (mode == "graphs")
    assert slots in calls._shapes  # up to 10 rows at a time, padded to 12
    return [finals[str(i)].generation for i in range(len(requests))]


def check_fixture_goldens(requests, generations) -> None:
    for (prompt, _, cap, run, b), g in zip(requests, generations):
        n = min(len(g.rows), cap)
        assert np.array_equal(np.where(g.rows[:n] == -1, 0, g.rows[:n]), run.frames[b, :n]), run.name
        assert g.frames.shape[1] == run.depth and len(g.rows) == (run.stop_frames[b] or cap)


def test_fixed_shape_depth_loop_gives_every_golden(tts) -> None:
    """The depth loop at fixed shapes (what CUDA graphs capture): every fixture request, greedy, the
    seeded sampled run and reduced depth, batched and padded, equals its golden."""
    requests = fixture_requests(tts)
    check_fixture_goldens(requests, fixed_shape_run(tts.talker, requests, "static"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_depth_loop_gives_every_golden(tts) -> None:
    fam = MossLocalFamily(copy.deepcopy(tts.talker.model).to("cuda"), tokenizer=None)
    requests = fixture_requests(tts)
    check_fixture_goldens(requests, fixed_shape_run(fam, requests, "graphs"))
