"""The Python API: loading (local, hub cache, demo), codec resolution, synthesis, dtypes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CODEC_DIR, DELAY_DIR, STREAMED_VS_WHOLE_ATOL, TOKENIZER_DIR
from delay_cases import generation_cases
from mossserve import InvalidRequestError, MossServeError, SamplingParams, SessionScript, SpeechRequest
from mossserve.api import DEFAULT_MOSS_CODEC, TTS, default_codec


def test_hub_id_resolves_from_the_hub_cache_offline(tmp_path: Path) -> None:
    """A hub id is fetched with huggingface_hub; here from a pre-filled cache with the hub offline."""
    snapshot = tmp_path / "hub" / "models--test-org--tiny-delay" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copy(DELAY_DIR / "tiny_nvq16" / file, snapshot / file)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / file, snapshot / file)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = "from mossserve import TTS; t = TTS.from_pretrained('test-org/tiny-delay'); print(t.talker.codebooks, t.talker.source)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "16" and "0123abcd" in proc.stdout
    missing = subprocess.run([sys.executable, "-c", "from mossserve import TTS; TTS.from_pretrained('test-org/absent')"],
                             capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "could not be fetched from the hub" in missing.stderr


def test_default_codec(tmp_path: Path) -> None:
    assert default_codec(None) == DEFAULT_MOSS_CODEC
    assert default_codec(tmp_path) == DEFAULT_MOSS_CODEC
    (tmp_path / "processor_config.json").write_text(json.dumps({"audio_tokenizer": {"audio_tokenizer_name_or_path": "org/codec"}}))
    assert default_codec(tmp_path) == "org/codec"
    (tmp_path / "codec").mkdir()
    (tmp_path / "codec" / "config.json").write_text("{}")
    assert default_codec(tmp_path) == tmp_path / "codec"


def test_demo_checkpoint_runs_without_a_model() -> None:
    tts = TTS.from_pretrained()
    assert tts.is_demo
    audio = tts.synthesize(SpeechRequest(input="Hello."), SamplingParams.greedy())
    assert audio.sample_rate == 24000 and audio.samples.shape == (1, 6 * 1920)


def test_synthesis_decodes_the_codes(delay_tts) -> None:
    tts = delay_tts("tiny_nvq16")
    audio = tts.synthesize(SpeechRequest(input="Hello."), SamplingParams.greedy())
    with torch.inference_mode():
        expected = tts.codec.decode(torch.from_numpy(audio.codes[:, :16].T.copy()), n_quantizers=16).numpy()
    assert audio.codes.shape == (8, 16)
    np.testing.assert_allclose(audio.samples, expected, atol=STREAMED_VS_WHOLE_ATOL)


def test_continuation_audio_drops_the_prefix_as_the_reference_does(delay_tts) -> None:
    """The reference cuts start_length / frames of the first segment (one frame more than the prefix);
    we cut exactly start_length frames of samples, which the reference's float cut equals or undercuts by one sample."""
    tts = delay_tts("tiny_nvq32")
    case = next(c for c in generation_cases(DELAY_DIR / "tiny_nvq32") if c.name == "continuation")
    audio = tts.synthesize(tts.talker.prompt_from_rows(case.prompts[0]), SamplingParams.greedy(), 77)
    generation = audio.generation
    assert generation.start_length == 13 and generation.segment_lengths == [18]
    with torch.inference_mode():
        whole = tts.codec.decode(torch.from_numpy(generation.frames.T.copy())).numpy()
    cut = 13 * tts.codec.samples_per_frame
    assert 0 <= cut - int(whole.shape[-1] * 13 / 18) <= 1
    np.testing.assert_allclose(audio.samples, whole[:, cut:], atol=STREAMED_VS_WHOLE_ATOL)
    assert audio.codes is generation.frames and audio.codes.shape[0] == 18  # the prefix's 13 frames included


def test_an_unthreaded_engine_is_stepped_by_the_call(delay_model_dirs, delay_tts) -> None:
    """With `EngineConfig(threaded=False)` nothing steps the engine but the call itself (it used to
    wait forever): synthesize, a batch and a stream give what the threaded engine gives."""
    from mossserve.config import EngineConfig

    threaded = delay_tts("tiny_nvq32")
    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq32"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(threaded=False))
    requests = [SpeechRequest(input="Hello."), SpeechRequest(input="A second, longer sentence.")]
    ours = tts.synthesize_batch(requests, SamplingParams.greedy(), 12)
    theirs = threaded.synthesize_batch(requests, SamplingParams.greedy(), 12)
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.codes, b.codes)
        np.testing.assert_allclose(a.samples, b.samples, atol=STREAMED_VS_WHOLE_ATOL)
    chunks = list(tts.stream(requests[1], SamplingParams.greedy(), 12))
    assert chunks[-1].final and np.array_equal(chunks[-1].generation.frames, theirs[1].codes)
    assert not tts.engine.has_work()


def test_run_session_takes_a_script_its_json_or_its_file(tmp_path: Path) -> None:
    """It took only a SessionScript, which nothing in `mossserve` exported; a dict gave AttributeError."""
    from realtime_cases import REALTIME_DIR

    data = {"turns": [{"input": "Hello there."}, {"input": "And again."}]}
    path = tmp_path / "session.json"
    path.write_text(json.dumps(data))
    tts = TTS.from_pretrained(REALTIME_DIR)
    try:
        greedy = tts.sampling(greedy=True)
        runs = [tts.run_session(script, greedy, 12, decode_audio=False)
                for script in (SessionScript.from_dict(data), data, path, str(path))]
        for run in runs[1:]:
            assert [g.frames.tolist() for g, _ in run] == [g.frames.tolist() for g, _ in runs[0]]
        with pytest.raises(InvalidRequestError, match="expected a SessionScript, a dict or a JSON file path, got list"):
            tts.run_session(data["turns"])
        for content, kind in ((data["turns"], "list"), (3, "int")):  # a file of another JSON: a TypeError
            path.write_text(json.dumps(content))
            with pytest.raises(InvalidRequestError, match=f"a session script is a JSON object with turns, got {kind}"):
                tts.run_session(path)
    finally:
        tts.close()


def test_a_codec_that_cannot_load_is_no_turns_failure(tmp_path: Path) -> None:
    """It loads as the first turn's audio is decoded, and its error was reported as `turns[0]: ...`."""
    from realtime_cases import REALTIME_DIR

    with TTS.from_pretrained(REALTIME_DIR, codec=tmp_path / "no-codec") as tts:
        with pytest.raises(MossServeError) as error:
            tts.run_session({"turns": [{"input": "Hello there."}]}, tts.sampling(greedy=True), 4)
    assert "no-codec" in str(error.value) and not str(error.value).startswith("turns[")


def test_a_tts_used_in_a_with_block_is_closed_on_leaving(delay_model_dirs) -> None:
    from mossserve import EngineClosedError

    with TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny") as tts:
        assert tts.generate_codes("Hi.", SamplingParams.greedy(), 5).shape[1] == 16
    assert tts.closed
    with pytest.raises(EngineClosedError):
        tts.stats()


def test_a_close_while_an_unthreaded_call_waits_for_room_is_a_closed_engine(delay_model_dirs, monkeypatch) -> None:
    """Closed between a refusal and the wait's check, an unthreaded engine is left full of the requests
    its shutdown stranded, with nothing to step: that was EngineFullError (back-pressure, which a
    caller retries), not EngineClosedError."""
    from mossserve import EngineClosedError
    from mossserve.config import EngineConfig

    tts = TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny",
                              engine_config=EngineConfig(threaded=False, max_running=1, max_queued=0))
    engine = tts.engine
    engine.add_request(tts.prompt("Hello."), SamplingParams.greedy(), lambda chunk: None, max_new_frames=4)
    engine.step()  # admitted: running, in the one slot
    assert engine.is_full() and engine.scheduler.running
    full = engine.is_full

    def closed_first() -> bool:  # another thread's close lands here
        tts.close()
        return full()

    monkeypatch.setattr(engine, "is_full", closed_first)
    with pytest.raises(EngineClosedError):
        tts._wait_for_room()
