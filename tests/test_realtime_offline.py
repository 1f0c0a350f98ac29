"""The Realtime offline path (README §5.8) through the engine: the reference's batch goldens per request,
batch invariance, seeded replay in a crowd, and the TTS API."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fixed_shape_engine
from realtime_cases import REALTIME_DIR, golden, golden_json, realtime_family

from mossserve.api import TTS
from mossserve.config import EngineConfig
from mossserve.engine.engine import Engine
from mossserve.speech_request import SpeechRequest

CASES = {"offline_batch": None, "offline_batch_max_length3": 4}  # the engine's cap counts frames: max_length + 1


def greedy():
    """The goldens' settings: do_sample False, repetition penalty 1.1 over a 50-frame window (active in greedy)."""
    return realtime_family().default_sampling().with_overrides(audio_temperature=0.0)


def requests(case: str) -> list[SpeechRequest]:
    meta = golden_json("generation")["runs"][case]
    voices = [golden("prompts")["codes.voice"].numpy(), None]
    return [SpeechRequest(input=text, voice=voice) for text, voice in zip(meta["texts"], voices)]


class Outbox:
    def __init__(self) -> None:
        self.chunks: dict[str, list] = {}

    def sink(self, chunk) -> None:
        self.chunks.setdefault(chunk.request_id, []).append(chunk)

    def generation(self, request_id: str):
        final = self.chunks[request_id][-1]
        assert final.final
        return final.generation


def check(case: str, b: int, generation) -> None:
    g = golden("generation")
    tokens, raw, fed = (g[f"{case}.{b}.tokens"].numpy(), g[f"{case}.raw_frames"].numpy()[b],
                        g[f"{case}.step_input_rows"].numpy()[b])
    assert np.array_equal(generation.frames, tokens)
    steps = len(generation.rows)  # every frame computed for this request, the EOS frame included
    assert np.array_equal(generation.rows[:, 1:], raw[:steps])
    fed_rows = min(steps, len(fed))  # the reference feeds each row but the last one
    assert np.array_equal(generation.rows[:fed_rows], fed[:fed_rows])
    assert generation.finish_reason == ("length" if CASES[case] else "stop")


def run(engine: Engine, case: str, names: list[str] | None = None, **extra) -> Outbox:
    fam, outbox = engine.family, Outbox()
    for b, request in enumerate(requests(case)):
        if names is None or f"{case}/{b}" in names:
            engine.add_request(fam.build_prompt(request), greedy(), outbox.sink, request_id=f"{case}/{b}",
                               max_new_frames=CASES[case], decode_audio=False, **extra)
    engine.run_until_idle()
    return outbox


@pytest.mark.parametrize("case", list(CASES))
def test_reference_batch_goldens_together(case: str) -> None:
    outbox = run(Engine(realtime_family(), None, EngineConfig(threaded=False, max_running=4)), case)
    for b in range(2):
        check(case, b, outbox.generation(f"{case}/{b}"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("b", [0, 1])
def test_reference_batch_goldens_alone(case: str, b: int) -> None:
    """Each row of the reference's left-padded batch is reproduced by the request alone (README §8.8)."""
    engine = Engine(realtime_family(), None, EngineConfig(threaded=False, max_running=1))
    check(case, b, run(engine, case, names=[f"{case}/{b}"]).generation(f"{case}/{b}"))


def test_goldens_among_staggered_sampled_decoys_and_pieced_prefill() -> None:
    """Requests join at different steps, sampled decoys run and are aborted around them, prompts are prefilled
    in 16-row pieces: the golden requests still equal the goldens."""
    fam = realtime_family()
    engine = Engine(fam, None, EngineConfig(threaded=False, max_running=6, prefill_tokens=16))
    outbox = Outbox()
    pending = [(case, b, r) for case in CASES for b, r in enumerate(requests(case))]
    step = 0
    while pending or engine.stats()["live"]:
        if pending and step % 2 == 0:
            case, b, request = pending.pop(0)
            prompt = fam.build_prompt(request)
            engine.add_request(prompt, greedy(), outbox.sink, request_id=f"{case}/{b}", max_new_frames=CASES[case],
                               decode_audio=False)
            decoy = engine.add_request(prompt, fam.default_sampling().with_overrides(seed=step), outbox.sink,
                                       request_id=f"decoy-{step}", max_new_frames=8, decode_audio=False)
            if step % 4 == 0:
                engine.abort(decoy.id)
        engine.step()
        step += 1
    for case in CASES:
        for b in range(2):
            check(case, b, outbox.generation(f"{case}/{b}"))
    assert engine.stats()["cache_slots_used"] == 0


def fixed_shape_goldens(fam, mode: str) -> None:
    """The backbone step and the local transformer's 16 positions at fixed shapes (2 rows padded to 4)
    give the goldens; `mode` static runs them eagerly, graphs replays CUDA graphs."""
    engine = fixed_shape_engine(fam, 4, mode, (1, 4))
    outbox = run(engine, "offline_batch")
    for b in range(2):
        check("offline_batch", b, outbox.generation(f"offline_batch/{b}"))
    calls = engine.runner.state.depth_calls
    assert 4 in calls._shapes and calls.graphs == (mode == "graphs")
    if mode == "graphs":
        assert set(calls._shapes[4].graphs) == set(range(fam.codebooks))


def test_static_shape_decode_matches_the_goldens() -> None:
    fixed_shape_goldens(realtime_family(), "static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_the_goldens() -> None:
    from mossserve.models.config_utils import read_json
    from mossserve.models.moss_realtime_family import load_realtime

    config = read_json(REALTIME_DIR / "config.json")
    fam = load_realtime(REALTIME_DIR, str(REALTIME_DIR), config, torch.device("cuda"), torch.float32)
    fixed_shape_goldens(fam, "graphs")


def test_seeded_sampled_request_is_the_same_alone_and_in_a_crowd() -> None:
    fam = realtime_family()
    prompt = fam.build_prompt(requests("offline_batch")[0])
    seeded = fam.default_sampling().with_overrides(seed=2024)

    def frames(crowd: int):
        engine = Engine(fam, None, EngineConfig(threaded=False, max_running=crowd + 1))
        outbox = Outbox()
        for i in range(crowd):
            engine.add_request(prompt, fam.default_sampling().with_overrides(seed=i), outbox.sink,
                               request_id=f"other-{i}", max_new_frames=12, decode_audio=False)
        engine.add_request(prompt, seeded, outbox.sink, request_id="seeded", max_new_frames=12, decode_audio=False)
        engine.run_until_idle()
        return outbox.generation("seeded").rows

    alone = frames(0)
    assert np.array_equal(alone, frames(3))
    assert not np.array_equal(alone[:, 1:], frames_greedy(prompt))  # it did sample


def frames_greedy(prompt) -> np.ndarray:
    engine = Engine(realtime_family(), None, EngineConfig(threaded=False, max_running=1))
    outbox = Outbox()
    engine.add_request(prompt, greedy(), outbox.sink, request_id="g", max_new_frames=12, decode_audio=False)
    engine.run_until_idle()
    return outbox.generation("g").rows[:, 1:]


def test_tts_api_generate_codes() -> None:
    tts = TTS(realtime_family(), engine_config=EngineConfig(max_running=2))
    try:
        for b, request in enumerate(requests("offline_batch")):
            codes = tts.generate_codes(request, greedy())
            assert np.array_equal(codes, golden("generation")[f"offline_batch.{b}.tokens"].numpy())
    finally:
        tts.close()
