"""The HTTP server end to end: the real openai client, streaming, SSE, disconnects, load, auth."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import AUDIO_DIR
from server_harness import StepGate, live_server, serve_model

from mossserve.audio import read_audio
from mossserve.speech_request import SpeechRequest

SEED = 7
TEXT = "Hello from the server."


@pytest.fixture(scope="module")
def served(demo_tts, tmp_path_factory):
    """One live server on the demo checkpoint for the tests that need no special settings."""
    with serve_model(demo_tts, tmp_path_factory.mktemp("served")) as url:
        yield url


@pytest.fixture(scope="module")
def reference_audio(demo_tts):
    """What the engine itself produces for TEXT with SEED: the expected audio of every response."""
    from mossserve.sampling import SamplingParams

    sampling = demo_tts.talker.default_sampling().with_overrides(seed=SEED)
    assert isinstance(sampling, SamplingParams)
    return demo_tts.synthesize(SpeechRequest(input=TEXT), sampling)


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def decoded(data: bytes, format: str) -> tuple[np.ndarray, int]:
    if format == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32)[None] / 32768.0, 24000
    return read_audio(data)


def assert_lossy_length(samples: np.ndarray, rate: int, format: str, duration: float) -> None:
    """The same length within a codec frame; aac (ADTS) also keeps its 1024-sample priming."""
    if format == "aac":
        assert 1024 <= samples.shape[-1] - round(duration * rate) <= 2048
    else:
        assert abs(samples.shape[-1] / rate - duration) < 0.07


@pytest.mark.parametrize("format", ["wav", "pcm", "flac", "mp3", "opus", "aac"])
def test_openai_client_every_format(served, reference_audio, format) -> None:
    response = client(served).audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=format,
                                                  extra_body={"seed": SEED})
    samples, rate = decoded(response.content, format)
    expected = np.clip(reference_audio.samples, -1, 1)  # 16-bit formats clip (the demo is loud noise)
    assert reference_audio.duration > 0.2
    if format in ("wav", "pcm", "flac"):  # lossless at 16 bits: the engine's samples
        assert rate == reference_audio.sample_rate and samples.shape == expected.shape
        np.testing.assert_allclose(samples, expected, atol=2 / 32768)
    else:
        assert_lossy_length(samples, rate, format, reference_audio.duration)


@pytest.mark.parametrize("format", ["wav", "pcm", "mp3", "aac"])
def test_openai_client_streaming_response(served, reference_audio, format) -> None:
    speech = client(served).audio.speech
    with speech.with_streaming_response.create(model="tts-1", voice="echo", input=TEXT, response_format=format,
                                               extra_body={"seed": SEED, "stream": True}) as response:
        assert response.headers["content-type"].startswith("audio/")
        parts = list(response.iter_bytes())
    samples, rate = decoded(b"".join(parts), format)
    if format in ("mp3", "aac"):
        assert_lossy_length(samples, rate, format, reference_audio.duration)
    else:
        np.testing.assert_allclose(samples, np.clip(reference_audio.samples, -1, 1), atol=2 / 32768)


def test_stream_format_audio_streams_as_stream_true_does(served) -> None:
    """OpenAI's stream_format "audio" asks for the audio in chunks as it is made: it was accepted and
    the whole file sent at the end."""
    body = {"input": TEXT, "seed": SEED, "response_format": "pcm"}
    with httpx.stream("POST", served + "/v1/audio/speech", json={**body, "stream_format": "audio"},
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers.get("transfer-encoding") == "chunked" and "x-finish-reason" not in response.headers
        streamed = response.read()
    whole = httpx.post(served + "/v1/audio/speech", json=body, timeout=60)  # neither: one whole file
    assert "content-length" in whole.headers and whole.headers["x-finish-reason"] == "stop"
    assert streamed == whole.content


@pytest.mark.parametrize("body", [{}, {"stream": True}, {"stream_format": "sse"}], ids=["whole", "stream", "sse"])
def test_every_audio_response_says_its_sample_rate(served, body) -> None:
    """pcm has no header to say it, and OpenAI's clients assume 24 kHz whatever the model's rate."""
    with httpx.stream("POST", served + "/v1/audio/speech", json={"input": TEXT, "response_format": "pcm", **body},
                      timeout=60) as response:
        assert response.status_code == 200 and response.read()
        assert response.headers["x-sample-rate"] == "24000"


def sse_events(url: str, body: dict, headers: dict | None = None) -> list[dict]:
    with httpx.stream("POST", url + "/v1/audio/speech", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines]


@pytest.mark.parametrize("format", ["pcm", "wav"])
def test_sse_reassembles_to_the_non_streamed_audio(served, format) -> None:
    body = {"input": TEXT, "seed": SEED, "response_format": format, "initial_chunk_frames": 1}
    whole = httpx.post(served + "/v1/audio/speech", json=body, timeout=60)
    events = sse_events(served, {**body, "stream_format": "sse"})
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * len(deltas) + ["speech.audio.done"]
    assert len(deltas) >= 2  # the audio arrived in pieces
    done = events[-1]
    assert done["usage"]["output_tokens"] > 0 and done["finish_reason"] == "stop"
    streamed = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    if format == "pcm":
        assert streamed == whole.content
    else:  # the streamed wav header says "until the end"; the samples are the same
        np.testing.assert_array_equal(sf.read(io.BytesIO(streamed))[0], sf.read(io.BytesIO(whole.content))[0])


def test_speed_plays_the_same_speech_faster_whole_or_streamed(served, reference_audio) -> None:
    """OpenAI's `speed` time-stretches the generated audio (pitch kept): the whole response, a
    stream and SSE all carry the engine's audio stretched once, as a whole."""
    from mossserve.audio.tempo import change_tempo

    response = client(served).audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="wav",
                                                  speed=1.5, extra_body={"seed": SEED})
    samples, rate = decoded(response.content, "wav")
    expected = np.clip(change_tempo(reference_audio.samples, reference_audio.sample_rate, 1.5), -1, 1)
    assert rate == reference_audio.sample_rate
    assert samples.shape[-1] == pytest.approx(reference_audio.samples.shape[-1] / 1.5, rel=0.05)
    np.testing.assert_allclose(samples, expected, atol=2 / 32768)

    body = {"input": TEXT, "seed": SEED, "response_format": "pcm", "speed": 0.5, "initial_chunk_frames": 1}
    whole = httpx.post(served + "/v1/audio/speech", json=body, timeout=60)
    streamed = httpx.post(served + "/v1/audio/speech", json={**body, "stream": True}, timeout=60)
    events = sse_events(served, {**body, "stream_format": "sse"})
    assert whole.status_code == streamed.status_code == 200
    assert len(whole.content) // 2 == pytest.approx(reference_audio.samples.shape[-1] * 2, rel=0.05)
    assert streamed.content == whole.content
    assert b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta") == whole.content


def test_sse_usage_counts_the_generated_frames_of_a_continuation(served) -> None:
    """With ref_audio and ref_text the reference's own frames come first (their audio is cut):
    output_tokens counts the generated frames, those whose audio the response carries."""
    reference = base64.b64encode((AUDIO_DIR / "reference_zh.wav").read_bytes()).decode()
    body = {"input": TEXT, "seed": SEED, "response_format": "pcm", "ref_audio": reference,
            "ref_text": "The reference's words.", "stream_format": "sse"}
    events = sse_events(served, body)
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    usage = events[-1]["usage"]
    assert usage["output_tokens"] > 0 and usage["output_tokens"] * 1920 * 2 == len(pcm)  # s16 mono, 1920 / frame
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def counted(url: str, outcome: str) -> float:
    """mossserve_requests_total of the speech endpoint for `outcome`."""
    name = f'mossserve_requests_total{{endpoint="/v1/audio/speech",outcome="{outcome}"}}'
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(name)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_models_health_ready_and_metrics(served) -> None:
    assert client(served).models.list().data[0].id == "moss-tts-demo"
    assert client(served).models.retrieve("moss-tts-demo").id == "moss-tts-demo"
    assert client(served).models.retrieve("tts-1").id == "tts-1"  # an alias a speech request may name
    for snapshot in ("gpt-4o-mini-tts-2025-03-20", "tts-1-1106", "tts-1-hd-1106"):  # OpenAI's dated ids too
        assert client(served).models.retrieve(snapshot).id == snapshot
    for other in ("whisper-1", "tts-1-mini", "tts-10"):
        with pytest.raises(openai.NotFoundError):
            client(served).models.retrieve(other)
    assert httpx.get(served + "/health").json() == {"status": "ok"}
    ready = httpx.get(served + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    httpx.post(served + "/v1/audio/speech", json={"input": TEXT, "stream": True, "response_format": "pcm"}).raise_for_status()
    metrics = httpx.get(served + "/metrics").text
    for name in ("mossserve_requests_total{endpoint=\"/v1/audio/speech\",outcome=\"ok\"}",
                 "mossserve_time_to_first_audio_seconds_count", "mossserve_real_time_factor_count",
                 "mossserve_queue_depth", "mossserve_running_requests", "mossserve_kv_cache_slots_used",
                 "mossserve_speaker_cache_entries", "mossserve_stream_underruns_total", "mossserve_kv_cache_slots_kept",
                 "mossserve_prompt_rows_prefilled", "mossserve_prompt_rows_reused"):
        assert name in metrics, name
    ttfa = [line for line in metrics.splitlines() if line.startswith("mossserve_time_to_first_audio_seconds_count")]
    assert float(ttfa[0].split()[-1]) >= 1


def test_64_concurrent_streams_complete(demo_tts, served) -> None:
    def one(i: int) -> int:
        with httpx.stream("POST", served + "/v1/audio/speech", timeout=120,
                          json={"input": f"Request number {i}.", "stream": True, "response_format": "pcm",
                                "seed": i}) as response:
            assert response.status_code == 200
            return len(b"".join(response.iter_bytes()))

    with ThreadPoolExecutor(64) as pool:
        sizes = list(pool.map(one, range(64)))
    assert all(size > 0 and size % 2 == 0 for size in sizes)
    demo_tts.wait_idle()
    stats = demo_tts.stats()
    assert stats["running"] == stats["queued"] == stats["live"] == stats["cache_slots_used"] == 0


@pytest.fixture
def gate(demo_tts):
    gate = StepGate(demo_tts.talker)
    yield gate
    gate.remove()


def watch_aborts(monkeypatch, engine) -> threading.Event:
    """An event set once the server has asked the engine to abort a request."""
    aborted, abort = threading.Event(), engine.abort

    def recording_abort(request_id: str) -> bool:
        result = abort(request_id)
        aborted.set()
        return result

    monkeypatch.setattr(engine, "abort", recording_abort)
    return aborted


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_client_that_disconnects_mid_stream_frees_its_slot(demo_tts, served, gate, monkeypatch, stream_format) -> None:
    engine = demo_tts.engine
    aborted = watch_aborts(monkeypatch, engine)
    before, disconnects = engine.stats()["aborted"], counted(served, "disconnected")
    body = {"input": TEXT, "stream": True, "stream_format": stream_format, "response_format": "pcm",
            "initial_chunk_frames": 1}
    gate.armed.set()
    with httpx.stream("POST", served + "/v1/audio/speech", json=body, timeout=60) as response:
        assert response.status_code == 200
        # keep the iterator: a dropped one, once collected, closes the half-read connection
        received = response.iter_raw()
        first = next(received)
        held = gate.held.wait(timeout=30)  # the request is stopped mid-generation, certainly alive
        assert held, (first[:200], engine.stats(), gate.frames_seen)
        assert engine.stats()["live"] == 1 and not aborted.is_set()
    # leaving the block closed the connection
    assert aborted.wait(timeout=30)
    gate.release()
    demo_tts.wait_idle()
    stats = engine.stats()
    assert stats["aborted"] == before + 1
    assert stats["running"] == stats["live"] == stats["cache_slots_used"] == stats["codec_streams_open"] == 0
    # in the metrics too (a streamed one was not: the server's cancellation went past the counting);
    # counted on the server's event loop after the abort, so looked for until it shows, or 30 s
    deadline = time.monotonic() + 30
    while counted(served, "disconnected") != disconnects + 1 and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert counted(served, "disconnected") == disconnects + 1


def test_a_non_streamed_request_is_aborted_when_its_client_leaves(demo_tts, served, gate, monkeypatch) -> None:
    engine = demo_tts.engine
    aborted = watch_aborts(monkeypatch, engine)
    gate.armed.set()
    failed = threading.Event()

    def post() -> None:
        try:
            httpx.post(served + "/v1/audio/speech", json={"input": TEXT, "response_format": "wav"}, timeout=5)
        except httpx.TimeoutException:
            failed.set()

    thread = threading.Thread(target=post)
    thread.start()
    assert gate.held.wait(timeout=30)
    thread.join()  # the client gives up after its 5 s timeout and closes the connection
    assert failed.is_set()
    assert aborted.wait(timeout=30)
    gate.release()
    demo_tts.wait_idle()
    assert engine.stats()["live"] == 0


def test_a_full_queue_answers_503_with_retry_after(server_app, tmp_path) -> None:
    from mossserve.api import TTS
    from mossserve.config import EngineConfig

    tts = TTS.from_pretrained(None, engine_config=EngineConfig(max_running=1, max_queued=1))
    gate = StepGate(tts.talker)
    try:
        with live_server(server_app(tts=tts, engine=tts.engine_config)) as url:
            body = {"input": TEXT, "stream": True, "response_format": "pcm", "initial_chunk_frames": 1}
            gate.armed.set()
            with httpx.Client(base_url=url, timeout=60) as http:
                with http.stream("POST", "/v1/audio/speech", json=body) as running:
                    assert running.status_code == 200
                    assert gate.held.wait(timeout=30)  # one running, held mid-generation
                    with http.stream("POST", "/v1/audio/speech", json=body) as queued:
                        assert queued.status_code == 200 and tts.stats()["queued"] == 1
                        refused = http.post("/v1/audio/speech", json=body)
                        assert refused.status_code == 503
                        assert refused.headers["retry-after"] == "1" and "x-should-retry" not in refused.headers
                        assert "capacity" in refused.json()["error"]["message"]
                        with pytest.raises(openai.InternalServerError):
                            client(url).audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
                        gate.release()
                        assert len(b"".join(queued.iter_bytes())) > 0
                    assert len(b"".join(running.iter_bytes())) > 0
                assert http.post("/v1/audio/speech", json=body).status_code == 200  # room again
            assert "outcome=\"rejected\"" in httpx.get(url + "/metrics").text
    finally:
        gate.remove()
        tts.close()


def test_a_request_past_its_timeout_is_stopped(demo_tts, server_app, gate) -> None:
    with live_server(server_app(request_timeout_s=0.5)) as url:
        gate.armed.set()
        response = httpx.post(url + "/v1/audio/speech", json={"input": TEXT, "initial_chunk_frames": 1}, timeout=60)
        gate.release()
    assert response.status_code == 504
    assert "timeout" in response.json()["error"]["message"]
    assert response.headers["x-should-retry"] == "false"  # OpenAI's clients would run it twice more
    demo_tts.wait_idle()
    assert demo_tts.stats()["live"] == 0


def test_an_sse_stream_past_its_timeout_ends_with_the_whole_responses_error(demo_tts, server_app, gate) -> None:
    """Its error event had the type server_error where the whole response's 504 says timeout_error."""
    with live_server(server_app(request_timeout_s=0.5)) as url:
        gate.armed.set()
        body = {"input": TEXT, "stream": True, "stream_format": "sse", "initial_chunk_frames": 1}
        with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        gate.release()
    event = json.loads(lines[-1].removeprefix("data: "))
    assert event["type"] == "error" and event["error"]["type"] == "timeout_error"
    assert "timeout" in event["error"]["message"]
    demo_tts.wait_idle()


def test_a_stream_past_its_timeout_is_cut_in_one_log_line(demo_tts, server_app, gate) -> None:
    """After the headers only a dropped connection tells the client; the server says so in one warning,
    not as an application error with a traceback (uvicorn's) on every timeout."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    server_log = logging.getLogger("uvicorn.error")
    try:
        with live_server(server_app(request_timeout_s=0.5)) as url:
            server_log.addHandler(handler)  # now: uvicorn's logging set-up removes the handlers it finds
            timeouts = counted(url, "timeout")
            gate.armed.set()
            body = {"input": TEXT, "stream": True, "response_format": "pcm", "initial_chunk_frames": 1}
            with pytest.raises(httpx.RemoteProtocolError):
                with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=60) as response:
                    assert response.status_code == 200
                    b"".join(response.iter_bytes())
            gate.release()
            assert counted(url, "timeout") == timeouts + 1
    finally:
        server_log.removeHandler(handler)
    demo_tts.wait_idle()
    assert records == [], [r.getMessage() for r in records]


def test_a_stop_signal_makes_ready_say_503_while_requests_drain(server_app) -> None:
    """uvicorn ends the app only after open requests drained: /ready said 200 till then."""
    import uvicorn

    from mossserve.serve.run import DrainingServer

    app = server_app()
    with live_server(app) as url:
        assert httpx.get(url + "/ready").status_code == 200
        server = DrainingServer(uvicorn.Config(app))
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        assert httpx.get(url + "/ready").status_code == 503
        refused = httpx.post(url + "/v1/audio/speech", json={"input": TEXT})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        upload = httpx.post(url + "/v1/audio/voices", data={"name": "late"},
                            files={"file": ("v.wav", (AUDIO_DIR / "reference_zh.wav").read_bytes(), "audio/wav")})
        assert upload.status_code == 503 and upload.json()["error"]["code"] == "shutting_down"


def test_api_key(server_app) -> None:
    with live_server(server_app(api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError, match="missing API key"):
            httpx_client = httpx.post(url + "/v1/audio/speech", json={"input": TEXT})
            assert httpx_client.status_code == 401
            raise openai.AuthenticationError(httpx_client.json()["error"]["message"], response=httpx_client,
                                             body=httpx_client.json())
        with pytest.raises(openai.AuthenticationError, match="invalid API key") as refused:
            client(url, api_key="wrong").audio.speech.create(model="tts-1", voice="alloy", input=TEXT)
        assert refused.value.body == {"message": "invalid API key", "type": "invalid_request_error", "param": None,
                                      "code": "invalid_api_key"}  # as OpenAI's
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="s3cret").audio.speech.create(model="tts-1", voice="alloy", input=TEXT).content
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
    with live_server(server_app()) as url:  # no key configured: open
        assert client(url, api_key="anything").models.list().data


def test_a_request_without_the_key_is_refused_before_its_body_is_read(server_app) -> None:
    """FastAPI reads and parses a body before a route's dependencies run: a keyless client's body
    (here one nested past the parser's depth) was parsed, on the event loop, and answered 400."""
    app = server_app(api_key="s3cret")
    deep = b'{"input": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with live_server(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.post(url + "/v1/audio/speech", content=deep,
                                 headers={"Content-Type": "application/json", **headers})
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", refused.text
        upload = httpx.post(url + "/v1/audio/voices", data={"name": "v"},
                            files={"file": ("v.wav", b"RIFF" + b"0" * 100_000, "audio/wav")})
        assert upload.status_code == 401 and upload.json()["error"]["code"] == "missing_api_key"
        assert httpx.post(url + "/v1/audio/speech", content=deep, headers={
            "Content-Type": "application/json", "Authorization": "Bearer s3cret"}).status_code == 400
    metrics = app.state.server.metrics.registry  # refused before routing, as a body over the limit is
    assert metrics.get_sample_value("mossserve_requests_total", {"endpoint": "other", "outcome": "client_error"}) == 3


def test_a_body_that_trickles_past_the_request_timeout_is_refused(server_app) -> None:
    """A client that sent its headers and a few bytes of body held its connection for ever: the
    request timeout started only once the whole body was in."""
    import socket

    with live_server(server_app(request_timeout_s=1)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"input\": ")
            reply = sock.recv(65536).decode()  # the server's answer: nothing more is sent
        assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply, reply


def test_openai_clients_raise_bad_request_and_do_not_retry_what_a_retry_cannot_fix(demo_tts, server_app, gate) -> None:
    """A body that fails the schema was a 422 (UnprocessableEntityError where OpenAI answers 400), and
    a request that timed out ran three times: the client retries every 5xx unless told not to."""
    with live_server(server_app(request_timeout_s=0.5)) as url:
        sent: list[httpx.Request] = []
        with httpx.Client(event_hooks={"request": [sent.append]}) as http:
            retrying = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, http_client=http)
            with pytest.raises(openai.BadRequestError, match="speed"):
                retrying.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, speed=9)
            gate.armed.set()
            with pytest.raises(openai.APIStatusError) as timed_out:
                retrying.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                             extra_body={"initial_chunk_frames": 1})
            gate.release()
    assert timed_out.value.status_code == 504
    assert len(sent) == 2  # each once
    demo_tts.wait_idle()


def test_cors(server_app) -> None:
    with live_server(server_app(cors_origins=("http://localhost:3000",))) as url:
        preflight = httpx.options(url + "/v1/audio/speech", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.options(url + "/v1/audio/speech", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    with live_server(server_app()) as url:  # CORS off by default
        response = httpx.get(url + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert "access-control-allow-origin" not in response.headers


def test_mossserve_serve_command(tmp_path) -> None:
    """The CLI: serves the demo checkpoint with no --model; a bad model fails before listening."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mossserve = str(Path(sys.executable).parent / "mossserve")
    bad = subprocess.run([mossserve, "serve", "--model", str(tmp_path / "missing"),
                          "--port", str(port)], check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "error:" in bad.stderr
    env = {"MOSSSERVE_DATA_DIR": str(tmp_path / "data"), "PATH": ""}
    server = subprocess.Popen([mossserve, "serve", "--port", str(port), "--log-level", "info"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        before = []
        for line in server.stdout:  # uvicorn says when it listens
            before.append(line)
            if "Uvicorn running on" in line:
                break
        assert any("serving the bundled tiny random-weight demo checkpoint" in line for line in before), before
        url = f"http://127.0.0.1:{port}"
        assert client(url).audio.speech.create(model="moss-tts-demo", voice="default", input=TEXT,
                                               response_format="wav").content
        assert (tmp_path / "data" / "mossserve.db").is_file()  # the data dir came from the environment
    finally:
        server.terminate()
        rest = server.communicate(timeout=30)[0]
    # SIGTERM is a graceful stop: uvicorn shuts the app down (the engine's lifespan ends), then exits
    # with the signal it caught, so that a process manager sees why it stopped.
    assert "Finished server process" in rest and server.returncode == -signal.SIGTERM, rest


def test_after_the_engine_closes_ready_and_requests_say_503(server_app) -> None:
    """Once the engine has shut down (the server stopping, or its TTS closed under it), readiness
    and new requests answer 503 with the reason, and a scrape still works."""
    from starlette.testclient import TestClient

    from mossserve.api import TTS

    tts = TTS.from_pretrained(None)
    with TestClient(server_app(tts=tts)) as client:
        assert client.get("/ready").status_code == 200
        assert client.post("/v1/audio/speech", json={"input": "Before.", "response_format": "pcm"}).status_code == 200
        assert "mossserve_kv_cache_slots" in client.get("/metrics").text
        tts.close()
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "shutting down"
        refused = client.post("/v1/audio/speech", json={"input": "After.", "response_format": "pcm"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"].isdigit()
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "mossserve_kv_cache_slots" not in metrics.text


def test_streamed_audio_is_encoded_off_the_event_loop(served, monkeypatch) -> None:
    """Encoding (and resampling) a chunk takes milliseconds, and so does a speed's tempo change: on
    the event loop they would hold every other connection back, so they run on a worker thread
    (whole, streamed and SSE responses)."""
    import asyncio

    from mossserve.audio import StreamEncoder, TempoChange

    on_loop = []

    def recording(method):
        def run(self, audio):
            try:
                asyncio.get_running_loop()
                on_loop.append((method.__qualname__, True))
            except RuntimeError:
                on_loop.append((method.__qualname__, False))
            return method(self, audio)
        return run

    monkeypatch.setattr(StreamEncoder, "write", recording(StreamEncoder.write))
    monkeypatch.setattr(TempoChange, "write", recording(TempoChange.write))
    for body in ({"stream": True, "response_format": "mp3"}, {"stream_format": "sse", "response_format": "opus"},
                 {"stream": True, "response_format": "pcm", "speed": 1.5}, {"response_format": "wav", "speed": 0.8}):
        with httpx.stream("POST", served + "/v1/audio/speech", json={"input": TEXT, **body}, timeout=60) as response:
            assert response.status_code == 200 and response.read()
    assert {name for name, _ in on_loop} == {"StreamEncoder.write", "TempoChange.write"}
    assert not any(loop for _, loop in on_loop), on_loop


def test_the_served_name_of_a_pinned_hub_id_is_the_hub_id() -> None:
    """Clients name the model as the hub names it; the @revision pins what was downloaded."""
    from types import SimpleNamespace

    from mossserve.serve.settings import ServerSettings
    from mossserve.serve.state import served_name

    model = SimpleNamespace(is_demo=False)
    assert served_name(ServerSettings(model="OpenMOSS-Team/MOSS-TTS@v1.0"), model) == "OpenMOSS-Team/MOSS-TTS"
    assert served_name(ServerSettings(model="OpenMOSS-Team/MOSS-TTS"), model) == "OpenMOSS-Team/MOSS-TTS"


def test_a_client_that_leaves_while_sending_its_body_is_counted_as_disconnected(server_app):
    """Half a body, then the connection closes (the ASGI app sees http.disconnect): not a client error."""
    import asyncio

    app = server_app()
    messages = iter([{"type": "http.request", "body": b'{"input": "half a bo', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/audio/speech", "raw_path": b"/v1/audio/speech", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    metrics = app.state.server.metrics.render().decode()
    outcomes = [line for line in metrics.splitlines() if line.startswith("mossserve_requests_total{")]
    assert outcomes == ['mossserve_requests_total{endpoint="/v1/audio/speech",outcome="disconnected"} 1.0']


class _MadeStream:
    """A request whose chunks the engine has made already (`ready`), or none yet."""

    request_id = "made"

    def __init__(self, chunks: list, ready: bool) -> None:
        self.chunks, self.is_ready = chunks, ready

    def ready(self) -> bool:
        return self.is_ready

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.is_ready:
            await asyncio.Event().wait()  # the engine is still at work: never comes
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("ready", [True, False])
def test_past_its_deadline_a_stream_still_sends_what_was_made(ready: bool) -> None:
    """A reader that fell behind (a slow client, busy encoders) reached the next chunk after the deadline:
    the rest of a finished generation was cut as a timeout (wait_for with a timeout <= 0 never looks)."""
    from types import SimpleNamespace

    from mossserve.engine.request import AudioChunk
    from mossserve.serve.errors import APIError
    from mossserve.serve.speech import Run

    def chunk(i: int, final: bool) -> AudioChunk:
        return AudioChunk("made", np.zeros((1, 1920), np.float32), 24000, i, i + 1, np.zeros((1, 32), np.int64),
                          final=final, finish_reason="stop" if final else None)

    outcomes: list = []
    metrics = SimpleNamespace(requests=SimpleNamespace(labels=lambda *a: SimpleNamespace(inc=lambda: outcomes.append(a))))
    state = SimpleNamespace(settings=SimpleNamespace(request_timeout_s=300), metrics=metrics)
    clock = SimpleNamespace(audio=lambda seconds: None, finish=lambda: None)

    async def read() -> int:
        watcher = asyncio.create_task(asyncio.Event().wait())
        run = Run(state, _MadeStream([chunk(0, False), chunk(1, False), chunk(2, True)], ready),
                  time.monotonic() - 1, clock, watcher, None, "pcm")
        return len([c async for c in run.chunks()])

    if ready:
        assert asyncio.run(read()) == 3 and outcomes[-1][1] == "ok"
    else:
        with pytest.raises(APIError, match="timeout"):
            asyncio.run(read())


@pytest.mark.parametrize("argv, drain", [([], 30.0), (["--shutdown-timeout", "90"], 90.0)])
def test_open_requests_get_the_shutdown_timeout_to_finish(monkeypatch, argv: list[str], drain: float) -> None:
    """uvicorn's drain after a stop signal was a fixed 5 s: a request of real speech takes longer."""
    import mossserve.serve.run as run_module
    from mossserve.cli import main

    seen = {}

    class Server:
        def __init__(self, config) -> None:
            seen["drain"], self.started = config.timeout_graceful_shutdown, True

        def run(self) -> None:
            pass

    monkeypatch.setattr(run_module, "create_app", lambda settings: object())
    monkeypatch.setattr(run_module, "DrainingServer", Server)
    assert main(["serve", *argv]) == 0
    assert seen["drain"] == drain


@pytest.mark.parametrize("argv, needle", [(["--shutdown-timeout", "-1"], "--shutdown-timeout must be"),
                                          (["--shutdown-timeout", "60", "--ray"], "Serve drains replicas")])
def test_a_shutdown_timeout_it_cannot_use_is_refused(capsys, argv: list[str], needle: str) -> None:
    from mossserve.cli import main

    assert main(["serve", *argv]) == 2
    assert needle in capsys.readouterr().err
