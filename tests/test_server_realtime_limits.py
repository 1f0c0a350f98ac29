"""`ws /v1/realtime/speech` at its limits: messages as large as the body limit lets audio be, the
session limit (`serve --max-sessions`, `mossserve_sessions`), a full context, preset voice names,
and turns whose text is empty or mixes text with ids."""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from contextlib import closing, contextmanager

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import CODEC_DIR
from realtime_cases import REALTIME_DIR
from server_harness import serve_model
from test_server_realtime import Client, play_turn, turn_codes
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from mossserve.cli import main

MAX_LEN = 100  # a context a few turns fill


@pytest.fixture(scope="module")
def tts():
    from mossserve.api import TTS
    from mossserve.config import EngineConfig

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny",
                                     engine_config=EngineConfig(max_len=MAX_LEN))) as tts:
        yield tts


@contextmanager
def served(tts, data_dir, **settings) -> Iterator[str]:
    """`tts` behind the uvicorn that `mossserve serve` configures (server_harness); yields the socket's URL."""
    with serve_model(tts, data_dir, **settings) as url:
        yield url.replace("http://", "ws://") + "/v1/realtime/speech"


def wav_of(megabytes: float) -> str:
    """Base64 of a silent 24 kHz 16-bit WAV of about `megabytes` MiB."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(megabytes * 2**20) // 2, np.int16), 24000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_message_carries_audio_as_large_as_the_body_limit(tts, tmp_path) -> None:
    """uvicorn's 16 MiB message limit closed the socket (1009, no error event) on a voice inline in
    session.update that POST /v1/audio/voices takes: the limit follows --max-body-mb, as base64."""
    with served(tts, tmp_path, max_body_bytes=13 * 2**20) as url:
        with connect(url, open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
            ws.send(json.dumps({"type": "session.update", "session": {"voice": wav_of(12.5)}}))  # 16.7 MiB
            event = json.loads(ws.recv(timeout=60))
            assert event["type"] == "error" and event["error"]["code"] == "invalid_audio", event
            assert "audio is too long" in event["error"]["message"], event  # read: the message came whole
            ws.send(json.dumps({"type": "session.update", "session": {"voice": wav_of(13.5)}}))  # past 13 MiB as base64
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)
        assert closed.value.rcvd.code == 1009


def serve_args(monkeypatch, capsys, *args: str) -> tuple[int, str, list]:
    """`mossserve serve ARGS` up to the point it would start serving: (exit code, stderr, settings)."""
    started = []
    monkeypatch.setattr("mossserve.serve.run.serve", lambda settings, **_: started.append(settings))
    monkeypatch.setattr("mossserve.distributed.run.serve_on_ray", lambda settings, *_, **__: started.append(settings))
    code = main(["serve", "--port", "0", *args])
    return code, capsys.readouterr().err, started


def test_serve_takes_max_sessions_on_one_process_and_on_ray(monkeypatch, capsys, tmp_path) -> None:
    """The engine held at most 64 sessions and `serve` could not change it."""
    pytest.importorskip("ray.serve")
    for ray in ([], ["--ray"]):
        code, err, started = serve_args(monkeypatch, capsys, "--max-sessions", "3", "--data-dir", str(tmp_path), *ray)
        assert code == 0 and [s.engine.max_sessions for s in started] == [3], err
    code, err, started = serve_args(monkeypatch, capsys, "--max-sessions", "0")
    assert code == 2 and started == [] and err.strip() == "error: --max-sessions must be an integer >= 1, got 0"


def sessions_gauge(base: str) -> float:
    line = next(line for line in httpx.get(base + "/metrics").text.splitlines() if line.startswith("mossserve_sessions "))
    return float(line.split()[-1])


def test_the_sessions_gauge_counts_open_sessions(tts, tmp_path) -> None:
    """No metric showed how near the session limit a server was."""
    from server_harness import serve_model

    with serve_model(tts, tmp_path) as base:
        url = base.replace("http://", "ws://") + "/v1/realtime/speech"
        assert sessions_gauge(base) == 0
        with Client(url) as first, Client(url) as second:
            play_turn(first, [{"op": "push_text", "arg": "One."}], None)
            assert sessions_gauge(base) == 1
            play_turn(second, [{"op": "push_text", "arg": "Two."}], None)
            assert sessions_gauge(base) == 2


def turn_events(client: Client, text: str) -> list[dict]:
    """A turn of `text`, whole: every event up to its audio.done, errors included."""
    client.send({"type": "text.delta", "delta": text})
    client.send({"type": "text.done"})
    events = [client.receive()]
    while events[-1]["type"] != "audio.done":
        events.append(client.receive())
    return events


@pytest.fixture(scope="module")
def url(tts, tmp_path_factory):
    from server_harness import serve_model

    with serve_model(tts, tmp_path_factory.mktemp("limits")) as base:
        yield base.replace("http://", "ws://") + "/v1/realtime/speech"


def test_a_full_context_says_to_start_a_new_one_and_the_session_id_stays(tts, url) -> None:
    """Once a turn ended at `length`, every later turn was refused (bad_message) with the Python API's
    words, "start a new session"; and new_context gave the engine session another id than the one
    session.created named."""
    with Client(url) as client:
        _, done = play_turn(client, [{"op": "push_text", "arg": "Hi there. " * 10}], None)
        assert done["finish_reason"] == "length"
        client.send({"type": "text.delta", "delta": "Next turn."})
        event = client.receive()
        assert event["type"] == "error" and event["error"]["code"] == "context_full", event
        assert '"new_context": true' in event["error"]["message"] and "new session" not in event["error"]["message"]
        client.send({"type": "session.update", "new_context": True})
        deltas, done = play_turn(client, [{"op": "push_text", "arg": "Next turn."}], None)
        assert done["finish_reason"] == "stop" and deltas
        assert tts.engine.session_context(client.session_id) > 0  # the new context, under session.created's id


def test_a_turn_whose_text_passes_the_context_is_context_full_too(tts, url, monkeypatch) -> None:
    """A turn whose opening fits after the context but whose first text (its prefill rows) does not
    failed as the server's (500 generation_failed) in the Python API's words; it is the client's."""
    from mossserve.text.realtime_session import RealtimeTurn

    with Client(url) as client:
        play_turn(client, [{"op": "push_text", "arg": "Hello there."}], None)
        opening = len(tts.talker.open_turn_prompt(RealtimeTurn(), False, None).rows)
        monkeypatch.setattr(tts.engine, "max_len", tts.engine.session_context(client.session_id) + opening + 3)
        events = turn_events(client, "Hello there, how are you doing today, my good friend?")
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [(e["code"], e["type"]) for e in errors] == [("context_full", "invalid_request_error")], events
    assert '"new_context": true' in errors[0]["message"] and "new session" not in errors[0]["message"]
    assert events[-1]["finish_reason"] == "error"


def test_a_preset_voice_name_means_the_models_own_voice(url) -> None:
    """`voice: "alloy"` was refused (voice_not_found) although /v1/audio/speech takes it as no voice."""
    def turn(**settings) -> np.ndarray:
        with Client(url, **settings) as client:
            deltas, done = play_turn(client, [{"op": "push_text", "arg": "Hello there."}], None)
            assert done["finish_reason"] == "stop", done
            return turn_codes(deltas)

    assert np.array_equal(turn(voice="alloy"), turn())


def test_an_unknown_voice_name_is_refused_in_the_words_of_its_field(url) -> None:
    """A user_audio name was called a voice ("voice 'abc' is not a stored voice")."""
    with Client(url) as client:
        client.send({"type": "turn.start", "user_text": "Hi.", "user_audio": "abc"})
        event = client.receive()
        assert event["error"]["code"] == "voice_not_found", event
        assert event["error"]["message"].startswith("user_audio 'abc' names no stored voice: send the user's audio")
        client.send({"type": "session.update", "session": {"voice": "abc"}})
        event = client.receive()
        assert event["error"]["code"] == "voice_not_found", event
        assert event["error"]["message"].startswith("voice 'abc' is not a stored voice")


@pytest.mark.parametrize("first,then", [({"delta": "Sure"}, {"tokens": [11, 12]}),
                                        ({"tokens": [11, 12]}, {"delta": "Sure"})])
def test_a_turn_that_mixes_text_and_ids_is_refused(url, first, then) -> None:
    """Ids sent after a short delta were spoken before it (the segmenter held the text back)."""
    with Client(url) as client:
        client.send({"type": "text.delta", **first})
        assert client.receive()["type"] == "turn.started"
        client.send({"type": "text.delta", **then})
        event = client.receive()
        assert event["type"] == "error" and event["error"]["code"] == "mixed_text", event
        client.send({"type": "text.delta", **first})  # the turn goes on, in its own kind
        client.send({"type": "text.done"})
        _, done = client.until_done()
        assert done["turn_id"] == "turn-1" and done["finish_reason"] in ("stop", "length")


def test_an_empty_delta_opens_no_turn(url) -> None:
    """`delta: ""` or `tokens: []` opened a turn with no text, which held a batch slot until the
    request timeout."""
    with Client(url) as client:
        client.send({"type": "text.delta", "delta": ""})
        client.send({"type": "text.delta", "tokens": []})
        client.send({"type": "dance"})  # answered in order: whatever the empty deltas caused comes first
        event = client.receive()
        assert event["type"] == "error" and "unknown message type" in event["error"]["message"], event


def test_a_turn_the_server_failed_is_a_server_error(tts, url, monkeypatch) -> None:
    """Every error event said invalid_request_error, also the server's own failures."""
    def broken(state, hidden, slots):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(tts.talker, "depth_loop", broken)
    with Client(url) as client:
        events = turn_events(client, "Hello there.")
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [(e["code"], e["type"]) for e in errors] == [("generation_failed", "server_error")], events


def test_voice_codes_past_the_limit_are_refused_before_they_are_checked(tts, url, monkeypatch) -> None:
    """A million frames of voice_codes went through pydantic and numpy on the event loop (8 s, +700 MB)
    before their length was refused: the frame count is looked at first."""
    from mossserve.serve import realtime

    validated, validate = [], realtime.SessionUpdate.model_validate

    def spy(cls, data: dict) -> realtime.SessionUpdate:
        validated.append(data)
        return validate(data)

    monkeypatch.setattr(realtime.SessionUpdate, "model_validate", classmethod(spy))
    frames = int(60 * tts.talker.frame_rate) + 1  # the default --max-voice-seconds, 60
    with Client(url) as client:
        client.send({"type": "session.update", "session": {"voice_codes": [[0] * 16] * frames}})
        event = client.receive()
    assert event["error"]["message"] == (f"voice_codes: {frames / tts.talker.frame_rate:.1f} s of voice, more than "
                                         "the 60 s this server takes (--max-voice-seconds)"), event
    assert not any("voice_codes" in data.get("session", {}) for data in validated)


@pytest.mark.parametrize("origin,cors,opens", [
    (None, (), True),  # not a browser
    ("http://127.0.0.1:{port}", (), True),  # the server's own pages (the playground)
    ("https://evil.example", (), False),  # any web page could drive a server on localhost
    ("https://app.example", ("https://app.example",), True),
    ("https://evil.example", ("https://app.example",), False),
    ("https://app.example", ("https://app.example/",), True),  # as the flag may be written
    ("null", ("*",), True),
    ("https://tts.example", (), False),
])
def test_a_browser_socket_opens_from_the_origins_cors_allows(tts, tmp_path, origin, cors, opens) -> None:
    """A websocket is not held to CORS: without an API key, a page of any site could open sessions."""
    with serve_model(tts, tmp_path, cors_origins=cors) as base:
        url = base.replace("http://", "ws://") + "/v1/realtime/speech"
        origin = None if origin is None else origin.format(port=url.split(":")[2].split("/")[0])
        for forwarded in ("tts.example", "TTS.Example:443"):  # the playground behind a proxy
            with connect(url, origin="https://tts.example", open_timeout=30,
                         additional_headers={"X-Forwarded-Host": forwarded}) as ws:
                assert json.loads(ws.recv())["type"] == "session.created"
        if opens:
            with connect(url, origin=origin, open_timeout=30) as ws:
                assert json.loads(ws.recv())["type"] == "session.created"
        else:
            with pytest.raises(InvalidStatus) as refused:  # refused before the handshake ends, as a bad key is
                connect(url, origin=origin, open_timeout=30)
            assert refused.value.response.status_code == 403
