"""Fish S2 Pro behind the HTTP API: plain speech, a voice uploaded and then used (its audio encoded
by the Fish codec as the reference does, without the MOSS loudness step; its transcript the
reference text), inline references, SSE streaming, and special tokens refused with a 400."""
from __future__ import annotations

import base64
import json
from contextlib import closing

import httpx
import numpy as np
import pytest
import torch
from conftest import AUDIO_DIR
from fish_cases import FISH_DIR
from server_harness import serve_model

from mossserve.api import TTS
from mossserve.audio import read_audio
from mossserve.audio.load import load_audio
from mossserve.speech_request import SpeechRequest

REFERENCE = AUDIO_DIR / "reference_zh.wav"
TRANSCRIPT = "A reference line for the voice."


@pytest.fixture(scope="module")
def fish(tmp_path_factory):
    with closing(TTS.from_pretrained(FISH_DIR)) as tts, serve_model(tts, tmp_path_factory.mktemp("fish")) as url:
        yield tts, url


def greedy(tts):
    return tts.talker.default_sampling().with_overrides(audio_temperature=0.0, text_temperature=0.0)


def pcm(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.frombuffer(response.content, dtype="<i2").astype(np.float32) / 32768


def assert_pcm_equals(samples: np.ndarray, expected: np.ndarray) -> None:
    assert len(samples) == expected.shape[-1]
    np.testing.assert_allclose(samples, np.clip(expected[0], -1, 1), atol=2 / 32768)


def test_models_and_plain_speech(fish) -> None:
    tts, url = fish
    assert httpx.get(url + "/v1/models").json()["data"][0]["mossserve"]["family"] == "fish"
    response = httpx.post(url + "/v1/audio/speech", json={"input": "Hello world.", "response_format": "pcm",
                                                          "temperature": 0}, timeout=120)
    assert_pcm_equals(pcm(response), tts.synthesize(SpeechRequest(input="Hello world."), greedy(tts)).samples)


@pytest.mark.parametrize("format, body, rate", [
    ("pcm", {}, "44100"), ("pcm", {"stream": True}, "44100"), ("pcm", {"stream_format": "sse"}, "44100"),
    ("opus", {}, "48000"),  # Ogg Opus stores no 44.1 kHz: resampled
], ids=["pcm", "pcm-stream", "pcm-sse", "opus"])
def test_every_audio_response_says_its_sample_rate(fish, format: str, body: dict, rate: str) -> None:
    """pcm says nothing of its rate, and OpenAI's clients play it at 24 kHz: Fish S2 Pro's 44.1 kHz
    speech came out almost twice as slow."""
    _, url = fish
    request = {"input": "Hi.", "response_format": format, "max_new_tokens": 3, **body}
    with httpx.stream("POST", url + "/v1/audio/speech", json=request, timeout=120) as response:
        data = response.read()
    assert response.status_code == 200 and response.headers["x-sample-rate"] == rate
    if format == "opus":
        assert str(read_audio(data)[1]) == rate


def test_an_uploaded_voice_is_encoded_as_is_and_used_with_its_transcript(fish) -> None:
    tts, url = fish
    with REFERENCE.open("rb") as f:
        r = httpx.post(url + "/v1/audio/voices", data={"name": "anna", "transcript": TRANSCRIPT},
                       files={"file": ("anna.wav", f, "audio/wav")}, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["frames"] == 68 and r.json()["codebooks"] == 10 and r.json()["sample_rate"] == 44100
    samples = load_audio(REFERENCE, tts.codec.sample_rate, channels=1)
    with torch.inference_mode():
        direct = tts.codec.encode(torch.from_numpy(samples)).numpy()  # (10, F): no loudness normalisation
    codes = tts.speakers.encode(REFERENCE)
    assert np.array_equal(codes, direct.T)
    text = "<|speaker:0|>Nice to meet you."
    response = httpx.post(url + "/v1/audio/speech", json={"input": text, "voice": "anna", "response_format": "pcm",
                                                          "temperature": 0}, timeout=120)
    expected = tts.synthesize(SpeechRequest(input=text, voice=codes, reference_text=TRANSCRIPT), greedy(tts))
    assert_pcm_equals(pcm(response), expected.samples)
    inline = httpx.post(url + "/v1/audio/speech", json={
        "input": text, "ref_audio": base64.b64encode(REFERENCE.read_bytes()).decode(), "ref_text": TRANSCRIPT,
        "response_format": "pcm", "temperature": 0}, timeout=120)
    assert_pcm_equals(pcm(inline), expected.samples)


def test_a_voice_without_its_transcript_is_refused_naming_where_it_came_from(fish) -> None:
    """Fish clones from audio and transcript together. A stored voice named as ref_audio brings its
    transcript as it does as voice (it was dropped); one stored without a transcript, or audio sent
    without ref_text, is a 400 on ref_text that says which (it said "needs voice and ref_text")."""
    tts, url = fish
    for name, transcript in (("bea", TRANSCRIPT), ("cid", None)):
        with REFERENCE.open("rb") as f:
            r = httpx.post(url + "/v1/audio/voices", data={"name": name, **({"transcript": transcript} if transcript else {})},
                           files={"file": ("v.wav", f, "audio/wav")}, timeout=120)
        assert r.status_code == 201, r.text
    text = "<|speaker:0|>Nice to meet you."
    by_voice = httpx.post(url + "/v1/audio/speech", json={"input": text, "voice": "bea", "response_format": "pcm",
                                                          "temperature": 0}, timeout=120)
    by_ref_audio = httpx.post(url + "/v1/audio/speech", json={"input": text, "ref_audio": "bea", "response_format": "pcm",
                                                              "temperature": 0}, timeout=120)
    assert by_ref_audio.status_code == 200, by_ref_audio.text
    assert pcm(by_ref_audio).tobytes() == pcm(by_voice).tobytes()
    speaker = httpx.post(url + "/v1/audio/speech", json={"input": text, "speakers": [{"ref_audio": "bea"}],
                                                         "response_format": "pcm", "temperature": 0}, timeout=120)
    assert speaker.status_code == 200, speaker.text

    inline = base64.b64encode(REFERENCE.read_bytes()).decode()
    for body, param, message in [
            ({"voice": "cid"}, "ref_text", "the stored voice 'cid' has no transcript"),
            ({"ref_audio": "cid"}, "ref_text", "the stored voice 'cid' has no transcript"),
            ({"ref_audio": inline}, "ref_text", "ref_text is missing"),
            ({"voice": "bea", "ref_text": "  "}, "ref_text", "ref_text is empty"),
            ({"speakers": [{"voice": "bea"}, {"voice": "cid"}]}, "speakers[1].ref_text",
             "the stored voice 'cid' has no transcript"),
            ({"speakers": [{"ref_audio": inline}]}, "speakers[0].ref_text", "speakers[0].ref_text is missing")]:
        r = httpx.post(url + "/v1/audio/speech", json={"input": text, **body}, timeout=120)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"].startswith(message), error
        assert f"give {param}" in error["message"]


def test_fish_refusals_name_the_field_the_client_sent(fish) -> None:
    """They named ref_text for a speaker's transcript, voice for a speaker's missing voice,
    duration_tokens for duration_seconds, and nothing for repetition_penalty."""
    _, url = fish
    inline = base64.b64encode(REFERENCE.read_bytes()).decode()
    text = "<|speaker:0|>Hi."
    for body, param, message in [
            ({"speakers": [{"ref_audio": inline, "ref_text": "<|im_end|>"}]}, "speakers[0].ref_text",
             "speakers[0].ref_text contains the special token(s) <|im_end|>"),
            ({"speakers": [{"ref_text": "just text"}]}, "speakers[0].voice", "speakers[0].voice is missing"),
            ({"duration_seconds": 2}, "duration_seconds", "duration_seconds is not used by Fish S2 Pro"),
            ({"repetition_penalty": 1.2}, "repetition_penalty", "repetition_penalty 1.2: Fish S2 Pro applies no")]:
        r = httpx.post(url + "/v1/audio/speech", json={"input": text, **body}, timeout=120)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"].startswith(message), error


def test_a_transcript_the_model_refuses_is_refused_at_upload(fish) -> None:
    """It was stored, and then every request that used the voice failed on its ref_text."""
    _, url = fish
    with REFERENCE.open("rb") as f:
        r = httpx.post(url + "/v1/audio/voices", data={"name": "dora", "transcript": "Hello <|im_end|> there"},
                       files={"file": ("v.wav", f, "audio/wav")}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "transcript", r.text
    assert "transcript contains the special token(s) <|im_end|>" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/audio/voices/dora").status_code == 404
    with REFERENCE.open("rb") as f:  # a transcript that is speaker tags alone says nothing
        r = httpx.post(url + "/v1/audio/voices", data={"name": "dora", "transcript": "<|speaker:0|> <|speaker:1|>"},
                       files={"file": ("v.wav", f, "audio/wav")}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "transcript", r.text
    assert "transcript is speaker tags alone" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/audio/voices/dora").status_code == 404


def test_sse_stream_carries_the_whole_responses_audio(fish) -> None:
    _, url = fish
    body = {"input": "Streaming this sentence.", "response_format": "pcm", "temperature": 0}
    whole = httpx.post(url + "/v1/audio/speech", json=body, timeout=120).content
    pieces, done = [], None
    with httpx.stream("POST", url + "/v1/audio/speech", json={**body, "stream": True, "stream_format": "sse"},
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "speech.audio.delta":
                    pieces.append(base64.b64decode(event["audio"]))
                elif event["type"] == "speech.audio.done":
                    done = event
    assert done is not None and b"".join(pieces) == whole


def test_special_tokens_in_the_input_are_a_400(fish) -> None:
    _, url = fish
    r = httpx.post(url + "/v1/audio/speech", json={"input": "Hi <|im_end|> there."}, timeout=60)
    assert r.status_code == 400 and "<|im_end|>" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/audio/speech", json={"input": "Hi.", "instructions": "whisper"}, timeout=60)
    assert r.status_code == 400 and "instructions" in r.json()["error"]["message"]


def test_sse_usage_counts_every_text_batchs_prompt_rows(fish) -> None:
    """A text split into several batches is prefilled batch by batch: input_tokens counts them all
    (it counted the first batch's rows only)."""
    tts, url = fish
    text = "<|speaker:0|>Hello there, how are you today?<|speaker:1|>I am fine, thanks. And you?<|speaker:0|>Good, good."
    prompt = tts.prompt(SpeechRequest(input=text, chunk_length=20))
    assert prompt.later_rows > 0
    body = {"input": text, "chunk_length": 20, "seed": 5, "stream": True, "stream_format": "sse", "response_format": "pcm"}
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] == len(prompt.rows) + prompt.later_rows
