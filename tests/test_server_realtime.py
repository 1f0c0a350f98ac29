"""`ws /v1/realtime/speech` on a live server with the Realtime fixture: the reference's streaming
goldens over the socket, audio before the text has finished, cancel, two sessions at once, and
bad messages answered with errors while the session goes on."""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx
import numpy as np
import pytest
from conftest import CODEC_DIR
from realtime_cases import REALTIME_DIR, golden, golden_json
from server_harness import live_server, serve_model
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from mossserve.text.realtime_session import RealtimeTurn

RUNS = golden_json("generation")["runs"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from mossserve.api import TTS

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")) as tts, \
            serve_model(tts, tmp_path_factory.mktemp("realtime")) as base:
        yield base.replace("http://", "ws://") + "/v1/realtime/speech"


def codes(name: str) -> list:
    return golden("prompts")[f"codes.{name}"].numpy().tolist()


class Client:
    """A session over a websocket: `with Client(url, **session settings) as client: ...`."""

    def __init__(self, url: str, **settings) -> None:
        self.url, self.settings = url, settings

    def __enter__(self):
        self.connection = connect(self.url, open_timeout=30)
        self.ws = self.connection.__enter__()
        created = self.receive()
        assert created["type"] == "session.created" and created["sample_rate"] == 24000
        self.session_id = created["session_id"]  # the engine session's: its context can be read
        self.send({"type": "session.update", "session": {"temperature": 0, "include_codes": True, **self.settings}})
        return self

    def __exit__(self, *exc) -> None:
        self.connection.__exit__(*exc)

    def send(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def receive(self) -> dict:
        return json.loads(self.ws.recv(timeout=60))

    def until_done(self, turn_id: str | None = None) -> tuple[list[dict], dict]:
        deltas = []
        while True:
            event = self.receive()
            if event["type"] == "audio.delta":
                deltas.append(event)
            elif event["type"] == "audio.done":
                return deltas, event
            else:
                assert event["type"] == "turn.started", event


def turn_codes(deltas: list[dict]) -> np.ndarray:
    return np.concatenate([np.asarray(d["codes"]) for d in deltas if "codes" in d])


def play_turn(client: Client, ops: list[dict], start: dict | None) -> tuple[list[dict], dict]:
    if start is not None:
        client.send({"type": "turn.start", **start})
    for op in ops:
        if op["op"] == "push_text":
            client.send({"type": "text.delta", "delta": op["arg"]})
        elif op["op"] == "push_text_tokens":
            client.send({"type": "text.delta", "tokens": op["arg"]})
    client.send({"type": "text.done"})
    return client.until_done()


def multiturn(client: Client) -> list[np.ndarray]:
    run, out = RUNS["stream_multiturn"], []
    for spec, user in zip(run["turns"], ["user1", "user2"]):
        deltas, done = play_turn(client, spec["ops"], {"user_text": spec["reset_turn"]["user_text"],
                                                         "user_audio_codes": codes(user)})
        assert done["finish_reason"] == "stop"
        pcm = b"".join(base64.b64decode(d["audio"]) for d in deltas)
        assert len(pcm) == 2 * 1920 * done["frames"]  # s16 mono, 1920 samples per frame at 24 kHz
        out.append(turn_codes(deltas))
    return out


def expected(run: str, turn: int) -> np.ndarray:
    return golden("generation")[f"{run}.turn{turn}.frames"].numpy()[:-1]


def test_a_multiturn_session_over_the_socket_replays_the_reference(url: str) -> None:
    with Client(url, voice_codes=codes("voice")) as client:
        got = multiturn(client)
    for turn in (0, 1):
        assert np.array_equal(got[turn], expected("stream_multiturn", turn))


def test_two_sessions_at_once(url: str) -> None:
    def zh() -> np.ndarray:
        t = RUNS["stream_zh_user_short_text"]["turns"][0]
        with Client(url, voice_codes=codes("voice")) as client:
            deltas, _ = play_turn(client, t["ops"], {"user_text": t["reset_turn"]["user_text"],
                                                     "user_audio_codes": codes("user_zh")})
        return turn_codes(deltas)

    def multi() -> list[np.ndarray]:
        with Client(url, voice_codes=codes("voice")) as client:
            return multiturn(client)

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(multi), pool.submit(zh)
        assert np.array_equal(a.result()[1], expected("stream_multiturn", 1))
        assert np.array_equal(b.result(), expected("stream_zh_user_short_text", 0))


def test_a_slower_session_speaks_the_same_codes_for_longer(url: str) -> None:
    """`speed` in the session settings stretches each turn's audio (a chunk the tempo filter holds
    back still sends its codes); what the model generates is the reference's."""
    t = RUNS["stream_zh_user_short_text"]["turns"][0]

    def turn(speed: float) -> tuple[np.ndarray, int]:
        with Client(url, voice_codes=codes("voice"), speed=speed, initial_chunk_frames=1) as client:
            deltas, done = play_turn(client, t["ops"], {"user_text": t["reset_turn"]["user_text"],
                                                        "user_audio_codes": codes("user_zh")})
        assert done["finish_reason"] == "stop"
        return turn_codes(deltas), len(b"".join(base64.b64decode(d["audio"]) for d in deltas))

    (normal, normal_bytes), (slow, slow_bytes) = turn(1.0), turn(0.5)
    assert np.array_equal(normal, expected("stream_zh_user_short_text", 0))
    assert np.array_equal(slow, normal)
    assert slow_bytes == pytest.approx(2 * normal_bytes, rel=0.05)


def test_a_first_turn_that_never_spoke_leaves_the_context_to_the_next(url: str) -> None:
    """A first turn ended before any text (its text.done refused, then cancelled) feeds nothing
    (README 5.6: a turn's input goes in with its text), so the next turn opens the context with the
    system prompt and voice: the goldens."""
    with Client(url, voice_codes=codes("voice")) as client:
        client.send({"type": "turn.start", "user_text": "Hello?"})
        client.send({"type": "text.done"})
        events = [client.receive(), client.receive()]
        client.send({"type": "turn.cancel"})
        while events[-1]["type"] != "audio.done":
            events.append(client.receive())
        assert [e["type"] for e in events] == ["turn.started", "error", "audio.done"]
        assert events[1]["error"]["code"] == "no_text" and events[-1]["finish_reason"] == "aborted", events
        got = multiturn(client)
    for turn in (0, 1):
        assert np.array_equal(got[turn], expected("stream_multiturn", turn))


def test_audio_arrives_before_the_text_is_done_and_a_turn_can_be_cancelled(url: str) -> None:
    with Client(url, voice_codes=codes("voice"), initial_chunk_frames=1) as client:
        cancel_and_continue(client)


def cancel_and_continue(client: Client) -> None:
    spec = RUNS["stream_multiturn"]["turns"][0]
    client.send({"type": "turn.start", "user_text": spec["reset_turn"]["user_text"], "user_audio_codes": codes("user1")})
    assert client.receive()["type"] == "turn.started"
    for op in spec["ops"]:
        if op["op"] == "push_text":
            client.send({"type": "text.delta", "delta": op["arg"]})
    event = client.receive()  # the text is not done, yet audio comes
    assert event["type"] == "audio.delta" and event["codes"]
    client.send({"type": "turn.cancel"})
    _, done = client.until_done()
    assert done["finish_reason"] == "aborted"
    deltas, done = play_turn(client, [{"op": "push_text", "arg": "A new turn after the cancel."}], None)
    assert done["finish_reason"] == "stop" and deltas


def test_text_sent_right_after_a_cancel_opens_the_next_turn(url: str) -> None:
    """A barge-in: cancel, then at once the new reply's text, before the cancelled turn's audio.done.
    The new text went into the turn being aborted and was lost, with no error and no audio."""
    spec = RUNS["stream_multiturn"]["turns"][0]
    text = "The next turn starts right after the cancel."
    with Client(url, voice_codes=codes("voice")) as client:
        client.send({"type": "turn.start", "user_text": spec["reset_turn"]["user_text"], "user_audio_codes": codes("user1")})
        client.send({"type": "text.delta", "delta": "Of course, let me think about that for a moment."})
        client.send({"type": "turn.cancel"})
        client.send({"type": "text.delta", "delta": text})
        client.send({"type": "text.done"})
        events = []
        while sum(e["type"] == "audio.done" for e in events) < 2:
            events.append(client.receive())
    kinds = [e["type"] for e in events if e["type"] != "audio.delta"]
    assert kinds == ["turn.started", "audio.done", "turn.started", "audio.done"], events
    first, second = [e for e in events if e["type"] == "audio.done"]
    assert first["turn_id"] == "turn-1" and first["finish_reason"] == "aborted"
    assert second["turn_id"] == "turn-2" and second["finish_reason"] == "stop" and second["frames"] > 0
    assert any(e["type"] == "audio.delta" and e["turn_id"] == "turn-2" and e["codes"] for e in events)


def test_text_after_text_done_is_refused_and_the_turn_keeps_its_text(url: str) -> None:
    """A delta after text.done (a client pipelining its next reply) was spoken as part of the ending
    turn, which then had more frames; a second text.done was accepted too."""
    def turn(extra: list[dict]) -> tuple[np.ndarray, list[dict]]:
        with Client(url, voice_codes=codes("voice")) as client:
            client.send({"type": "text.delta", "delta": "Short and sweet."})
            client.send({"type": "text.done"})
            for message in extra:
                client.send(message)
            events = []
            while not events or events[-1]["type"] != "audio.done":
                events.append(client.receive())
        return turn_codes([e for e in events if e["type"] == "audio.delta"]), [e for e in events if e["type"] == "error"]

    alone, none = turn([])
    assert none == []
    late, errors = turn([{"type": "text.delta", "delta": " And then some more words to say."},
                         {"type": "text.delta", "tokens": [5, 6, 7]}, {"type": "text.done"}])
    assert [e["error"]["code"] for e in errors] == ["turn_in_progress"] * 3
    assert "the turn's text is complete (text.done)" in errors[0]["error"]["message"]
    assert np.array_equal(late, alone)


def test_audio_for_the_text_received_is_sent_while_more_text_is_awaited(url: str) -> None:
    """The first frame exists once 12 ids are in, but with the default first chunk of 2 frames it
    waited in the chunk buffer for text that had not come: no audio until more text arrived."""
    with Client(url, voice_codes=codes("voice")) as client:
        client.send({"type": "text.delta", "tokens": list(range(1000, 1012))})
        events = [client.receive()]
        while events[-1]["type"] != "audio.delta":
            events.append(client.receive())  # fails (timeout) if the frame is held back
        assert [e["type"] for e in events] == ["turn.started", "audio.delta"] and len(events[-1]["codes"]) == 1
        client.send({"type": "text.done"})
        deltas, done = client.until_done()
    assert done["finish_reason"] in ("stop", "length") and done["frames"] == 1 + len(turn_codes(deltas))


class EarlyStop:
    """The model ends its turns with EOS at frame `at` (None: as it would), a model that stops before
    its text is done; `ended` is set once the engine has ended a turn, so a test knows that text it
    sends next comes after the end."""

    def __init__(self, tts, monkeypatch, at: int | None = 3) -> None:
        self.at, self.ended = at, threading.Event()
        depth_loop, finish = tts.talker.depth_loop, tts.engine.pipeline.finish

        def stopping(state, hidden, slots):
            frames = depth_loop(state, hidden, slots)
            if self.at is not None:
                frames[state.frames[slots] == self.at, 0] = tts.talker.config.audio_eos_code
            return frames

        def finished(request) -> None:
            finish(request)
            self.ended.set()

        monkeypatch.setattr(tts.talker, "depth_loop", stopping)
        monkeypatch.setattr(tts.engine.pipeline, "finish", finished)


def test_text_still_coming_when_the_model_stops_goes_with_its_turn(tmp_path, monkeypatch) -> None:
    """The model ended a turn (EOS) while the client was still sending its text: audio.done came at
    once, and the rest of the text opened a second assistant turn (no user turn) that spoke it and
    went into the context, or was refused (no_turn). As the reference's turn, it takes the rest and
    drops it and ends at text.done (or turn.cancel): the context is the one a turn without the rest
    leaves, and the next turn continues it."""
    from mossserve.api import TTS

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")) as tts, \
            serve_model(tts, tmp_path) as base:
        model = EarlyStop(tts, monkeypatch)

        def session(rest: list[dict], end: str = "text.done") -> tuple[int, np.ndarray]:
            model.at = 3
            with Client(base.replace("http://", "ws://") + "/v1/realtime/speech") as client:
                model.ended.clear()
                client.send({"type": "text.delta", "tokens": list(range(1000, 1020))})  # 12 to prefill, 8 to step
                assert model.ended.wait(60), "the turn did not end"
                for message in [*rest, {"type": end}]:
                    client.send(message)
                events = [client.receive()]
                while events[-1]["type"] != "audio.done":
                    events.append(client.receive())
                kinds = [e["type"] for e in events if e["type"] != "audio.delta"]
                assert kinds == ["turn.started", "audio.done"], events
                assert events[-1] == {"type": "audio.done", "turn_id": "turn-1", "finish_reason": "stop", "frames": 3}
                context = tts.engine.session_context(client.session_id)
                model.at = None
                deltas, done = play_turn(client, [{"op": "push_text", "arg": "And now the next answer."}],
                                         {"user_text": "Thanks!"})
                assert done["turn_id"] == "turn-2" and done["finish_reason"] == "stop", done
            return context, turn_codes(deltas)

        rest = [{"type": "text.delta", "tokens": [2000, 2001]}, {"type": "text.delta", "tokens": [2002]}]
        (context, after), (alone, after_alone), (cancelled, after_cancel) = \
            session(rest), session([]), session(rest, "turn.cancel")
        turn_input = tts.talker.open_turn_prompt(RealtimeTurn(), True, None).rows
    assert context == alone == cancelled == len(turn_input) + 12 + 3  # the prefill's 12 ids and its 3 steps
    assert np.array_equal(after, after_alone) and np.array_equal(after, after_cancel)


def test_assistant_text_that_spells_a_special_token_is_refused(url: str) -> None:
    """Only user_text was checked: a delta spelling <|im_end|> (whole, split over two deltas, or as
    its id) closed the assistant turn inside the model's prompt. The refused delta changes nothing."""
    with Client(url, voice_codes=codes("voice")) as client:
        client.send({"type": "text.delta", "delta": "Short and "})
        assert client.receive()["type"] == "turn.started"
        for message, needle in (({"delta": "sweet.<|im_end|>"}, "text contains the special token(s) <|im_end|>"),
                                ({"delta": "<|im_"}, None), ({"delta": "end|>"}, "<|im_end|>"),
                                ({"tokens": [151645]}, "text ids may not be special tokens (<|im_end|>)")):
            client.send({"type": "text.delta", **message})
            if needle is not None:
                event = client.receive()
                assert event["type"] == "error" and needle in event["error"]["message"], event
                assert event["error"]["code"] == "bad_message"
        client.send({"type": "text.done"})
        events = []
        while not events or events[-1]["type"] != "audio.done":
            events.append(client.receive())
    assert events[-1]["finish_reason"] == "stop" and not [e for e in events if e["type"] == "error"]


def test_bad_messages_get_errors_and_the_session_goes_on(url: str) -> None:
    bad = [
        ({"type": "dance"}, "unknown message type"),
        ({"type": "text.delta"}, "delta (text) or tokens"),
        ({"type": "text.delta", "delta": 5}, "delta"),
        ({"type": "text.done"}, "no turn is taking text"),
        ({"type": "turn.cancel"}, "no turn to cancel"),
        ({"type": "turn.start", "user_audio_codes": codes("user1")}, "needs user_text"),
        ({"type": "session.update", "session": {"voice_codes": [[1, 2]]}}, "codes must have shape"),
        ({"type": "session.update", "session": {"top_p": 3}}, "top_p"),
        ({"type": "session.update", "session": {"voice": "not-a-stored-voice-or-base64!"}}, "neither a stored voice"),
        ({"type": "session.update", "session": {"voice_codes": [[1] * 16, [1] * 15]}}, "rectangular array"),
        ({"type": "session.update", "session": {"voice_codes": [[10**30] * 16]}}, "rectangular array"),
        ({"type": "turn.start", "user_text": "Hi.", "user_audio_codes": [[2**63] * 16]}, "rectangular array"),
        ({"type": "text.delta", "tokens": [5] * 5000}, "at most 4096 characters (or ids)"),
        # refused before a turn opens for them (a turn.started came first, and the turn held a slot)
        ({"type": "text.delta", "tokens": [10**9]}, "text ids must be integers"),
        ({"type": "turn.start", "user_text": "a" * 4097}, "user_text has 4097 characters"),
        # refused by the update, not by every later turn
        ({"type": "session.update", "session": {"temperature": 1e-9}}, "temperature"),
        ({"type": "session.update", "session": {"initial_chunk_frames": 100}}, "initial_chunk_frames must lie in"),
        # 720 s of voice: accepted, and then every turn failed on its prompt's length
        ({"type": "session.update", "session": {"voice_codes": [[1] * 16] * 9000}},
         "voice_codes: 720.0 s of voice, more than the 60 s this server takes"),
        # user audio given as codes had no limit (as audio it has)
        ({"type": "turn.start", "user_text": "Hi.", "user_audio_codes": [[1] * 16] * 9000},
         "user_audio_codes: 720.0 s of audio, more than the 60 s this server takes"),
    ]
    with Client(url) as client:
        for message, needle in bad:
            client.send(message)
            event = client.receive()
            assert event["type"] == "error" and needle in event["error"]["message"], (message, event)
            assert event["error"]["code"], (message, event)  # one a client can switch on (some were null)
        client.ws.send("not json")
        assert "one JSON object" in client.receive()["error"]["message"]
        client.ws.send(b"binary")
        assert "not binary ones" in client.receive()["error"]["message"]
        deltas, done = play_turn(client, [{"op": "push_text", "arg": "Still serving."}], None)
        assert done["finish_reason"] == "stop" and deltas
        # text.done before any text: refused (the engine failed the turn as a server error); the turn goes on
        client.send({"type": "turn.start", "user_text": "Hello!"})
        assert client.receive()["type"] == "turn.started"
        client.send({"type": "text.done"})
        event = client.receive()
        assert event["type"] == "error" and event["error"]["code"] == "no_text", event
        deltas, done = play_turn(client, [{"op": "push_text", "arg": "Now with text."}], None)
        assert done["finish_reason"] == "stop" and deltas


def test_a_voice_no_first_turn_fits_is_refused_by_the_update(tmp_path) -> None:
    from mossserve.api import TTS
    from mossserve.config import EngineConfig

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny", engine_config=EngineConfig(max_len=300))) \
            as tts, serve_model(tts, tmp_path) as base:
        with Client(base.replace("http://", "ws://") + "/v1/realtime/speech") as client:
            client.send({"type": "session.update", "session": {"voice_codes": [[1] * 16] * 400}})  # 32 s
            event = client.receive()
            assert event["type"] == "error" and event["error"]["code"] == "bad_message", event
            assert "voice_codes: a first turn with this voice holds" in event["error"]["message"]
            assert "this engine allows 300" in event["error"]["message"]
            deltas, done = play_turn(client, [{"op": "push_text", "arg": "Still speaking."}], None)
            assert done["finish_reason"] == "stop" and deltas


def test_a_socket_past_the_session_limit_is_told_to_retry(tmp_path) -> None:
    """The refusal named close_session, a Python call a socket cannot make."""
    from mossserve.api import TTS
    from mossserve.config import EngineConfig

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny", engine_config=EngineConfig(max_sessions=1))) \
            as tts, serve_model(tts, tmp_path) as base:
        socket = base.replace("http://", "ws://") + "/v1/realtime/speech"
        with Client(socket) as first, Client(socket) as second:
            play_turn(first, [{"op": "push_text", "arg": "I hold the only session."}], None)
            second.send({"type": "text.delta", "delta": "Me too."})
            event = second.receive()
            assert event["type"] == "error" and event["error"]["code"] == "queue_full", event
            assert event["error"]["type"] == "server_overloaded"  # as HTTP's 503 (was invalid_request_error)
            assert "as many realtime sessions as it takes (1)" in event["error"]["message"]
            assert "close_session" not in event["error"]["message"]
        metrics = httpx.get(base + "/metrics").text
        assert 'mossserve_requests_total{endpoint="/v1/realtime/speech",outcome="rejected"} 1.0' in metrics


def test_a_turn_on_an_engine_whose_thread_died_is_told_so(tmp_path) -> None:
    """It was told "the server is shutting down" (the engine refuses such a turn as it refuses one once shut down)."""
    from mossserve.api import TTS

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")) as tts, serve_model(tts, tmp_path) as base:
        tts.engine._worker.stop()
        with Client(base.replace("http://", "ws://") + "/v1/realtime/speech") as client:
            client.send({"type": "text.delta", "delta": "Hello."})
            event = client.receive()
            assert event["type"] == "error" and event["error"]["code"] == "engine_unavailable", event
            assert "the engine's thread has stopped" in event["error"]["message"]


def test_a_new_seed_within_a_context_is_refused(url: str) -> None:
    """The context's first turn seeds it (the reference seeds a session once): a later seed was
    accepted and changed nothing."""
    with Client(url, seed=7) as client:
        play_turn(client, [{"op": "push_text", "arg": "First."}], None)
        client.send({"type": "session.update", "session": {"seed": 7, "speed": 1.0}})  # unchanged: fine
        client.send({"type": "session.update", "session": {"seed": 99}})
        event = client.receive()
        assert event["type"] == "error" and event["error"]["code"] == "seed_fixed", event
        client.send({"type": "session.update", "session": {"seed": 99}, "new_context": True})
        deltas, done = play_turn(client, [{"op": "push_text", "arg": "A new context."}], None)
        assert done["finish_reason"] == "stop" and deltas


def test_bad_token_ids_in_a_turn_fail_the_delta_not_the_session(url: str) -> None:
    """Out-of-vocabulary ids pushed mid-turn get an error event; the turn goes on with the good
    deltas, and the next turn still continues its context (the reference's frames, both turns)."""
    run, got = RUNS["stream_multiturn"], []
    with Client(url, voice_codes=codes("voice")) as client:
        for turn, (spec, user) in enumerate(zip(run["turns"], ["user1", "user2"])):
            client.send({"type": "turn.start", "user_text": spec["reset_turn"]["user_text"],
                         "user_audio_codes": codes(user)})
            for i, op in enumerate(o for o in spec["ops"] if o["op"] in ("push_text", "push_text_tokens")):
                client.send({"type": "text.delta", "delta": op["arg"]} if op["op"] == "push_text"
                            else {"type": "text.delta", "tokens": op["arg"]})
                if turn == 0 and i == 0:
                    client.send({"type": "text.delta", "tokens": [5, 10**9]})
            client.send({"type": "text.done"})
            deltas, errors = [], []
            while True:
                event = client.receive()
                if event["type"] == "audio.done":
                    break
                if event["type"] == "error":
                    errors.append(event["error"]["message"])
                elif event["type"] == "audio.delta":
                    deltas.append(event)
            assert errors == (["text ids must be integers in 0..151935"] if turn == 0 else [])
            assert event["finish_reason"] == "stop"
            got.append(turn_codes(deltas))
    for turn in (0, 1):
        assert np.array_equal(got[turn], expected("stream_multiturn", turn))


def test_a_turn_whose_text_stops_coming_is_ended(tmp_path) -> None:
    """A stalled client (text started, never done) holds a batch slot: after --request-timeout
    seconds without text the turn ends with an error event, and the session goes on."""
    from mossserve.api import TTS

    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")) as tts, \
            serve_model(tts, tmp_path, request_timeout_s=1.0) as base:
        with Client(base.replace("http://", "ws://") + "/v1/realtime/speech") as client:
            client.send({"type": "text.delta", "delta": "Hello"})
            events = []
            while not events or events[-1]["type"] != "audio.done":
                events.append(client.receive())
            errors = [e["error"] for e in events if e["type"] == "error"]
            assert [e["code"] for e in errors] == ["turn_timeout"] and "no text for 1 s" in errors[0]["message"]
            assert errors[0]["type"] == "timeout_error"
            assert events[-1]["finish_reason"] == "aborted"
            deltas, done = play_turn(client, [{"op": "push_text", "arg": "A turn after it."}], None)
            assert done["finish_reason"] == "stop" and deltas
        assert tts.engine.stats()["live"] == 0
        metrics = httpx.get(base + "/metrics").text
        assert 'mossserve_requests_total{endpoint="/v1/realtime/speech",outcome="timeout"} 1.0' in metrics


def test_a_turns_watchdog_ends_with_its_turn(url: str, monkeypatch) -> None:
    """Each turn's no-text watchdog slept out the whole --request-timeout (300 s) after its turn had
    ended, holding the session (and its socket) that long after the client left; thousands piled up
    on a busy server."""
    from mossserve.serve.realtime import RealtimeSession

    watchdogs, running = [], threading.Event()
    watch = RealtimeSession.end_if_text_stops

    async def recorded(self, *args):
        watchdogs.append(asyncio.current_task())
        running.set()  # the watchdog's first wait follows in this same step of the server's loop
        await watch(self, *args)

    monkeypatch.setattr(RealtimeSession, "end_if_text_stops", recorded)
    with Client(url, voice_codes=codes("voice")) as client:
        for end in ("text.done", "turn.cancel"):
            running.clear()
            client.send({"type": "text.delta", "delta": "A turn whose text comes and then ends."})
            assert running.wait(60)
            client.send({"type": end})
            client.until_done()
            ended = threading.Event()
            watchdogs[-1].get_loop().call_soon_threadsafe(lambda: watchdogs[-1].add_done_callback(lambda _: ended.set()))
            assert ended.wait(30), f"the watchdog of a turn ended by {end} still waits"


def test_a_model_without_sessions_says_so(server_app) -> None:
    with live_server(server_app()) as base, connect(base.replace("http://", "ws://") + "/v1/realtime/speech",
                                                     open_timeout=30) as ws:  # the demo: the Delay family
        event = json.loads(ws.recv(timeout=30))
        assert event["type"] == "error" and "no realtime sessions" in event["error"]["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)


def test_the_api_key_guards_the_socket(server_app) -> None:
    with live_server(server_app(api_key="k")) as base:
        ws_url = base.replace("http://", "ws://") + "/v1/realtime/speech"
        with pytest.raises(InvalidStatus, match="403"), connect(ws_url, open_timeout=30):
            pass
        with connect(ws_url, open_timeout=30, additional_headers={"Authorization": "Bearer k"}) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "error"  # admitted; the demo model has no sessions
        # A browser cannot set headers: the key as a subprotocol, which the server selects back.
        with pytest.raises(InvalidStatus, match="403"), connect(ws_url, open_timeout=30,
                                                                  subprotocols=["mossserve-api-key.wrong"]):
            pass
        with connect(ws_url, open_timeout=30, subprotocols=["mossserve-api-key.k"]) as ws:
            assert ws.subprotocol == "mossserve-api-key.k"
            assert json.loads(ws.recv(timeout=30))["type"] == "error"


def test_plain_speech_requests_on_the_realtime_and_local_models(url: str, tmp_path) -> None:
    """/v1/audio/speech serves both families (Realtime: the offline path; Local: all its codebooks)."""
    import httpx
    from local_cases import make_model_dir

    from mossserve.api import TTS
    from mossserve.speech_request import SpeechRequest

    base = url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
    body = {"input": "Welcome to the world of MOSS TTS Realtime.", "response_format": "wav", "temperature": 0}
    response = httpx.post(base + "/v1/audio/speech", json=body, timeout=60)
    assert response.status_code == 200 and float(response.headers["x-audio-seconds"]) > 0
    refused = httpx.post(base + "/v1/audio/speech", json={**body, "instructions": "whisper"}, timeout=60)
    assert refused.status_code == 400 and "instructions" in refused.json()["error"]["message"]

    tts = TTS.from_pretrained(make_model_dir(tmp_path / "local"), codec=CODEC_DIR / "tiny")
    try:
        with serve_model(tts, tmp_path / "data") as local:
            response = httpx.post(local + "/v1/audio/speech", json={"input": "Hello there.", "response_format": "wav",
                                                                     "temperature": 0}, timeout=60)
            assert response.status_code == 200 and float(response.headers["x-audio-seconds"]) > 0
            # depth K: the Python API's audio at that depth; out of range is the family's own 400.
            shallow = httpx.post(local + "/v1/audio/speech", json={"input": "Hello there.", "response_format": "pcm",
                                                                    "temperature": 0, "depth": 4}, timeout=60)
            assert shallow.status_code == 200
            samples = np.frombuffer(shallow.content, dtype="<i2").astype(np.float32) / 32768
            expected = tts.synthesize(SpeechRequest(input="Hello there.", depth=4), tts.talker.default_sampling()
                                      .with_overrides(audio_temperature=0.0, text_temperature=0.0)).samples[0]
            assert len(samples) == len(expected)
            np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=2 / 32768)
            for depth in (99, 0):  # one message either side of the range (0 was pydantic's "greater than or equal")
                deep = httpx.post(local + "/v1/audio/speech", json={"input": "Hello there.", "depth": depth}, timeout=60)
                assert deep.status_code == 400 and "depth must be an integer in 1..32" in deep.json()["error"]["message"]
            fish_only = httpx.post(local + "/v1/audio/speech", json={"input": "Hello.", "chunk_length": 40}, timeout=60)
            assert fish_only.status_code == 400 and "chunk_length" in fish_only.json()["error"]["message"]
    finally:
        tts.close()


def test_deltas_cut_where_the_reference_cuts_give_the_codes_of_the_whole_text(url: str) -> None:
    """The reference tokenises each segment alone (README §8.4): deltas that end where its segmenter
    cuts give the same ids, so the same codes, as the whole text in one delta."""
    pieces = ["Nice to meet you, my friend. ", "How are you today? ", "I am fine, thanks for asking."]

    def speak(deltas: list[str]) -> np.ndarray:
        with Client(url, voice_codes=codes("voice")) as client:
            ops = [{"op": "push_text", "arg": d} for d in deltas]
            found, done = play_turn(client, ops, {"user_text": "Hello!", "user_audio_codes": codes("user1")})
            assert done["finish_reason"] == "stop"
            return turn_codes(found)

    whole = speak(["".join(pieces)])
    assert len(whole) > 3
    assert np.array_equal(speak(pieces), whole)
    # other cuts tokenise differently (the reference's own behaviour), and the codes show it: the
    # equality above is not the model ignoring its text
    cut_elsewhere = speak(["Nice to meet you,", " my friend. How are you today? I am fine,", " thanks for asking."])
    assert not np.array_equal(cut_elsewhere, whole)


def test_turns_and_refusals_are_counted_in_the_metrics(url: str) -> None:
    """Each turn's outcome (ok, cancelled) and each refused message (client_error) is in
    mossserve_requests_total under the socket's path, and the turns' audio in the audio total."""
    metrics_url = url.replace("ws://", "http://").removesuffix("/v1/realtime/speech") + "/metrics"

    def read() -> dict[str, float]:
        figures = {}
        for line in httpx.get(metrics_url).text.splitlines():
            if line.startswith('mossserve_requests_total{endpoint="/v1/realtime/speech"'):
                figures[line.split('outcome="')[1].split('"')[0]] = float(line.split()[-1])
            elif line.startswith("mossserve_audio_seconds_total "):
                figures["audio_seconds"] = float(line.split()[-1])
        return figures

    before = read()
    with Client(url, voice_codes=codes("voice"), initial_chunk_frames=1) as client:
        client.send({"type": "dance"})
        assert client.receive()["type"] == "error"
        cancel_and_continue(client)  # a cancelled turn, then one that finishes
        after = read()
    grew = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    assert grew.pop("audio_seconds") > 0
    assert grew == {"ok": 1, "cancelled": 1, "client_error": 1} | {k: 0 for k in grew if k not in
                                                                   ("ok", "cancelled", "client_error")}


def test_a_turn_whose_socket_closes_at_once_is_counted_disconnected(url: str) -> None:
    """The socket closes right after the text that opened a turn, before the turn's audio sender has
    run: a task cancelled before its first step never runs its `finally`, which counted the turn, so
    such turns were never counted at all."""
    metrics_url = url.replace("ws://", "http://").removesuffix("/v1/realtime/speech") + "/metrics"

    def disconnected() -> float:
        line = 'mossserve_requests_total{endpoint="/v1/realtime/speech",outcome="disconnected"}'
        return sum(float(row.split()[-1]) for row in httpx.get(metrics_url).text.splitlines() if row.startswith(line))

    before = disconnected()
    for _ in range(3):
        with Client(url) as client:
            client.send({"type": "text.delta", "delta": "Hello there, how are you today?"})
    deadline = time.monotonic() + 60
    while disconnected() < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # polls the server's count (the socket's end runs on the server's loop)
    assert disconnected() == before + 3
