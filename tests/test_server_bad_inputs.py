"""Malformed requests against a live server: each gets the right 4xx, an OpenAI-style error body
and a message that names what was wrong; the server keeps serving good requests afterwards."""
from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any, NamedTuple
from unittest.mock import ANY

import httpx
import numpy as np
import pytest
import soundfile as sf
from server_harness import live_server

SPEECH = "/v1/audio/speech"
VOICES = "/v1/audio/voices"
MAX_INPUT_CHARS = 200
MAX_BODY_BYTES = 200_000
JSON = {"content-type": "application/json"}
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large"}


@pytest.fixture(scope="module")
def server(demo_tts, tmp_path_factory):
    from mossserve.serve import ServerSettings, create_app

    settings = ServerSettings(data_dir=tmp_path_factory.mktemp("bad_inputs"), max_input_chars=MAX_INPUT_CHARS,
                              max_body_bytes=MAX_BODY_BYTES)
    with live_server(create_app(settings, tts=demo_tts)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def wav_b64(samples: np.ndarray, rate: int = 24000) -> str:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(out.getvalue()).decode()


def chunked(data: bytes) -> Callable[[], dict]:
    """A body sent without Content-Length (a generator makes httpx use chunked encoding)."""
    return lambda: {"content": (data[i:i + 65536] for i in range(0, len(data), 65536)), "headers": JSON}


class Case(NamedTuple):
    status: int
    needle: str  # a distinctive part of the error message
    request: dict | Callable[[], dict]
    method: str = "POST"
    path: str = SPEECH
    param: Any = ANY
    code: Any = ANY


def bad(id: str, status: int, needle: str, body: Any = None, *, raw: bytes | None = None, **kw):
    """One table row; `body` is sent as JSON (merged over {"input": "hi"} when it is a dict)."""
    if raw is not None:
        request = {"content": raw, "headers": JSON}
    elif isinstance(body, dict):
        request = {"json": {"input": "hi", **body}}
    elif callable(body):
        request = body
    else:
        request = {} if body is None else {"json": body}
    return pytest.param(Case(status, needle, request, **kw), id=id)


BIG = b'{"input": "hi", "ref_audio": "' + b"A" * (MAX_BODY_BYTES + 50_000) + b'"}'
NOT_AUDIO = base64.b64encode(b"this is plain text, not an audio file " * 8).decode()
SILENCE = wav_b64(np.zeros(24000, np.float32))

CASES = [
    # the body itself
    bad("invalid-json", 400, "not valid JSON", raw=b'{"input": "hi",', param=None),
    bad("invalid-utf8", 400, "JSON", raw=b'{"input": "\xff\xfe"}'),
    bad("json-array", 400, "must be a JSON object", [1, 2], param=None),
    bad("deeply-nested", 400, "nested too deeply", raw=b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", param=None),
    bad("json-string", 400, "must be a JSON object", "say hi", param=None),
    # past Python's limit on int() of a string: FastAPI answered its generic 400 "error parsing the body"
    bad("integer-of-5000-digits", 400, "has more than 4300 digits", raw=b'{"input": "hi", "seed": 1' + b"0" * 5000 + b"}",
        param=None),
    bad("empty-body", 400, "body", raw=b"", param=None),
    bad("too-big-content-length", 413, f"limit of {MAX_BODY_BYTES} bytes", raw=BIG, code="body_too_large"),
    bad("too-big-chunked", 413, f"limit of {MAX_BODY_BYTES} bytes", chunked(BIG), code="body_too_large"),
    # input
    bad("missing-input", 400, "input is required", raw=b'{"voice": "alloy"}', param="input"),
    bad("empty-input", 400, "at least 1 character", {"input": ""}, param="input"),
    bad("blank-input", 400, "input is empty", {"input": "   "}),
    bad("input-int", 400, "valid string", {"input": 5}, param="input"),
    bad("input-null", 400, "input is required", {"input": None}, param="input"),  # null is omitted: a required field
    bad("unknown-null", 400, "colour", {"colour": None}, param="colour"),  # null does not excuse an unknown field
    bad("input-too-long", 400, f"at most {MAX_INPUT_CHARS}", {"input": "a" * (MAX_INPUT_CHARS + 1)},
        param="input", code="input_too_long"),
    # a model's refusal names the API's field, not SpeechRequest's reference_text
    bad("ref-text-without-voice", 400, "ref_text is the transcript of a voice", {"ref_text": "Hello."}),
    # every text field: refused before tokenizing (megabytes of text held the event loop for seconds)
    bad("ref-text-too-long", 400, f"at most {MAX_INPUT_CHARS}", {"ref_text": "a" * (MAX_INPUT_CHARS + 1)},
        param="ref_text", code="text_too_long"),
    bad("instructions-too-long", 400, f"at most {MAX_INPUT_CHARS}", {"instructions": "a" * (MAX_INPUT_CHARS + 1)},
        param="instructions", code="text_too_long"),
    bad("speaker-ref-text-too-long", 400, f"at most {MAX_INPUT_CHARS}",
        {"speakers": [{"voice": "x"}, {"voice": "y", "ref_text": "a" * (MAX_INPUT_CHARS + 1)}]},
        param="speakers[1].ref_text", code="text_too_long"),
    bad("unknown-field", 400, "unknown field 'foo'", {"foo": 1}, param="foo"),
    bad("unknown-model", 404, "model 'nope' is not served", {"model": "nope"}, param="model",
        code="model_not_found"),
    # OpenAI options
    bad("speed-0.1", 400, "greater than or equal to 0.25", {"speed": 0.1}, param="speed"),
    bad("speed-fast", 400, "valid number", {"speed": "fast"}, param="speed"),
    bad("speed-5", 400, "less than or equal to 4", {"speed": 5}, param="speed"),
    bad("format-ogg", 400, "'ogg'", {"response_format": "ogg"}, param="response_format"),
    bad("stream-format-chunks", 400, "'chunks'", {"stream_format": "chunks"}, param="stream_format"),
    bad("stream-yes", 400, "valid boolean", {"stream": "yes"}, param="stream"),
    # voices and references
    bad("voice-int", 400, "valid string", {"voice": 123}, param="voice"),
    bad("voice-empty", 400, "at least 1 character", {"voice": ""}, param="voice"),
    bad("voice-unknown", 400, "'nobody' is not a stored voice", {"voice": "nobody"}, param="voice",
        code="voice_not_found"),
    bad("voice-object-unknown", 400, "'nobody' is not a stored voice", {"voice": {"id": "nobody"}},
        param="voice", code="voice_not_found"),
    bad("voice-path-tricks", 400, "'../etc/passwd' is not a stored voice", {"voice": "../etc/passwd"},
        param="voice", code="voice_not_found"),
    bad("ref-audio-not-base64", 400, "neither a stored voice name nor base64", {"ref_audio": "not base64!"},
        param="ref_audio"),
    # a name of 4n letters is base64 too: it was decoded, and refused as audio that does not decode
    bad("ref-audio-unknown-voice", 400, "'anna' is not a stored voice", {"ref_audio": "anna"}, param="ref_audio",
        code="voice_not_found"),
    bad("ref-audio-data-url-not-base64", 400, "not a base64 one", {"ref_audio": "data:audio/wav,abc"},
        param="ref_audio"),
    bad("ref-audio-not-audio", 400, "cannot decode", {"ref_audio": NOT_AUDIO}, code="invalid_audio"),
    bad("ref-audio-silence", 400, "silent", {"ref_audio": SILENCE}, code="invalid_audio"),
    bad("ref-text-without-voice", 400, "give the voice too", {"ref_text": "Hello."}),
    # sampling and generation controls
    bad("seed-negative", 400, "greater than or equal to 0", {"seed": -1}, param="seed"),
    bad("seed-bool", 400, "valid integer", {"seed": True}, param="seed"),
    bad("seed-2**63", 400, "less than 9223372036854775808", {"seed": 2**63}, param="seed"),
    bad("temperature-negative", 400, "greater than or equal to 0", {"temperature": -1}, param="temperature"),
    bad("temperature-string", 400, "valid number", {"temperature": "0.5"}, param="temperature"),
    bad("temperature-nan", 400, "temperature", raw=b'{"input": "hi", "temperature": NaN}', param="temperature"),
    bad("top-p-0", 400, "greater than 0", {"top_p": 0}, param="top_p"),
    bad("top-p-1.5", 400, "less than or equal to 1", {"top_p": 1.5}, param="top_p"),
    bad("top-k-negative", 400, "greater than or equal to 0", {"top_k": -3}, param="top_k"),
    bad("top-k-float", 400, "valid integer", {"top_k": 2.5}, param="top_k"),
    bad("repetition-penalty-0", 400, "greater than or equal to 0.001", {"repetition_penalty": 0},
        param="repetition_penalty"),
    # divisors this small made a row's logits infinite, and the batch's step fail
    bad("repetition-penalty-tiny", 400, "greater than or equal to 0.001", {"repetition_penalty": 1e-40},
        param="repetition_penalty"),
    # refused by the sampler as audio_temperature, outside the API's own range, without a param
    bad("temperature-tiny", 400, "temperature: Input should be 0 (greedy) or at least 0.001 (got 1e-39)",
        {"temperature": 1e-39}, param="temperature"),
    bad("max-new-tokens-0", 400, "greater than or equal to 1", {"max_new_tokens": 0}, param="max_new_tokens"),
    bad("initial-chunk-frames-0", 400, "greater than or equal to 1", {"initial_chunk_frames": 0},
        param="initial_chunk_frames"),
    bad("initial-chunk-frames-1000", 400, "initial_chunk_frames must lie in 1..", {"initial_chunk_frames": 1000}),
    bad("duration-seconds-negative", 400, "greater than 0", {"duration_seconds": -1}, param="duration_seconds"),
    bad("duration-tokens-0", 400, "greater than 0", {"duration_tokens": 0}, param="duration_tokens"),
    bad("both-durations", 400, "not both", {"duration_seconds": 1.0, "duration_tokens": 10}),
    # what the tts task does not take
    bad("instructions", 400, "instructions is not used by the tts task", {"instructions": "Whisper."},
        param="instructions"),
    # special-token spellings: they became control ids, and the refusal spoke of "audio blocks"
    bad("input-special-token", 400, "input contains the special token(s) <|audio_start|>, which text may not use",
        {"input": "Hi <|audio_start|>"}, param="input"),
    bad("language-special-tokens", 400, "language contains the special token(s) <|audio_end|>, <|im_end|>",
        {"language": "<|audio_end|><|im_end|>"}, param="language"),
    bad("ref-text-special-token", 400, "ref_text contains the special token(s) <|endoftext|>",
        {"ref_text": "Hello <|endoftext|>"}, param="ref_text"),
    bad("input-audio-placeholder", 400, "input contains <|audio|>, which text may not use", {"input": "a <|audio|>"},
        param="input"),
    # a zero-width character the normalizer deletes hid the spelling from the check, and it reached the prompt
    bad("input-special-token-zero-width", 400, "input contains the special token(s) <|im_end|>",
        {"input": "Hi <|im\u200b_end|> there"}, param="input"),
    # fields each allowed, joined into one: the template fills a typed "{text}" with the input
    bad("language-input-joined-special-token", 400, "the prompt's user text (the request's text fields as its "
        "template joins them) contains the special token(s) <|im_end|>", {"input": "end|>", "language": "<|im_{text}"}),
    bad("input-audio-placeholder-control-char", 400, "input contains <|audio|>", {"input": "a <|au\x07dio|>"},
        param="input"),
    bad("speakers-1", 400, "speakers is not used by the tts task", {"speakers": [{}]}),
    bad("speakers-0", 400, "at least 1", {"speakers": []}, param="speakers"),
    bad("speakers-unknown-field", 400, "unknown field", {"speakers": [{"name": "a"}]}, param="speakers.0.name"),
    # other routes
    bad("get-voice-dotfile", 400, "invalid voice name '.hidden'", method="GET", path=f"{VOICES}/.hidden",
        param="name", code="invalid_voice_name"),
    bad("delete-voice-space", 400, "invalid voice name 'a b'", method="DELETE", path=f"{VOICES}/a%20b",
        param="name", code="invalid_voice_name"),
    bad("get-voice-65-chars", 400, "1 to 64 characters", method="GET", path=f"{VOICES}/{'x' * 65}",
        code="invalid_voice_name"),
    bad("get-voice-non-ascii", 400, "invalid voice name 'é'", method="GET", path=f"{VOICES}/%C3%A9",
        code="invalid_voice_name"),
    bad("get-voice-unknown", 404, "no voice named 'nobody'", method="GET", path=f"{VOICES}/nobody",
        code="voice_not_found"),
    bad("get-voice-audio-unknown", 404, "no voice named 'nobody'", method="GET", path=f"{VOICES}/nobody/audio",
        code="voice_not_found"),
    bad("delete-voice-unknown", 404, "no voice named 'nobody'", method="DELETE", path=f"{VOICES}/nobody",
        code="voice_not_found"),
    bad("unknown-route", 404, "Not Found", method="GET", path="/v1/audio/nothing"),
    bad("get-on-speech", 405, "Method Not Allowed", method="GET", path=SPEECH),
    bad("put-on-voices", 405, "Method Not Allowed", method="PUT", path=VOICES),
]

# Speech refusals that reach the route, hence are counted in the metrics (a 413 may be refused
# by the body-limit middleware before routing).
counted = []


@pytest.mark.parametrize("case", CASES)
def test_bad_request(server, case: Case):
    request = case.request() if callable(case.request) else case.request
    r = server.request(case.method, case.path, **request)
    assert r.status_code == case.status, r.text
    assert_error(r.json(), case.status, case.needle, case.param, case.code)
    assert r.headers["x-should-retry"] == "false"  # no refusal here is mended by sending it again
    if case.path == SPEECH and case.status != 413:
        counted.append(case)


def assert_error(body: dict, status: int, needle: str, param: Any = ANY, code: Any = ANY) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert needle in error["message"], error["message"]
    assert error["type"] == ERROR_TYPES[status]
    assert error["param"] == param, error
    assert error["code"] == code, error


def test_null_means_the_default(server):
    """OpenAI clients send null for the fields they leave unset."""
    body = {"input": "hi", "response_format": None, "speed": None, "stream": None, "voice": None, "instructions": None}
    r = server.post(SPEECH, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/mpeg"  # the default format, mp3


@pytest.mark.parametrize("field", ["instructions", "language"])
@pytest.mark.parametrize("blank", ["", " \n"])
def test_blank_instructions_and_language_are_unset(server, field, blank):
    """OpenAI clients send instructions="" for none: the tts model refused it as an instruction it
    does not use. A blank language is none too, as the Python API reads both."""
    r = server.post(SPEECH, json={"input": "hi", field: blank, "response_format": "wav"})
    assert r.status_code == 200, r.text


def test_server_still_serves_after_bad_requests(server):
    server.post(SPEECH, json={"input": "hi", "voice": "nobody"})  # one more refusal, so this test stands alone
    r = server.post(SPEECH, json={"input": "Still here.", "response_format": "wav"})
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 24000 and len(audio) > 0 and np.isfinite(audio).all()

    assert server.get("/health").json() == {"status": "ok"}
    metrics = server.get("/metrics").text
    found = re.search(r'^mossserve_requests_total\{endpoint="/v1/audio/speech",outcome="client_error"\} (\S+)$',
                      metrics, re.MULTILINE)
    assert found, metrics
    assert float(found.group(1)) >= len(counted) + 1
    ok = re.search(r'^mossserve_requests_total\{endpoint="/v1/audio/speech",outcome="ok"\} (\S+)$', metrics,
                   re.MULTILINE)
    assert ok and float(ok.group(1)) >= 1


@pytest.mark.parametrize("task, body, param", [
    ("voice_design", {"input": "Hello."}, "instructions"),
    ("sound_effect", {"input": "  "}, "input"),
])
def test_a_field_the_models_task_needs_is_named_as_missing(server_app, task: str, body: dict, param: str) -> None:
    """The refusal began with the task's name, so `param` was null."""
    with task_client(server_app, task) as client:
        r = client.post("/v1/audio/speech", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@contextmanager
def task_client(server_app, task: str) -> Iterator:
    """A test client of a server on the demo checkpoint loaded as the model of `task`."""
    from starlette.testclient import TestClient

    from mossserve.api import TTS

    with closing(TTS.from_pretrained(None, task=task)) as tts, TestClient(server_app(tts=tts)) as client:
        yield client


@pytest.mark.parametrize("task, body, param", [
    ("voice_design", {"instructions": "A calm voice.", "ref_audio": NOT_AUDIO}, "ref_audio"),
    ("voice_design", {"instructions": "A calm voice.", "duration_seconds": 2.0}, "duration_seconds"),
    ("sound_effect", {"ref_audio": NOT_AUDIO}, "ref_audio"),
    ("sound_effect", {"voice": "alloy", "ref_text": "Rain."}, "ref_text"),
    ("dialogue", {"input": "[S1] Hi.", "ref_audio": NOT_AUDIO}, "ref_audio"),
])
def test_a_field_the_models_task_does_not_read_is_named_as_sent(server_app, task: str, body: dict, param: str):
    """The prompt builder's refusal spoke of SpeechRequest's fields ("voice" for ref_audio,
    duration_tokens for duration_seconds), after ref_audio had been decoded and encoded: here it is
    not audio at all, and the refusal is about the field, not its content. An OpenAI preset voice
    means no voice, so it is no field a task refuses."""
    with task_client(server_app, task) as client:
        r = client.post(SPEECH, json={"input": "Hello.", **body})
    assert r.status_code == 400, r.text
    hint = " (give voices per speaker in speakers)" if task == "dialogue" else ""
    assert r.json()["error"]["message"] == f"{param} is not used by the {task} task{hint}"
    assert r.json()["error"]["param"] == param


def test_a_speaker_with_voice_and_ref_audio_is_refused(server_app):
    with task_client(server_app, "dialogue") as client:
        r = client.post(SPEECH, json={"input": "[S1] Hi.", "speakers": [{"voice": "alice", "ref_audio": SILENCE}]})
    assert r.status_code == 400
    assert_error(r.json(), 400, "speakers[0]: give voice or ref_audio, not both", param="speakers[0].voice")


def test_a_body_of_many_unknown_keys_builds_one_error() -> None:
    """A million unknown keys made pydantic build a million errors (5 s holding the GIL, so the event
    loop too): only the first is told, so only the first is built, and it is the one a single unknown
    key gets."""
    from pydantic import ValidationError

    from mossserve.serve.schemas import SpeechBody

    def errors(body: dict) -> list[dict]:
        with pytest.raises(ValidationError) as caught:
            SpeechBody.model_validate(body)
        return caught.value.errors()

    many = errors({"k0": 1, **{f"k{i}": None for i in range(1, 1000)}, "speed": "x"})
    assert many == errors({"k0": 1, "speed": "x"})
    assert [e["type"] for e in many] == ["missing", "float_type", "extra_forbidden"]


def test_many_unknown_keys_are_refused_as_one(server) -> None:
    r = server.post(SPEECH, json={"input": "hi", **{f"k{i}": 1 for i in range(1000)}})
    assert r.status_code == 400
    assert_error(r.json(), 400, "unknown field 'k0'", "k0")


def test_a_list_of_speakers_past_the_bound_is_refused_by_its_length(server) -> None:
    """Half a million speakers were each checked (and each refused: 2 s on the event loop)."""
    from mossserve.serve.schemas import MAX_SPEAKER_ENTRIES

    r = server.post(SPEECH, json={"input": "hi", "speakers": [{"voice": 1}] * 1000})
    assert r.status_code == 400
    assert_error(r.json(), 400, f"speakers: List should have at most {MAX_SPEAKER_ENTRIES} items", "speakers")
    assert len(r.json()["error"]["message"]) < 300
