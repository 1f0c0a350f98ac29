"""The voice library over HTTP: upload, list, fetch, use by name or inline, delete, persistence
across restarts, and refusals of bad names and bad audio."""
from __future__ import annotations

import base64
import hashlib
import io
import time
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO_DIR
from fish_cases import FISH_DIR
from server_harness import live_server, serve_model

VOICES = "/v1/audio/voices"
SPEECH = "/v1/audio/speech"
MAX_BODY_BYTES = 700_000
MAX_VOICE_SECONDS = 5.0
REFERENCE = (AUDIO_DIR / "reference_zh.wav").read_bytes()  # 3.1 s, 48 kHz mono, 448 KB
TOO_LONG = (AUDIO_DIR / "reference_en_0.mp3").read_bytes()  # 6.6 s, 90 KB


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


_samples, _rate = sf.read(io.BytesIO(REFERENCE), dtype="float32")
SHORT = wav_bytes(_samples[:_rate], _rate)  # the first second, 96 KB
TOO_BIG = wav_bytes(np.tile(_samples, 3), _rate)  # 896 KB: over the body limit
TONE = wav_bytes(0.3 * np.sin(2 * np.pi * 220 * np.arange(7200) / 24000), 24000)  # 0.3 s


def make_app(demo_tts, data_dir):
    from mossserve.serve import ServerSettings, create_app

    return create_app(ServerSettings(data_dir=data_dir, max_body_bytes=MAX_BODY_BYTES,
                                     max_voice_seconds=MAX_VOICE_SECONDS), tts=demo_tts)


@pytest.fixture(scope="module")
def server(demo_tts, tmp_path_factory):
    with live_server(make_app(demo_tts, tmp_path_factory.mktemp("voices"))) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


def upload(client: httpx.Client, name: str, audio: bytes = REFERENCE, transcript: str | None = None,
           field: str = "file") -> httpx.Response:
    data = {"name": name} if transcript is None else {"name": name, "transcript": transcript}
    return client.post(VOICES, data=data, files={field: ("voice.wav", audio, "audio/wav")})


def speak(client: httpx.Client, **body) -> np.ndarray:
    """A wav request that must succeed; returns the decoded samples."""
    r = client.post(SPEECH, json={"input": "Hello.", "response_format": "wav", **body})
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 24000 and len(audio) > 0
    return audio


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def speaker_stats(demo_tts) -> dict:
    return demo_tts.stats()["speakers"]


@pytest.fixture(scope="module")
def alice(server) -> dict:
    r = upload(server, "alice", transcript="A Chinese reference.")
    assert r.status_code == 201, r.text
    return r.json()


def test_upload_returns_the_voice(alice, demo_tts):
    assert alice["id"] == alice["name"] == "alice"
    assert alice["object"] == "audio.voice" and alice["type"] == "audio_sample"  # OpenAI's custom voice object
    assert isinstance(alice["created_at"], int) and abs(alice["created_at"] - time.time()) < 600
    assert alice["transcript"] == "A Chinese reference."
    assert alice["duration_s"] == pytest.approx(3.112, abs=0.01)
    assert alice["sample_rate"] == 24000
    assert alice["frames"] > 0 and alice["codebooks"] == demo_tts.talker.codebooks
    assert alice["sha256"] == hashlib.sha256(REFERENCE).hexdigest()
    assert "codec" not in alice  # the codec's identity is a path on the server


def test_list_get_and_audio(server, alice):
    listed = server.get(VOICES).json()
    assert listed["object"] == "list" and alice in listed["data"]
    assert server.get(f"{VOICES}/alice").json() == alice
    r = server.get(f"{VOICES}/alice/audio")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(r.content))
    assert rate == alice["sample_rate"] and len(audio) / rate == pytest.approx(alice["duration_s"], abs=1e-3)


@pytest.mark.parametrize("body", [
    {"voice": "alice"},
    {"voice": {"id": "alice"}},
    {"ref_audio": "alice"},
    {"ref_audio": base64.b64encode(REFERENCE).decode()},
    {"ref_audio": "data:audio/wav;base64," + base64.b64encode(REFERENCE).decode()},
    # FileReader.readAsDataURL of a Firefox recording (its type has a parameter after a space)
    {"ref_audio": "DATA:audio/ogg; codecs=opus;base64," + base64.b64encode(REFERENCE).decode()},
], ids=["voice", "voice-object", "ref-audio-name", "ref-audio-base64", "ref-audio-data-url", "ref-audio-data-url-params"])
def test_speech_with_the_voice(server, alice, demo_tts, body):
    before = speaker_stats(demo_tts)["encodes"]
    speak(server, **body)
    assert speaker_stats(demo_tts)["encodes"] == before  # encoded once, at upload


def test_voice_and_inline_audio_together_is_refused(server, alice):
    r = server.post(SPEECH, json={"input": "Hi.", "voice": "alice", "ref_audio": base64.b64encode(SHORT).decode()})
    assert "not both" in error_of(r, 400)["message"]


def test_openai_client_with_stored_voice(server, alice):
    import openai

    client = openai.OpenAI(base_url=str(server.base_url.join("/v1")), api_key="x", max_retries=0)
    response = client.audio.speech.create(model="tts-1", voice="alice", input="Hello.", response_format="wav")
    audio, rate = sf.read(io.BytesIO(response.content))
    assert rate == 24000 and len(audio) > 0


@pytest.mark.parametrize("name", ["alice", "ALICE"])
def test_name_taken(server, alice, name):
    r = upload(server, name, SHORT)
    error = error_of(r, 409)
    assert error["code"] == "voice_exists" and "already exists" in error["message"]
    assert r.headers["x-should-retry"] == "false"  # OpenAI's clients retry a 409 otherwise
    assert server.get(f"{VOICES}/alice").json() == alice  # untouched


def test_delete(server):
    assert upload(server, "bob", SHORT).status_code == 201
    r = server.delete(f"{VOICES}/BOB")  # names match whatever their case; the answer gives the stored one
    assert r.status_code == 200 and r.json() == {"id": "bob", "object": "audio.voice.deleted", "deleted": True}
    for method, path in [("GET", "bob"), ("GET", "bob/audio"), ("DELETE", "bob")]:
        assert error_of(server.request(method, f"{VOICES}/{path}"), 404)["code"] == "voice_not_found"
    assert "bob" not in [v["name"] for v in server.get(VOICES).json()["data"]]
    error = error_of(server.post(SPEECH, json={"input": "Hi.", "voice": "bob"}), 400)
    assert error["code"] == "voice_not_found" and "'bob'" in error["message"]
    # the name is free again
    assert upload(server, "bob", SHORT).status_code == 201


def test_a_page_of_another_site_cannot_store_a_voice(demo_tts, tmp_path):
    """A multipart POST is a "simple" request any web page may send without CORS's leave: without an
    API key, a page of any site stored voices on a server on localhost."""
    with live_server(make_app(demo_tts, tmp_path)) as url:
        def post(name: str, origin: str) -> httpx.Response:
            return httpx.post(url + VOICES, data={"name": name}, headers={"Origin": origin},
                              files={"file": ("v.wav", SHORT, "audio/wav")})

        refused = post("mallory", "https://evil.example")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
        assert post("own", url).status_code == 201  # the playground, served here
        assert [v["name"] for v in httpx.get(url + VOICES).json()["data"]] == ["own"]


def test_voices_survive_a_restart(demo_tts, tmp_path):
    with live_server(make_app(demo_tts, tmp_path)) as url:
        r = httpx.post(url + VOICES, data={"name": "carol"}, files={"file": ("c.wav", SHORT, "audio/wav")})
        assert r.status_code == 201, r.text
        carol = r.json()
    codes = tmp_path / "voices" / "carol" / "codes.npy"
    stored, mtime = codes.read_bytes(), codes.stat().st_mtime_ns

    with live_server(make_app(demo_tts, tmp_path)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get(VOICES).json()["data"] == [carol]
        before = speaker_stats(demo_tts)
        speak(client, voice="carol")
        speak(client, ref_audio="carol")
        assert speaker_stats(demo_tts) == before  # the stored codes were used, nothing encoded or looked up
    assert codes.read_bytes() == stored and codes.stat().st_mtime_ns == mtime


def test_a_stored_voice_past_a_restarted_servers_limit_is_refused_by_name(demo_tts, tmp_path, monkeypatch):
    """Stored under a larger --max-voice-seconds: with the same codec its codes were used as they were,
    and re-encoded for another codec it was refused naming a hash of its audio."""
    from dataclasses import replace

    from mossserve.serve import ServerSettings, create_app

    with live_server(make_app(demo_tts, tmp_path)) as url:
        assert httpx.post(url + VOICES, data={"name": "long"}, files={"file": ("l.wav", REFERENCE, "audio/wav")},
                          ).status_code == 201
    stricter = create_app(ServerSettings(data_dir=tmp_path, max_voice_seconds=1.0), tts=demo_tts)
    with live_server(stricter) as url, httpx.Client(base_url=url, timeout=60) as client:
        for field in ("voice", "ref_audio"):
            r = client.post(SPEECH, json={"input": "Hello.", field: "long"})
            assert r.status_code == 400 and "the stored voice 'long' is" in r.json()["error"]["message"], r.text
            assert "this server takes voices up to 1 s" in r.json()["error"]["message"]
        store = stricter.state.server.voices
        stale = store.get("long")
        monkeypatch.setattr(store, "get", lambda name: replace(stale, codec="another codec", duration_s=0.5))
        monkeypatch.setattr(store, "codes", lambda name, codec=None: None)  # none of this server's codec
        r = client.post(SPEECH, json={"input": "Hello.", "voice": "long"})  # re-encoded: its audio is too long
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and message.startswith("the stored voice 'long': ") and "too long" in message


@pytest.mark.parametrize("name", ["../x", ".hidden", "a b", "a/b", "x" * 65, "é"])
def test_bad_names_are_refused(server, name):
    error = error_of(upload(server, name, SHORT), 400)
    assert error["code"] == "invalid_voice_name" and error["param"] == "name"
    assert "invalid voice name" in error["message"] and "1 to 64 characters" in error["message"]
    assert all(v["name"] != name for v in server.get(VOICES).json()["data"])


def test_file_over_the_body_limit(server):
    error = error_of(upload(server, "huge", TOO_BIG), 413)
    assert error["code"] == "body_too_large" and str(MAX_BODY_BYTES) in error["message"]


@pytest.mark.parametrize("audio, needle", [
    (np.random.default_rng(0).bytes(20_000), "cannot decode"),
    (REFERENCE[:30], "cannot decode"),  # cut inside the RIFF header
    (REFERENCE[:44], "no samples"),  # a header and no data
    (b"", "empty"),
], ids=["random-bytes", "truncated-header", "header-only", "empty"])
def test_corrupt_audio(server, audio, needle):
    error = error_of(upload(server, "corrupt", audio), 400)
    assert error["code"] == "invalid_audio" and needle in error["message"] and error["param"] == "file"
    error_of(server.get(f"{VOICES}/corrupt"), 404)


def test_audio_over_max_voice_seconds(server):
    error = error_of(upload(server, "long", TOO_LONG), 400)
    assert error["code"] == "invalid_audio" and "too long" in error["message"] and "5 s" in error["message"]
    assert error["param"] == "file"
    # the same limit holds for inline reference audio
    r = server.post(SPEECH, json={"input": "Hi.", "ref_audio": base64.b64encode(TOO_LONG).decode()})
    assert "too long" in error_of(r, 400)["message"]


def test_missing_fields(server):
    error = error_of(server.post(VOICES, data={"name": "nofile"}), 400)
    assert error["param"] == "file" and "file" in error["message"]
    r = server.post(VOICES, files={"file": ("v.wav", SHORT, "audio/wav")})
    assert error_of(r, 400)["message"] == "name is required"


def test_a_transcript_past_the_text_limit_is_refused(server):
    """It becomes the ref_text of every request that uses the voice: the same bound as a request's text."""
    r = server.post(VOICES, data={"name": "talker", "transcript": "a" * 4097}, files={"file": ("v.wav", SHORT, "audio/wav")})
    error = error_of(r, 400)
    assert error["param"] == "transcript" and "at most 4096" in error["message"]
    assert server.get(f"{VOICES}/talker").status_code == 404


def test_a_transcript_that_spells_a_special_token_is_refused(server):
    """It was stored, and every request that took it as its ref_text then failed with a message about
    "audio blocks"."""
    r = server.post(VOICES, data={"name": "marker", "transcript": "Hi <|audio_start|>"},
                    files={"file": ("v.wav", SHORT, "audio/wav")})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "transcript" and "transcript contains the special token(s) <|audio_start|>" in error["message"]
    assert server.get(f"{VOICES}/marker").status_code == 404


def test_audio_sample_field_is_accepted(server):
    r = upload(server, "dave", SHORT, field="audio_sample")  # OpenAI's name for the file field
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("fields", [("file", "audio_sample"), ("file", "file")],
                         ids=["file-and-audio_sample", "file-twice"])
def test_two_files_are_refused(server, fields):
    files = [(f, (f"{i}.wav", SHORT, "audio/wav")) for i, f in enumerate(fields)]
    error = error_of(server.post(VOICES, data={"name": "twofiles"}, files=files), 400)
    assert "exactly one" in error["message"]
    error_of(server.get(f"{VOICES}/twofiles"), 404)


def test_an_unexpected_failure_is_a_json_500_and_the_server_goes_on(server, monkeypatch):
    """A bug while handling a request (here the audio loader raising what it never should) reaches the
    client in the API's error shape, not as a plain-text 500."""
    from mossserve.serve import voice_routes

    def broken(*args, **kwargs):
        raise ValueError("all the input arrays must have the same shape")

    def failed() -> float:
        line = 'mossserve_requests_total{endpoint="/v1/audio/voices",outcome="error"} '
        found = [x for x in server.get("/metrics").text.splitlines() if x.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    before = failed()
    monkeypatch.setattr(voice_routes, "load_audio", broken)
    r = upload(server, "broken", SHORT)
    error = error_of(r, 500)
    assert r.headers["x-should-retry"] == "false"  # the same bug again: a retry cannot help
    assert failed() == before + 1
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert "ValueError: all the input arrays" in error["message"]
    monkeypatch.undo()
    assert upload(server, "after-the-bug", SHORT).status_code == 201
    assert server.delete(f"{VOICES}/after-the-bug").status_code == 200


def test_a_voice_deleted_while_it_is_read_is_not_found_or_still_used(demo_tts, tmp_path, monkeypatch):
    """Fetching a voice's audio while another client deleted it gave 500s and responses cut after
    their headers (the file went between the lookup and the read); using it in a request whose
    codec differs (its audio is read to encode it again) gave a 500. A request that read the audio
    before the deletion speaks with it (storing the new codes found no voice: a 400)."""
    from dataclasses import replace

    app = make_app(demo_tts, tmp_path)
    store = app.state.server.voices
    read = store.audio

    def deleted_first(name: str) -> bytes:
        store.delete(name)
        return read(name)

    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert upload(client, "dora", SHORT).status_code == 201
        stale = store.get("dora")
        monkeypatch.setattr(store, "audio", deleted_first)
        assert error_of(client.get(f"{VOICES}/dora/audio"), 404)["code"] == "voice_not_found"

        assert upload(client, "dora", SHORT).status_code == 201
        monkeypatch.setattr(store, "get", lambda name: replace(stale, codec="another codec"))
        monkeypatch.setattr(store, "codes", lambda name, codec=None: None)  # none of this server's codec
        error = error_of(client.post(SPEECH, json={"input": "Hi.", "voice": "dora"}), 400)
        assert error["code"] == "voice_not_found"
        monkeypatch.undo()
        assert client.get(f"{VOICES}/dora").status_code == 404

        # deleted while the request encoded its audio again: the request, which read it, goes on
        assert upload(client, "dora", SHORT).status_code == 201
        stale = store.get("dora")
        encode = app.state.server.engine.encode_voice

        async def deleted_meanwhile(audio: bytes):
            store.delete("dora")
            return await encode(audio)

        monkeypatch.setattr(store, "get", lambda name: replace(stale, codec="another codec"))
        monkeypatch.setattr(store, "codes", lambda name, codec=None: None)
        monkeypatch.setattr(app.state.server.engine, "encode_voice", deleted_meanwhile)
        assert client.post(SPEECH, json={"input": "Hi.", "voice": "dora", "response_format": "wav"}).status_code == 200


def test_voice_and_model_requests_are_counted_ok(server, alice):
    """Only failures of these routes were counted, so an error-rate panel read 100%."""
    def ok(endpoint: str) -> float:
        line = f'mossserve_requests_total{{endpoint="{endpoint}",outcome="ok"}} '
        found = [x for x in server.get("/metrics").text.splitlines() if x.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0

    calls = [("GET", VOICES, VOICES), ("GET", f"{VOICES}/alice", VOICES + "/{name}"),
             ("GET", f"{VOICES}/alice/audio", VOICES + "/{name}/audio"), ("GET", "/v1/models", "/v1/models"),
             ("GET", "/v1/models/tts-1", "/v1/models/{model_id:path}")]
    for method, path, endpoint in calls:
        before = ok(endpoint)
        assert server.request(method, path).status_code == 200
        assert ok(endpoint) == before + 1, endpoint
    before = ok(VOICES + "/{name}")
    assert server.get(f"{VOICES}/nobody").status_code == 404
    assert ok(VOICES + "/{name}") == before
    uploads, deletes = ok(VOICES), ok(VOICES + "/{name}")
    assert upload(server, "counted", SHORT).status_code == 201
    assert server.delete(f"{VOICES}/counted").status_code == 200
    assert ok(VOICES) == uploads + 1 and ok(VOICES + "/{name}") == deletes + 1


@pytest.mark.parametrize("xdg, expected", [
    ("/srv/data", "/srv/data/mossserve"),
    ("", "~/.local/share/mossserve"),  # empty: the default, not "mossserve" in the current directory
    ("relative/dir", "~/.local/share/mossserve"),  # the XDG spec: a relative path is ignored
])
def test_the_default_data_dir_follows_the_xdg_spec(monkeypatch, xdg: str, expected: str) -> None:
    from mossserve.serve.settings import DATA_DIR_ENV, default_data_dir

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", xdg)
    assert default_data_dir() == Path(expected).expanduser()


def test_without_a_home_directory_the_data_dir_must_be_given(monkeypatch) -> None:
    """Path.home()'s RuntimeError (no $HOME, no passwd entry) was a traceback at `serve`'s start."""
    from mossserve.errors import InvalidRequestError
    from mossserve.serve.settings import DATA_DIR_ENV, default_data_dir

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(Path, "home", no_home)
    with pytest.raises(InvalidRequestError, match="pass --data-dir or set"):
        default_data_dir()


def test_a_voice_of_exactly_the_limit_in_aac_is_stored_and_used(server):
    """Its encoder's padding makes it read a little longer than the limit: accepted at upload, and so
    also when it is used (the stored length is checked against the same allowance)."""
    from mossserve.audio import encode_audio

    t = np.arange(int(MAX_VOICE_SECONDS * 24000)) / 24000
    clip = encode_audio((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000, "aac")
    r = server.post(VOICES, data={"name": "exact"}, files={"file": ("exact.aac", clip, "audio/aac")})
    assert r.status_code == 201 and r.json()["duration_s"] > MAX_VOICE_SECONDS, r.text
    speak(server, voice="exact")


def test_a_voice_sent_as_json_is_told_to_use_a_form(server):
    """The JSON body was read as no form field at all, and the answer was "name is required"."""
    r = server.post(VOICES, json={"name": "x", "file": "data:audio/wav;base64,AAAA"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"], r.text
    r = server.post(VOICES, files={"file": ("a.wav", b"RIFF", "audio/wav")})  # a form without its name
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    form = b'--XX\r\nContent-Disposition: form-data; name="transcript"\r\n\r\nhi\r\n--XX--\r\n'
    r = server.post(VOICES, content=form, headers={"content-type": "Multipart/Form-Data; boundary=XX"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text  # media types ignore case


@pytest.fixture(scope="module")
def dialogue_server(tmp_path_factory):
    """A server on the demo checkpoint loaded as MOSS-TTSD (speakers tagged [S1]..[S5])."""
    from mossserve.api import TTS

    with closing(TTS.from_pretrained(None, task="dialogue")) as tts, \
            serve_model(tts, tmp_path_factory.mktemp("dialogue")) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def fish_server(tmp_path_factory):
    """(tts, client) of a server on the Fish S2 Pro fixture (speakers labelled <|speaker:i|>)."""
    from mossserve.api import TTS

    with closing(TTS.from_pretrained(FISH_DIR)) as tts, serve_model(tts, tmp_path_factory.mktemp("fish")) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield tts, client


@pytest.mark.parametrize("name, transcript, refusal", [
    ("dia", "[S1] Hi there [S2] hello", "is speaker 1's transcript but holds [S2]"),
    ("hidden", "Hi [S\u00ad2] there", "is speaker 1's transcript but holds [S2]"),
    ("tagonly", "[S1]", "is empty (speaker tags aside)"),
])
def test_a_stored_transcripts_speaker_tags_are_refused_naming_the_voice(dialogue_server, name, transcript, refusal):
    """The model refused them as speakers[0].ref_text, a field the client never sent (or, for a
    transcript that is only its label, as voice and ref_text not given together)."""
    assert upload(dialogue_server, name, TONE, transcript).status_code == 201
    r = dialogue_server.post(SPEECH, json={"input": "[S1] a [S2] b", "speakers": [{"voice": name}, {}]})
    error = error_of(r, 400)
    assert error["param"] == "speakers[0].voice"
    assert error["message"].startswith(f"the transcript of the stored voice {name!r} {refusal}"), error
    assert error["message"].endswith("give speakers[0].ref_text, or store the voice again with a transcript "
                                     "this server takes")


def test_a_preset_name_with_a_transcript_is_refused_as_no_voice(dialogue_server):
    """It was refused as "give voice and ref_text together (or neither)", though both were given."""
    body = {"input": "[S1] a [S2] b", "response_format": "wav"}
    r = dialogue_server.post(SPEECH, json={**body, "speakers": [{"voice": "alloy", "ref_text": "hey"}, {}]})
    error = error_of(r, 400)
    assert error["param"] == "speakers[0].ref_text"
    assert error["message"] == ("speakers[0].voice 'alloy' is an OpenAI preset name, which means no voice, so "
                                "speakers[0].ref_text (a voice's transcript) has no voice to go with: name a stored "
                                "voice or give speakers[0].ref_audio, or leave speakers[0].ref_text out")
    r = dialogue_server.post(SPEECH, json={**body, "speakers": [{"voice": "alloy"}, {}]})
    assert r.status_code == 200, r.text  # a preset alone: the default voice


def test_a_preset_name_is_no_voice_for_a_fish_speaker(fish_server):
    """Fish S2 Pro clones every speaker: the refusal said speakers[0].voice was missing, though it was sent."""
    _, client = fish_server
    r = client.post(SPEECH, json={"input": "<|speaker:0|>Hi.", "speakers": [{"voice": "alloy"}]})
    error = error_of(r, 400)
    assert error["param"] == "speakers[0].voice"
    assert error["message"] == ("speakers[0].voice 'alloy' is an OpenAI preset name, which means no voice; this model "
                                "clones each speaker from a voice and its transcript: name a stored voice or give "
                                "speakers[0].ref_audio, with speakers[0].ref_text")


def test_a_stored_fish_speaker_label_is_not_the_speakers(fish_server, monkeypatch):
    """A voice stored with its Fish label ("<|speaker:1|>I am Bob.") used as speaker 0 kept it, so the
    prompt labelled speaker 0's reference as speaker 1's; only a leading [S1] was dropped."""
    tts, client = fish_server
    assert upload(client, "bob", TONE, "<|speaker:1|>I am Bob.").status_code == 201
    build, given = tts.talker.build_prompt, []

    def spy(request, encode_voice=None):
        given.extend(speaker.reference_text for speaker in request.speakers)
        return build(request, encode_voice)

    monkeypatch.setattr(tts.talker, "build_prompt", spy)
    r = client.post(SPEECH, json={"input": "<|speaker:0|>Hi.", "speakers": [{"voice": "bob"}], "max_new_tokens": 2,
                                  "response_format": "wav"})
    assert r.status_code == 200, r.text
    assert given == ["I am Bob."]
