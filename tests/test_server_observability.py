"""What the HTTP server tells its operators: health and readiness of a broken engine, the log lines
of failed requests, and metrics measured as the audio goes out (docs/server.md)."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from server_harness import StepGate, live_server
from starlette.testclient import TestClient

from mossserve.engine.engine import FAILING_ROUNDS
from mossserve.errors import InvalidRequestError

TEXT = "Hello from the server."
SPEECH = "/v1/audio/speech"


@contextmanager
def mossserve_log() -> Iterator[list[logging.LogRecord]]:
    """The records of the `mossserve` logger while the block runs (a handler on the logger itself:
    `mossserve serve` keeps its lines from propagating to the root logger, where caplog listens)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("mossserve")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def counted(metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("mossserve_requests_total",
                                             {"endpoint": SPEECH, "outcome": outcome}) or 0.0


@pytest.fixture
def fresh_tts():
    """A TTS of its own, for a test that breaks its engine."""
    from mossserve.api import TTS

    tts = TTS.from_pretrained(None)
    yield tts
    tts.close()


class BrokenScheduler:
    """Raises as the talker thread looks for work: a bug outside any round's guard."""

    @property
    def waiting(self):
        raise RuntimeError("a bug where the thread waits")


def end_the_engine_thread(engine, how: str) -> None:
    """End the talker thread: stopped under the engine, or killed by an exception escaping its loop."""
    worker = engine._worker
    if how == "stopped":
        worker.stop()
        return
    thread, scheduler = worker._thread, engine.scheduler
    with engine._lock:
        engine.scheduler = BrokenScheduler()
        engine._lock.notify_all()
    thread.join(timeout=30)
    engine.scheduler = scheduler
    assert not thread.is_alive()


@pytest.mark.parametrize("how", ["stopped", "died"])
def test_a_dead_engine_thread_fails_health_ready_and_new_requests_at_once(server_app, fresh_tts, how) -> None:
    """A request to an engine whose thread has ended waited for its timeout, while /health and
    /ready said all was well."""
    with TestClient(server_app(tts=fresh_tts, request_timeout_s=60)) as client:
        assert client.post(SPEECH, json={"input": TEXT, "response_format": "pcm"}).status_code == 200
        end_the_engine_thread(fresh_tts.engine, how)
        for probe in ("/health", "/ready"):
            answer = client.get(probe)
            assert answer.status_code == 503, probe
            assert answer.json()["status"] == "unavailable"
            assert "the engine's thread has stopped" in answer.json()["reason"]
            if how == "died":
                assert "RuntimeError: a bug where the thread waits" in answer.json()["reason"]
        refused = client.post(SPEECH, json={"input": TEXT, "response_format": "pcm"})  # at once, not at 60 s
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert "thread has stopped" in refused.json()["error"]["message"]
        assert fresh_tts.stats()["queued"] == 0


def test_a_request_in_flight_when_the_thread_dies_fails_at_once(fresh_tts) -> None:
    """The thread's death fails what it was serving, rather than leaving it to wait."""
    from mossserve.sampling import SamplingParams

    engine = fresh_tts.engine
    finals = []
    gate = StepGate(fresh_tts.talker)
    gate.armed.set()
    try:
        engine.add_request(fresh_tts.prompt(TEXT), SamplingParams.greedy(), finals.append)
        assert gate.held.wait(timeout=30)
        with engine._lock:
            scheduler, engine.scheduler = engine.scheduler, BrokenScheduler()
        thread = engine._worker._thread
        gate.release()  # the round ends; the thread then looks for work and dies
        thread.join(timeout=30)
        engine.scheduler = scheduler
    finally:
        gate.remove()
    assert finals[-1].final and "a bug where the thread waits" in finals[-1].error


def test_rounds_that_all_fail_make_the_server_unready_and_one_failure_does_not(server_app, demo_tts,
                                                                              monkeypatch) -> None:
    """After a sticky CUDA error every request failed with 500 while /health and /ready said 200; a
    single failing request is no reason to stop routing to the server, nor is it left unlogged."""
    engine = demo_tts.engine
    body = {"input": TEXT, "response_format": "pcm"}

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    demo_tts.wait_idle()  # another test's request still decoding would succeed a round between the failures
    with TestClient(server_app()) as client, mossserve_log() as records:
        assert client.post(SPEECH, json=body).status_code == 200  # no failing rounds left by other tests
        monkeypatch.setattr(engine.runner, "prefill", broken)
        failed = client.post(SPEECH, json=body)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
        assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200
        lines = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert len(lines) == 1 and failed.headers["x-request-id"] in lines[0] and "illegal memory" in lines[0]
        assert TEXT not in lines[0]
        for _ in range(FAILING_ROUNDS - 1):
            assert client.post(SPEECH, json=body).status_code == 500
        for probe in ("/health", "/ready"):
            answer = client.get(probe)
            assert answer.status_code == 503, probe
            assert f"last {FAILING_ROUNDS} rounds all failed" in answer.json()["reason"]
            assert "illegal memory access" in answer.json()["reason"]
        monkeypatch.undo()  # the engine recovers: a round that succeeds makes it ready again
        assert client.post(SPEECH, json=body).status_code == 200
        assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200


def test_a_sticky_device_error_where_requests_are_admitted_makes_the_server_unready(server_app, demo_tts,
                                                                                    monkeypatch) -> None:
    """After a sticky CUDA error a new request fails where admission first writes its slot's state on the
    device, before any model call: those failures were not counted, and /health and /ready said 200."""
    body = {"input": TEXT, "response_format": "pcm"}

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    demo_tts.wait_idle()  # another test's request still decoding would succeed a round between the failures
    with TestClient(server_app()) as client:
        assert client.post(SPEECH, json=body).status_code == 200  # no failing rounds left by other tests
        monkeypatch.setattr(demo_tts.engine.family, "admit", broken)
        for _ in range(FAILING_ROUNDS):
            assert client.post(SPEECH, json=body).status_code == 500
        assert client.get("/ready").status_code == 503 and client.get("/health").status_code == 503
        monkeypatch.undo()
        assert client.post(SPEECH, json=body).status_code == 200
        assert client.get("/ready").status_code == 200


def test_requests_that_fail_on_their_own_input_do_not_make_the_server_unready(server_app, demo_tts,
                                                                               monkeypatch) -> None:
    """A request that fails as it is admitted (its own input, not a model call) is no sign of a broken
    engine: counted as one, a client sending such requests made the server unready (and restarted)."""
    body = {"input": TEXT, "response_format": "pcm"}

    def refuse(*args, **kwargs):
        raise InvalidRequestError("this request's input cannot be admitted")

    with TestClient(server_app()) as client:
        monkeypatch.setattr(demo_tts.engine.family, "admit", refuse)
        for _ in range(FAILING_ROUNDS + 1):
            assert client.post(SPEECH, json=body).status_code == 500
        assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200


def test_check_health_of_a_ray_replica_fails_with_the_engine(server_app, fresh_tts) -> None:
    pytest.importorskip("ray", reason="Ray Serve is the optional [ray] extra")
    from mossserve.distributed.deployment import SpeechServer

    with TestClient(server_app(tts=fresh_tts)) as client:
        replica = SimpleNamespace(state=client.app.state.server, replica="r1")
        asyncio.run(SpeechServer.check_health(replica))
        fresh_tts.engine._worker.stop()
        with pytest.raises(RuntimeError, match="replica r1: the engine cannot serve requests: the engine's thread"):
            asyncio.run(SpeechServer.check_health(replica))


def test_a_ray_replica_logs_mossserve_lines_through_serve() -> None:
    pytest.importorskip("ray", reason="Ray Serve is the optional [ray] extra")
    from mossserve.distributed.deployment import log_through_serve

    serve_log, ours = logging.getLogger("ray.serve"), logging.getLogger("mossserve")
    saved = [(log, log.handlers[:], log.level, log.propagate) for log in (serve_log, ours)]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    try:
        serve_log.handlers = [handler]  # as Serve sets up a replica
        serve_log.setLevel(logging.WARNING)
        log_through_serve()
        ours.info("not at Serve's level")
        ours.warning("a request failed")
    finally:
        for log, handlers, level, propagate in saved:
            log.handlers, log.propagate = handlers, propagate
            log.setLevel(level)
    assert [r.getMessage() for r in records] == ["a request failed"]


@pytest.fixture
def gate(demo_tts):
    gate = StepGate(demo_tts.talker)
    yield gate
    gate.remove()


def test_a_whole_request_past_its_timeout_is_logged_and_names_its_request(demo_tts, server_app, gate) -> None:
    with live_server(server_app(request_timeout_s=0.5)) as url, mossserve_log() as records:
        gate.armed.set()
        response = httpx.post(url + SPEECH, json={"input": TEXT, "initial_chunk_frames": 1}, timeout=60)
        gate.release()
    assert response.status_code == 504
    request_id = response.headers["x-request-id"]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 and request_id in lines[0] and "timeout" in lines[0], lines
    assert records[0].levelno == logging.WARNING
    demo_tts.wait_idle()


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_bug_after_the_headers_counts_as_error_and_is_logged(demo_tts, server_app, monkeypatch,
                                                              stream_format) -> None:
    """A bug in a streamed body was counted under no outcome, and an SSE client got no error event."""
    import mossserve.serve.speech as speech

    class BrokenEncoder(speech.StreamEncoder):
        def write(self, audio):
            raise ValueError("an encoder bug")

    monkeypatch.setattr(speech, "StreamEncoder", BrokenEncoder)
    app = server_app()
    body = {"input": TEXT, "response_format": "pcm", "stream": True, "stream_format": stream_format}
    with live_server(app) as url, mossserve_log() as records:
        with httpx.stream("POST", url + SPEECH, json=body, timeout=60) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            if stream_format == "sse":
                event = json.loads([line for line in response.iter_lines() if line.startswith("data: ")][-1][6:])
                assert event["type"] == "error" and event["error"]["code"] == "internal_error"
                assert "an encoder bug" in event["error"]["message"]
            else:
                with pytest.raises(httpx.RemoteProtocolError):  # cut: no complete body
                    b"".join(response.iter_raw())
        assert counted(app.state.server.metrics, "error") == 1
        assert sum(counted(app.state.server.metrics, outcome) for outcome in ("ok", "disconnected")) == 0
    errors = [r for r in records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and request_id in errors[0].getMessage()
    assert isinstance(errors[0].exc_info[1], ValueError)
    demo_tts.wait_idle()


def test_a_whole_response_whose_body_fails_is_counted_once_as_error(demo_tts, server_app, monkeypatch) -> None:
    """Its generation ended well and was counted ok before the body was encoded; the encoder's failure
    then counted it again, as error: one request, two outcomes."""
    import mossserve.serve.speech as speech

    def broken(*args):
        raise ValueError("an encoder bug")

    monkeypatch.setattr(speech, "encode_audio", broken)
    app = server_app()
    with TestClient(app) as client, mossserve_log():
        response = client.post(SPEECH, json={"input": TEXT, "response_format": "wav"})
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert counted(app.state.server.metrics, "error") == 1
    assert sum(counted(app.state.server.metrics, outcome) for outcome in ("ok", "disconnected")) == 0
    demo_tts.wait_idle()


def test_serve_configures_the_mossserve_logger_at_the_log_level(monkeypatch, capsys) -> None:
    """Its lines had no level and --log-level did not apply to them."""
    import mossserve.serve.run as run_module
    from mossserve.serve import ServerSettings

    log = logging.getLogger("mossserve")

    def create_app(settings):  # the model loads here: its warnings are formatted too
        log.warning("a warning while loading")
        log.error("an error while loading")
        return object()

    class Server:
        def __init__(self, config) -> None:
            self.started = True

        def run(self) -> None:
            log.warning("a warning while serving")
            log.error("an error while serving")

    monkeypatch.setattr(run_module, "create_app", create_app)
    monkeypatch.setattr(run_module, "DrainingServer", Server)
    handlers, level, propagate = log.handlers[:], log.level, log.propagate
    try:
        run_module.serve(ServerSettings(), "error", 30)
    finally:
        log.handlers, log.propagate = handlers, propagate
        log.setLevel(level)
    lines = [line for line in capsys.readouterr().err.splitlines() if "while" in line]
    assert lines == ["ERROR:    an error while loading", "ERROR:    an error while serving"]


class FakeClock:
    """`time` for the metrics: stands still except where a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def ttfa(metrics) -> tuple[float, float]:
    """(count, sum) of mossserve_time_to_first_audio_seconds."""
    get = metrics.registry.get_sample_value
    return get("mossserve_time_to_first_audio_seconds_count"), get("mossserve_time_to_first_audio_seconds_sum")


def test_time_to_first_audio_of_a_whole_response_ends_when_its_body_is_sent(server_app, monkeypatch) -> None:
    import mossserve.serve.metrics as metrics_module
    import mossserve.serve.speech as speech

    clock, encode = FakeClock(), speech.encode_audio

    def slow_encode(*args):  # the body is ready one (fake) second after the audio
        clock.now += 1.0
        return encode(*args)

    monkeypatch.setattr(metrics_module, "time", clock)
    monkeypatch.setattr(speech, "encode_audio", slow_encode)
    app = server_app()
    with TestClient(app) as client:
        assert client.post(SPEECH, json={"input": TEXT, "response_format": "wav"}).status_code == 200
    assert ttfa(app.state.server.metrics) == (1.0, 1.0)


def stream_ttfa(server_app, monkeypatch, clock: FakeClock, encoder: type) -> tuple[float, float]:
    """(count, sum) of time to first audio for one pcm stream of a frame a chunk through `encoder`, whose
    writes each take a (fake) second of `clock`."""
    import mossserve.serve.metrics as metrics_module
    import mossserve.serve.speech as speech

    monkeypatch.setattr(metrics_module, "time", clock)
    monkeypatch.setattr(speech, "StreamEncoder", encoder)
    app = server_app()
    body = {"input": TEXT, "response_format": "pcm", "stream": True, "initial_chunk_frames": 1}
    with TestClient(app) as client:
        response = client.post(SPEECH, json=body)
    assert response.status_code == 200 and response.content
    assert clock.now >= 2  # a chunk came after the first
    return ttfa(app.state.server.metrics)


def test_time_to_first_audio_of_a_stream_ends_at_its_first_bytes(server_app, monkeypatch) -> None:
    """An encoder that holds audio back (AAC does) delays the first bytes past the first chunk."""
    import mossserve.serve.speech as speech

    clock = FakeClock()

    class HoldingEncoder(speech.StreamEncoder):
        """Gives nothing for the first chunk, then what it got; each chunk takes it a (fake) second."""

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.held: bytes | None = b""

        def write(self, audio) -> bytes:
            clock.now += 1.0
            data = super().write(audio)
            if self.held is None:
                return data
            if not self.held:
                self.held = data
                return b""
            data, self.held = self.held + data, None
            return data

    assert stream_ttfa(server_app, monkeypatch, clock, HoldingEncoder) == (1.0, 2.0)


def test_time_to_first_audio_of_a_stream_does_not_end_at_a_header(server_app, monkeypatch) -> None:
    """A container's header alone (flac's, sent before its first block was full) ended the clock."""
    import mossserve.serve.speech as speech

    clock = FakeClock()

    class HeaderFirstEncoder(speech.StreamEncoder):
        """Its first chunk gives bytes that hold no audio yet; each chunk takes it a (fake) second."""

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.writes = 0

        def write(self, audio) -> bytes:
            clock.now += 1.0
            self.writes += 1
            return super().write(audio)

        @property
        def audio_out(self) -> bool:
            return self.writes > 1

    assert stream_ttfa(server_app, monkeypatch, clock, HeaderFirstEncoder) == (1.0, 2.0)


def test_a_stream_cut_short_counts_the_audio_it_sent(demo_tts, server_app, gate) -> None:
    """A stream that timed out (or whose client left) counted none of the audio it had sent."""
    app = server_app(request_timeout_s=0.5)
    body = {"input": TEXT, "stream": True, "response_format": "pcm", "initial_chunk_frames": 1}
    received = 0
    with live_server(app) as url:
        gate.armed.set()
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", url + SPEECH, json=body, timeout=60) as response:
                for data in response.iter_raw():
                    received += len(data)
        gate.release()
    metrics = app.state.server.metrics
    assert counted(metrics, "timeout") == 1 and received > 0
    sent = metrics.registry.get_sample_value("mossserve_audio_seconds_total")
    assert sent == pytest.approx(received / 2 / demo_tts.codec.sample_rate)  # s16 mono
    assert metrics.registry.get_sample_value("mossserve_real_time_factor_count") == 0  # finished requests only
    demo_tts.wait_idle()


def test_a_whole_request_cancelled_by_its_front_counts_as_disconnected(demo_tts, server_app, gate) -> None:
    """Ray's proxy cancels the replica's call when its client leaves, and no http.disconnect comes:
    the cancellation ended a whole response's handler uncounted (streams counted it)."""
    app = server_app()
    demo_tts.wait_idle()  # an earlier test's request still running could take the gate's hold for itself

    async def leave_mid_request() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mossserve") as client:
            gate.armed.set()
            # greedy: a sampled run may end on the step that completes its first frame, leaving no step to hold
            body = {"input": TEXT, "initial_chunk_frames": 1, "temperature": 0}
            call = asyncio.ensure_future(client.post(SPEECH, json=body))
            await asyncio.to_thread(gate.held.wait, 60)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(leave_mid_request())
    gate.release()
    assert counted(app.state.server.metrics, "disconnected") == 1
    demo_tts.wait_idle()


def test_a_ray_replica_logs_a_cut_stream_once() -> None:
    """Serve logs a request's exception with its traceback ("Request failed."); a cut stream's, already
    logged in one line by mossserve, came out as a ~90-line traceback on Ray (uvicorn's was quieted)."""
    pytest.importorskip("ray", reason="Ray Serve is the optional [ray] extra")
    from mossserve.distributed.deployment import log_through_serve
    from mossserve.serve.speech import StreamCut

    serve_log, ours = logging.getLogger("ray.serve"), logging.getLogger("mossserve")
    saved = [(log, log.handlers[:], log.filters[:], log.level, log.propagate) for log in (serve_log, ours)]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    try:
        serve_log.handlers = [handler]
        log_through_serve()
        for error in (StreamCut("the request ran past the server's 3 s timeout"), ValueError("a bug")):
            try:
                raise error
            except Exception:
                serve_log.exception("Request failed.")
    finally:
        for log, handlers, filters, level, propagate in saved:
            log.handlers, log.filters, log.propagate = handlers, filters, propagate
            log.setLevel(level)
    assert [type(r.exc_info[1]) for r in records] == [ValueError]
