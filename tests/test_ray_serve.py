"""The Ray Serve application on a local Ray instance (127.0.0.1, CPU): the real openai client
through Serve's proxy gives the single-process server's bytes; two replicas share the load, the
voices and the metrics; a realtime session stays on one replica; a killed replica costs only its
own sessions and comes back."""
from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from conftest import AUDIO_DIR, CODEC_DIR
from realtime_cases import REALTIME_DIR
from server_harness import serve_model
from test_server_realtime import Client, codes, expected, multiturn
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from mossserve.audio import read_audio

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

SEED = 7
TEXT = "Hello from the cluster."
FORMATS = ["wav", "pcm", "flac", "mp3", "opus", "aac"]
VOICE = (AUDIO_DIR / "reference_zh.wav").read_bytes()
DEADLINE_S = 120
REALTIME = {}  # the /rt application's settings, to scale it down with the same ones


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance; `mossserve serve --ray --replicas 2` deploys the demo checkpoint at /
    through it, and the test adds the Realtime fixture (two replicas) at /rt. Yields the base URL."""
    from mossserve.distributed import RayOptions, build_app
    from mossserve.serve import ServerSettings

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="warning")
    port, log = free_port(), tmp_path_factory.mktemp("ray_cli") / "serve.log"
    run_cli = "import sys; from mossserve.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", run_cli, "serve", "--ray", "--replicas", "2", "--port", str(port),
               "--ray-address", ray.get_runtime_context().gcs_address, "--voice-service",
               "--data-dir", str(tmp_path_factory.mktemp("ray_demo"))]
    with open(log, "wb") as out:
        cli = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, cli, log)
        REALTIME["settings"] = ServerSettings(model=str(REALTIME_DIR), codec=str(CODEC_DIR / "tiny"),
                                              data_dir=tmp_path_factory.mktemp("ray_rt"))
        realtime = build_app(REALTIME["settings"], RayOptions(replicas=2))
        serve.run(realtime, name="rt", route_prefix="/rt", logging_config={"log_level": "WARNING"})
        yield url
    finally:
        cli.terminate()  # SIGTERM, as a process manager stops it: the command removes its app and exits 0
        try:
            code = cli.wait(timeout=90)
            left = set(serve.status().applications)
        except subprocess.TimeoutExpired:
            cli.kill()
            raise AssertionError(log.read_text()[-3000:]) from None
        finally:
            ray.shutdown()
        assert code == 0, log.read_text()[-3000:]
        assert left == {"rt"}  # it joined the cluster: the other application on it keeps running


def wait_ready(url: str, cli: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 240
    while True:
        assert cli.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)  # polling the command's port under a deadline


@pytest.fixture(scope="module")
def direct(demo_tts, tmp_path_factory):
    """The single-process server on the same checkpoint: the bytes every Ray response must equal."""
    with serve_model(demo_tts, tmp_path_factory.mktemp("direct")) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def speech(url: str, **body) -> httpx.Response:
    r = httpx.post(url + "/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "seed": SEED, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def replica_of(response) -> str:
    return response.headers["x-mossserve-replica"]


@pytest.mark.parametrize("format", FORMATS)
def test_openai_client_gets_the_single_process_bytes(cluster, direct, format) -> None:
    def create(url: str) -> bytes:
        return client(url).audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=format,
                                               extra_body={"seed": SEED}).content

    ray_bytes, direct_bytes = create(cluster), create(direct)
    assert len(ray_bytes) > 1000
    if format == "opus":  # an Ogg stream has a random serial number: the same packets, decoded
        assert np.array_equal(read_audio(ray_bytes)[0], read_audio(direct_bytes)[0])
    else:
        assert ray_bytes == direct_bytes


@pytest.mark.parametrize("format", ["wav", "pcm", "mp3"])
def test_streaming_through_the_proxy(cluster, direct, format) -> None:
    def stream(url: str) -> tuple[bytes, int]:
        with client(url).audio.speech.with_streaming_response.create(
                model="tts-1", voice="echo", input=TEXT, response_format=format,
                extra_body={"seed": SEED, "stream": True, "initial_chunk_frames": 1}) as response:
            assert response.headers["content-type"].startswith("audio/")
            parts = list(response.iter_bytes())
        return b"".join(parts), len(parts)

    (ray_bytes, chunks), (direct_bytes, _) = stream(cluster), stream(direct)
    assert ray_bytes == direct_bytes and chunks > 1


def test_sse_through_the_proxy(cluster, direct) -> None:
    def events(url: str) -> list[dict]:
        with httpx.stream("POST", url + "/v1/audio/speech", timeout=60, json={
                "model": "tts-1", "input": TEXT, "seed": SEED, "response_format": "pcm", "stream_format": "sse",
                "initial_chunk_frames": 1}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return [json.loads(line[len("data: "):]) for line in r.iter_lines() if line]

    got = events(cluster)
    assert got == events(direct)
    assert [e["type"] for e in got[-2:]] == ["speech.audio.delta", "speech.audio.done"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in got[:-1])
    assert audio == speech(cluster, response_format="pcm", initial_chunk_frames=1).content


def test_32_concurrent_requests_complete_on_both_replicas(cluster) -> None:
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda i: speech(cluster, response_format="pcm", seed=i), range(32)))
    assert all(len(r.content) > 0 for r in responses)
    assert len({replica_of(r) for r in responses}) == 2
    alone = np.frombuffer(speech(cluster, response_format="pcm", seed=3).content, "<i2").astype(int)
    batched = np.frombuffer(responses[3].content, "<i2").astype(int)
    assert batched.shape == alone.shape and np.abs(batched - alone).max() <= 2  # batched codec: float rounding


def upload(url: str, name: str) -> httpx.Response:
    return httpx.post(url + "/v1/audio/voices", data={"name": name}, files={"file": ("v.wav", VOICE, "audio/wav")},
                      timeout=60)


def until_the_other_replica(url: str, first: str, request) -> httpx.Response:
    """Repeat `request` until a replica other than `first` answers (the router picks by load)."""
    deadline = time.monotonic() + DEADLINE_S
    while replica_of(r := request()) == first:
        assert time.monotonic() < deadline, f"every request went to replica {first}"
    return r


def test_a_voice_uploaded_through_one_replica_is_used_by_the_other(cluster, direct) -> None:
    """The CLI's app runs with --voice-service: one VoiceService owns the voices for every replica."""
    r = upload(cluster, "zoe")
    assert r.status_code == 201, r.text
    assert upload(direct, "zoe").status_code == 201
    want = speech(direct, voice="zoe", response_format="wav").content
    assert want != speech(direct, response_format="wav").content  # the voice changes the audio
    other = until_the_other_replica(cluster, replica_of(r), lambda: speech(cluster, voice="zoe", response_format="wav"))
    assert other.content == want
    taken = until_the_other_replica(cluster, replica_of(r), lambda: upload(cluster, "Zoe"))
    assert taken.status_code == 409 and "already" in taken.json()["error"]["message"]
    audio = "/v1/audio/voices/zoe/audio"
    listened = until_the_other_replica(cluster, replica_of(r), lambda: httpx.get(cluster + audio))
    assert listened.status_code == 200
    heard, stored = read_audio(listened.content)[0], read_audio(httpx.get(direct + audio).content)[0]
    assert heard.shape == stored.shape and np.abs(heard - stored).max() <= 2 / 32768  # 16-bit rounding of two processes


def test_replicas_on_one_machine_share_the_data_directory(cluster) -> None:
    """The Realtime app runs without --voice-service: its replicas open one SQLite store (WAL)."""
    r = upload(cluster + "/rt", "ada")
    assert r.status_code == 201, r.text
    body = {"input": TEXT, "temperature": 0, "response_format": "pcm", "max_new_tokens": 8}
    plain = httpx.post(cluster + "/rt/v1/audio/speech", json=body, timeout=60)
    other = until_the_other_replica(cluster, replica_of(r), lambda: httpx.post(
        cluster + "/rt/v1/audio/speech", json={**body, "voice": "ada"}, timeout=60))
    assert (other.status_code, plain.status_code) == (200, 200), (other.text, plain.text)
    assert other.content != plain.content


def speech_ok_counts(text: str) -> dict[str, float]:
    """Each replica's count of successful speech requests in the cluster's /metrics text."""
    prefix = 'mossserve_requests_total{endpoint="/v1/audio/speech",outcome="ok",replica="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def test_metrics_of_every_replica_labelled(cluster) -> None:
    """Each replica's requests show up under its own label once its one-second metrics push lands."""
    before = speech_ok_counts(httpx.get(cluster + "/metrics", timeout=10).text)
    first = replica_of(speech(cluster, response_format="pcm", seed=0))
    other = replica_of(until_the_other_replica(cluster, first, lambda: speech(cluster, response_format="pcm", seed=1)))
    deadline = time.monotonic() + DEADLINE_S
    while True:  # replicas push their metrics every second
        text = httpx.get(cluster + "/metrics", timeout=10).text
        now = speech_ok_counts(text)
        if all(now.get(r, 0) > before.get(r, 0) for r in (first, other)):
            break
        assert time.monotonic() < deadline, text[:2000]
    assert 'mossserve_kv_cache_slots{replica="' in text


def test_metrics_under_a_route_prefix_are_every_replicas(cluster) -> None:
    """Under /rt the app's /metrics is /rt/metrics: answered from the /rt app's board, both replicas labelled."""
    deadline = time.monotonic() + DEADLINE_S
    while True:  # replicas push their metrics every second
        text = httpx.get(cluster + "/rt/metrics", timeout=10).text
        if set(re.findall(r'replica="(\w+)"', text)) == live_replicas("rt"):
            break
        assert time.monotonic() < deadline, text[:2000]
    assert 'mossserve_kv_cache_slots{replica="' in text


def test_ready_and_replica_health(cluster) -> None:
    r = httpx.get(cluster + "/ready", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready"
    status = serve.status().applications["mossserve"].deployments["SpeechServer"]
    assert status.replica_states.get("RUNNING") == 2


def rt_url(cluster: str) -> str:
    return cluster.replace("http://", "ws://") + "/rt/v1/realtime/speech"


def test_realtime_sessions_stay_on_one_replica(cluster) -> None:
    """Each session's turns continue one KV context, so the reference's multi-turn goldens come
    back only if every turn ran on the replica that accepted the socket."""
    def session(_) -> tuple[str, list[np.ndarray]]:
        with Client(rt_url(cluster), voice_codes=codes("voice")) as c:
            return c.ws.response.headers["x-mossserve-replica"], multiturn(c)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(session, range(4)))
    for _, turns in results:
        for turn in (0, 1):
            assert np.array_equal(turns[turn], expected("stream_multiturn", turn))


def live_replicas(app: str) -> set[str]:
    prefix = f"SERVE_REPLICA::{app}#SpeechServer#"  # the application's replica actors
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def kill(app: str, replica: str) -> None:
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{app}#SpeechServer#{replica}", namespace="serve"), no_restart=True)


def wait_for_two_replicas(app: str) -> set[str]:
    deadline = time.monotonic() + DEADLINE_S
    while len(live := live_replicas(app)) != 2:
        assert time.monotonic() < deadline, f"Serve did not bring {app} back to two replicas: {live}"
        time.sleep(0.5)  # polling Ray's actor table under a deadline
    return live


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_a_killed_replica_cuts_its_streams_and_later_requests_succeed(cluster, stream_format) -> None:
    """Greedy, this input is 3.4 s of audio (42 frames), streamed frame by frame: the replica dies
    after the first chunk, long before the last."""
    wait_for_two_replicas("rt")
    body = {"input": "Hello there, this is a somewhat long sentence to speak out loud for the test. " * 3,
            "temperature": 0, "stream": True, "stream_format": stream_format, "response_format": "pcm",
            "initial_chunk_frames": 1}
    with httpx.stream("POST", cluster + "/rt/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        next(chunks)
        victim = replica_of(r)
        kill("rt", victim)
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):  # never a complete-looking end
            for _ in chunks:
                pass
    for _ in range(4):
        whole = {name: value for name, value in body.items() if name not in ("stream", "stream_format")}
        r = httpx.post(cluster + "/rt/v1/audio/speech", json=whole, timeout=60)
        assert r.status_code == 200 and replica_of(r) != victim and float(r.headers["x-audio-seconds"]) > 3


def test_a_killed_replica_ends_its_sessions_and_comes_back(cluster) -> None:
    before = wait_for_two_replicas("rt")
    with connect(rt_url(cluster), open_timeout=30) as ws:
        victim = ws.response.headers["x-mossserve-replica"]
        assert json.loads(ws.recv(timeout=60))["type"] == "session.created"
        ws.send(json.dumps({"type": "session.update", "session": {"temperature": 0}}))
        ws.send(json.dumps({"type": "text.delta", "delta": "A turn whose text never ends, so it is in flight."}))
        assert [json.loads(ws.recv(timeout=60))["type"] for _ in range(2)] == ["turn.started", "audio.delta"]
        kill("rt", victim)
        with pytest.raises(ConnectionClosedError):  # no close frame: the client knows the session was cut
            while True:
                ws.recv(timeout=60)
    for _ in range(6):  # every later session succeeds, on the surviving replica or the new one
        with Client(rt_url(cluster), voice_codes=codes("voice")) as c:
            assert c.ws.response.headers["x-mossserve-replica"] != victim
            assert np.array_equal(multiturn(c)[0], expected("stream_multiturn", 0))
    after = wait_for_two_replicas("rt")
    assert victim not in after
    newcomer = (after - before).pop()
    deadline = time.monotonic() + DEADLINE_S
    while True:  # the replacement takes sessions once it is ready
        with Client(rt_url(cluster), voice_codes=codes("voice")) as c:
            if c.ws.response.headers["x-mossserve-replica"] == newcomer:
                break
        assert time.monotonic() < deadline, f"the new replica {newcomer} never took a session"


def test_a_stopping_replica_drains_its_sessions(cluster) -> None:
    """Redeploying /rt with one replica stops the two old ones (a redeploy from a driver is a new
    version) the way a scale-down stops a replica: gracefully. A turn in flight on every old replica
    when the stopping begins still completes."""
    from mossserve.distributed import RayOptions, build_app

    before = wait_for_two_replicas("rt")
    sessions: dict[str, Client] = {}
    deadline = time.monotonic() + DEADLINE_S
    while len(sessions) < 2:  # one open session per replica
        c = Client(rt_url(cluster), voice_codes=codes("voice")).__enter__()
        replica = c.ws.response.headers["x-mossserve-replica"]
        if replica in sessions:
            c.__exit__(None, None, None)
        else:
            c.send({"type": "text.delta", "delta": "A turn that is still being written when the scale-down begins."})
            assert [c.receive()["type"] for _ in range(2)] == ["turn.started", "audio.delta"]
            sessions[replica] = c
        assert time.monotonic() < deadline, "the router never sent a session to the second replica"
    one = build_app(REALTIME["settings"], RayOptions(replicas=1))
    with ThreadPoolExecutor(1) as pool:
        deployed = pool.submit(serve.run, one, name="rt", route_prefix="/rt", logging_config={"log_level": "WARNING"})
        deadline = time.monotonic() + DEADLINE_S
        while not serve.status().applications["rt"].deployments["SpeechServer"].replica_states.get("STOPPING"):
            assert time.monotonic() < deadline, "the scale-down never began"
            time.sleep(0.2)  # polling Serve's status under a deadline
        for c in sessions.values():  # the stopping replicas still finish their turns
            c.send({"type": "text.done"})
            assert c.until_done()[1]["finish_reason"] == "stop"
            c.__exit__(None, None, None)
        deployed.result(timeout=DEADLINE_S)
    deadline = time.monotonic() + DEADLINE_S
    while len(live := live_replicas("rt")) != 1:
        assert time.monotonic() < deadline, live
        time.sleep(0.2)  # polling Ray's actor table under a deadline
    assert not live & before  # every old replica stopped, each only after its session ended
