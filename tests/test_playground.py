"""The web playground in a real headless Chromium against live servers (the demo checkpoint and
the Realtime fixture): speech streamed into the page is the audio the API returns for the same
request, the first-audio figure shows, an uploaded voice is used, realtime turns play and can be
cancelled, and the server's own error message reaches the page. Screenshots of each state go to
test-artifacts/playground/."""
from __future__ import annotations

import base64
import io
import json
import re
from contextlib import closing
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from browser import chromium
from conftest import AUDIO_DIR, CODEC_DIR
from realtime_cases import REALTIME_DIR
from server_harness import live_server, serve_model
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from mossserve.api import TTS
from mossserve.serve.playground_routes import PLAYGROUND_DIR, model_capabilities
from mossserve.serve.schemas import body_fields
from mossserve.text.delay_requests import TASK_FIELDS

SEED = 7
TEXT = "Hello from the playground."
VOICE_FILE = AUDIO_DIR / "reference_zh.wav"
# The page's received PCM as base64 (the test compares it byte for byte with the API's answer).
PCM_JS = """const pcm = window.playground[arguments[0]].player.pcm();
const bytes = new Uint8Array(pcm.buffer); let s = '';
for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
return btoa(s);"""
# Every message the Realtime tab sends, kept in window.sent.
RECORD_MESSAGES = """const rt = window.playground.realtime; window.sent = [];
const message = rt.message.bind(rt); rt.message = (event) => { window.sent.push(event); message(event); };"""
# Every error the page shows, in order, kept in window.shown.
RECORD_ERRORS = """window.shown = []; const box = document.getElementById('error');
new MutationObserver(() => box.textContent && window.shown.push(box.textContent))
  .observe(box, {childList: true, characterData: true, subtree: true});"""
# The object URLs the page releases, in order, kept in window.revoked.
RECORD_REVOKED = """window.revoked = []; const revoke = URL.revokeObjectURL;
URL.revokeObjectURL = (url) => { window.revoked.push(url); revoke(url); };"""
BASE64_KEY = "Zm9v/YmFy+cXV4=="  # `openssl rand -base64`: '/', '+', '=' are not allowed in a subprotocol


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def demo_url(demo_tts, tmp_path_factory):
    with serve_model(demo_tts, tmp_path_factory.mktemp("playground")) as url:
        yield url


@pytest.fixture(scope="module")
def dialogue_url(tmp_path_factory):
    with closing(TTS.from_pretrained(None, task="dialogue")) as tts, \
            serve_model(tts, tmp_path_factory.mktemp("playground_dialogue")) as url:
        yield url


@pytest.fixture(scope="module")
def realtime_tts():
    with closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")) as tts:
        yield tts


@pytest.fixture(scope="module")
def realtime_url(realtime_tts, tmp_path_factory):
    with serve_model(realtime_tts, tmp_path_factory.mktemp("playground_rt")) as url:
        yield url


@pytest.fixture(scope="module")
def local_url(tmp_path_factory):
    from local_cases import make_model_dir

    model = make_model_dir(tmp_path_factory.mktemp("local") / "model")
    with closing(TTS.from_pretrained(model, codec=CODEC_DIR / "tiny")) as tts, \
            serve_model(tts, tmp_path_factory.mktemp("playground_local")) as url:
        yield url


def page_pcm(browser, tab: str) -> bytes:
    return base64.b64decode(browser.js(PCM_JS, tab))


def api_audio(url: str, format: str, **body) -> bytes:
    response = httpx.post(f"{url}/v1/audio/speech", json={"response_format": format, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.content


def api_pcm(url: str, **body) -> bytes:
    return api_audio(url, "pcm", **body)


def speak(browser, text: str, seed: int, voice: str = "") -> None:
    browser.fill("#text", text)
    browser.select("#voice", voice)
    if not browser.el("details").get_attribute("open"):
        browser.click("details summary")
    browser.fill("#seed", str(seed))
    browser.click("#speak")
    browser.wait("window.playground.speech.status !== 'generating'")


def test_speak_plays_the_apis_audio_and_shows_first_audio(browser, demo_url) -> None:
    browser.open(demo_url)
    assert browser.text("#model").startswith("moss-tts-demo · delay")
    speak(browser, TEXT, SEED)
    browser.screenshot("speech")
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    expected = api_pcm(demo_url, input=TEXT, seed=SEED)
    assert page_pcm(browser, "speech") == expected
    samples = len(expected) // 2
    assert int(browser.text("#stat-samples")) == samples
    assert browser.text("#stat-duration") == f"{samples / 24000:.2f}"
    assert float(browser.text("#stat-ttfa")) > 0
    assert float(browser.text("#stat-rtf")) > 0
    assert browser.text("#stat-finish") == "stop"
    assert not browser.el("#download").get_attribute("disabled")


def test_download_in_any_format(browser, demo_url) -> None:
    browser.open(demo_url)
    speak(browser, TEXT, SEED)
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    browser.select("#download-format", "wav")  # built in the page from the received samples
    samples, rate = sf.read(io.BytesIO(browser.downloaded_after("#download", "speech.wav")), dtype="int16")
    assert rate == 24000 and samples.tobytes() == api_pcm(demo_url, input=TEXT, seed=SEED)
    for format in ("flac", "mp3"):  # the same request (same seed) again, in that format
        browser.select("#download-format", format)
        data = browser.downloaded_after("#download", f"speech.{format}")
        assert data == api_audio(demo_url, format, input=TEXT, seed=SEED)


def test_recorded_voice_uploads_and_plays(browser, demo_url) -> None:
    """The microphone path with Chromium's fake capture device (a beep)."""
    browser.open(demo_url)
    browser.click('nav button[data-tab="voices"]')
    browser.fill("#voice-name", "mic")
    browser.click("#voice-record")
    browser.wait("document.getElementById('voice-rec-status').textContent === 'recording…'")
    browser.js("window.recordingStarted = performance.now()")
    browser.wait("performance.now() - window.recordingStarted > 1500")  # the recording's length
    browser.click("#voice-record")
    browser.wait("document.getElementById('voice-rec-status').textContent.startsWith('recorded')")
    browser.click("#voice-upload")
    browser.wait("window.playground.voices.status !== 'uploading'")
    assert browser.js("return window.playground.voices.status") == "uploaded", browser.errors()
    stored = httpx.get(f"{demo_url}/v1/audio/voices/mic").json()
    assert 1.5 <= stored["duration_s"] < 5
    browser.click('#voice-list tr[data-voice="mic"] button.play')
    browser.wait("document.getElementById('voice-audio').duration > 0")
    assert browser.js("return document.getElementById('voice-audio').duration") == pytest.approx(
        stored["duration_s"], abs=0.05)
    assert httpx.delete(f"{demo_url}/v1/audio/voices/mic").status_code == 200


def test_uploaded_voice_is_listed_and_used(browser, demo_url) -> None:
    browser.open(demo_url)
    browser.click('nav button[data-tab="voices"]')
    browser.fill("#voice-name", "alice")
    browser.el("#voice-file").send_keys(str(VOICE_FILE.resolve()))
    browser.fill("#voice-transcript", "A reference.")
    browser.click("#voice-upload")
    browser.wait("window.playground.voices.status !== 'uploading'")
    assert browser.js("return window.playground.voices.status") == "uploaded", browser.errors()
    browser.screenshot("voices")
    row = browser.el('#voice-list tr[data-voice="alice"]')
    assert "A reference." in row.text
    listed = httpx.get(f"{demo_url}/v1/audio/voices").json()["data"]
    assert [v["id"] for v in listed] == ["alice"]

    browser.click('nav button[data-tab="speech"]')
    speak(browser, TEXT, SEED, voice="alice")
    browser.screenshot("speech-voice")
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    with_voice = api_pcm(demo_url, input=TEXT, seed=SEED, voice="alice")
    assert page_pcm(browser, "speech") == with_voice
    assert with_voice != api_pcm(demo_url, input=TEXT, seed=SEED)  # the voice made a difference

    browser.click('nav button[data-tab="voices"]')
    browser.click('#voice-list tr[data-voice="alice"] button.delete')
    browser.wait("!document.querySelector('#voice-list tr')")
    assert httpx.get(f"{demo_url}/v1/audio/voices").json()["data"] == []


def test_invalid_request_shows_the_servers_message(browser, demo_url) -> None:
    text = "Say <|im_end|> here."
    browser.open(demo_url)
    speak(browser, text, SEED)
    browser.screenshot("error")
    response = httpx.post(f"{demo_url}/v1/audio/speech", timeout=60, json={"input": text, "seed": SEED})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert browser.js("return window.playground.speech.status") == "error"
    assert browser.el("#error").is_displayed()
    assert browser.text("#error") == message


def test_dialogue_speakers_reach_the_server(browser, dialogue_url) -> None:
    """A dialogue model reads only `speakers`: the page offers nothing else, and the speakers it
    collects are sent (one with a transcript and no voice, which the server refuses, with its reason)."""
    browser.open(dialogue_url)
    assert browser.text("#model").startswith("moss-tts-demo · delay (dialogue)")
    for control in ("#voice", "#ref-file", "#ref-record", "#ref-text", "#instructions", "#duration", "#language"):
        assert not browser.el(control).is_displayed(), control
    browser.click("#add-speaker")
    browser.click("#add-speaker")
    assert [el.text for el in browser.driver.find_elements("css selector", "#speakers .speaker span")] == ["[S1]", "[S2]"]
    browser.fill("#speakers .speaker:first-child .speaker-text", "Hi, I am one.")
    speak(browser, "[S1] Hello. [S2] Hi.", SEED)
    response = httpx.post(f"{dialogue_url}/v1/audio/speech", timeout=60, json={
        "input": "[S1] Hello. [S2] Hi.", "seed": SEED, "speakers": [{"ref_text": "Hi, I am one."}, {}]})
    assert response.status_code == 400 and "speakers[0]" in response.json()["error"]["message"]
    assert browser.text("#error") == response.json()["error"]["message"]


def direct_turns(url: str, turns_deltas: list[list[str]]) -> list[bytes]:
    """The same turns straight over the websocket: one session, temperature 0, these deltas."""
    ws_url = url.replace("http://", "ws://") + "/v1/realtime/speech"
    turns = []
    with connect(ws_url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=60))["type"] == "session.created"
        for deltas in turns_deltas:
            ws.send(json.dumps({"type": "session.update", "session": {"response_format": "pcm", "temperature": 0}}))
            for delta in deltas:
                ws.send(json.dumps({"type": "text.delta", "delta": delta}))
            ws.send(json.dumps({"type": "text.done"}))
            audio = b""
            while (event := json.loads(ws.recv(timeout=60)))["type"] != "audio.done":
                assert event["type"] in ("turn.started", "audio.delta"), event
                audio += base64.b64decode(event.get("audio", ""))
            assert event["finish_reason"] == "stop"
            turns.append(audio)
    return turns


def sent_deltas(browser) -> list[list[str]]:
    """The deltas the page sent (RECORD_MESSAGES), per turn: a turn's text ends with its text.done."""
    turns = [[]]
    for message in browser.js("return window.sent"):
        if message["type"] == "text.delta":
            turns[-1].append(message["delta"])
        elif message["type"] == "text.done":
            turns.append([])
    return turns[:-1]


def test_realtime_turns_play_in_one_context(browser, realtime_url) -> None:
    """Turn 1 pasted and sent (one delta), turn 2 typed live (a delta per key once the turn is open,
    Enter ends it): the page plays what the same messages straight over the websocket return."""
    from selenium.webdriver.common.keys import Keys

    texts = ["Hello there, this is the first turn.", "And a second, typed."]
    browser.open(realtime_url)
    browser.click('nav button[data-tab="realtime"]')
    browser.js(RECORD_MESSAGES)
    browser.fill("#rt-temperature", "0")
    played = []
    for n, text in enumerate(texts, 1):
        if n == 1:
            browser.fill("#rt-text", text)
            browser.click("#rt-send")
        else:
            browser.click("#rt-live")
            browser.el("#rt-text").send_keys(text, Keys.ENTER)
        browser.wait(f"window.playground.realtime.turns.length === {n}")
        assert browser.js("return window.playground.realtime.status") == "done", browser.errors()
        played.append(page_pcm(browser, "realtime"))
        assert int(browser.text("#rt-samples")) == len(played[-1]) // 2
        assert float(browser.text("#rt-ttfa")) > 0
    deltas = sent_deltas(browser)
    assert ["".join(turn) for turn in deltas] == texts
    assert played == direct_turns(realtime_url, deltas)
    browser.screenshot("realtime")
    history = browser.driver.find_elements("css selector", "#rt-history li")
    assert [li.text.split(" — ")[0] for li in history] == texts


def test_realtime_text_typed_live_plays_and_cancels(browser, realtime_url) -> None:
    browser.open(realtime_url)
    browser.click('nav button[data-tab="realtime"]')
    browser.fill("#rt-temperature", "0")
    browser.click("#rt-live")
    browser.el("#rt-text").send_keys("Typed one key at a time, this text keeps the turn open while it speaks")
    browser.wait("window.playground.realtime.player.samples > 0")  # audio before the text is done
    browser.click("#rt-cancel")
    browser.wait("window.playground.realtime.turns.length === 1")
    browser.screenshot("realtime-cancelled")
    assert browser.js("return window.playground.realtime.turns[0].finish") == "aborted"
    assert browser.text("#rt-finish") == "aborted"


def test_api_key_entered_in_the_page_is_sent(browser, server_app) -> None:
    from selenium.webdriver.common.keys import Keys

    with live_server(server_app(api_key="sesame")) as url:
        browser.driver.get(url)
        browser.wait("!document.getElementById('error').hidden")
        message = httpx.get(f"{url}/v1/models").json()["error"]["message"]
        assert browser.text("#error") == message and "API key" in message
        browser.el("#api-key").send_keys("sesame", Keys.ENTER)  # stored, then the page reloads with it
        browser.wait("window.playground && window.playground.ready")
        assert browser.el("#error").get_attribute("hidden") is not None
        assert browser.text("#model").startswith("moss-tts-demo")
        browser.js("localStorage.clear()")


def test_models_lists_the_capabilities_the_page_reads(demo_url, realtime_url) -> None:
    demo = httpx.get(f"{demo_url}/v1/models").json()["data"][0]
    assert demo["id"] == "moss-tts-demo" and demo["object"] == "model"
    assert demo["mossserve"] == {"family": "delay", "task": "tts", "sessions": False, "codebooks": 32,
                                 "task_fields": ["duration_seconds", "duration_tokens", "language", "ref_audio",
                                                 "ref_text", "voice"],
                                 "sample_rate": 24000, "channels": 1}
    realtime = httpx.get(f"{realtime_url}/v1/models").json()["data"][0]["mossserve"]
    assert realtime["family"] == "realtime" and realtime["sessions"] is True and realtime["codebooks"] == 16
    assert realtime["task"] is None and realtime["task_fields"] is None


def test_speech_offers_only_the_fields_the_task_reads(browser, demo_url) -> None:
    """The demo is a tts model: instructions and speakers would be refused, so they are not offered."""
    browser.open(demo_url)
    offered = browser.js(
        "return [...document.querySelectorAll('[data-field]')].map(el => [el.dataset.field, !el.hidden])")
    assert dict(offered) == {field: field in body_fields(TASK_FIELDS["tts"]) for field in marked_fields()}
    assert not browser.el("#instructions").is_displayed() and not browser.el("#add-speaker").is_displayed()
    assert browser.el("#voice").is_displayed() and browser.el("#duration").is_displayed()
    browser.click("details summary")
    assert browser.el("#repetition-penalty").is_displayed()  # Fish alone refuses one


def marked_fields() -> list[str]:
    """The body fields the page marks its Delay options with (`data-field`)."""
    return re.findall(r'data-field="([^"]+)"', (PLAYGROUND_DIR / "index.html").read_text())


def test_the_pages_fields_are_the_prompt_builders() -> None:
    """The page marks each Delay option with the body field it sends, as /v1/models' `task_fields` names
    them (the prompt builder's table in the API's names): every name is one of those, and every field
    of the table has an option (a duration in seconds only)."""
    assert set(marked_fields()) == set(body_fields(set().union(*TASK_FIELDS.values()))) - {"duration_tokens"}


@pytest.mark.parametrize("task", sorted(TASK_FIELDS))
def test_task_fields_are_fields_a_speech_request_takes(task: str) -> None:
    """They were the prompt builder's names (duration, reference_text), which the API refuses as unknown."""
    from mossserve.serve.schemas import SpeechBody

    with closing(TTS.from_pretrained(None, task=task)) as tts:
        fields = model_capabilities(tts)["task_fields"]
    assert fields and set(fields) <= set(SpeechBody.model_fields)


def test_page_and_assets_are_served_and_self_contained(demo_url) -> None:
    page = httpx.get(demo_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text)
    assert sorted(assets) == ["/playground/main.js", "/playground/style.css"]
    for path in assets:  # revalidated, so a browser never runs modules cached before an upgrade
        response = httpx.get(demo_url + path)
        assert response.status_code == 200 and response.headers["cache-control"] == "no-cache"
    js = httpx.get(demo_url + "/playground/main.js")
    assert js.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    for file in Path(PLAYGROUND_DIR).iterdir():  # no CDN, no fonts from elsewhere: works offline
        assert not re.search(r"https?://", file.read_text()), file.name


def test_no_playground_setting_and_flag(server_app) -> None:
    from starlette.testclient import TestClient

    from mossserve.cli import build_parser

    with TestClient(server_app(playground=False)) as client:
        assert client.get("/").status_code == 404
        assert client.get("/playground/main.js").status_code == 404
        assert client.get("/v1/models").status_code == 200
    assert build_parser().parse_args(["serve", "--no-playground"]).playground is False
    assert build_parser().parse_args(["serve"]).playground is True


def test_local_depth_set_in_the_page_is_sent(browser, local_url) -> None:
    browser.open(local_url)
    assert browser.text("#model").endswith("· local") or "local" in browser.text("#model")
    assert browser.el("#depth").is_displayed() and not browser.el("#speakers").is_displayed()
    browser.fill("#depth", "4")
    speak(browser, "Hello there.", SEED)
    browser.screenshot("local-depth")
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    shallow = api_pcm(local_url, input="Hello there.", seed=SEED, depth=4)
    assert page_pcm(browser, "speech") == shallow
    assert shallow != api_pcm(local_url, input="Hello there.", seed=SEED)  # the depth changed the audio


def test_realtime_tab_works_with_an_api_key(browser, realtime_tts, tmp_path) -> None:
    """Browsers cannot set websocket headers: the page sends the key as a subprotocol, encoded, since
    a base64 key is not a valid subprotocol as it is."""
    from selenium.webdriver.common.keys import Keys

    with serve_model(realtime_tts, tmp_path / "data", api_key=BASE64_KEY) as url:
        browser.driver.get(url)
        browser.wait("!document.getElementById('error').hidden")
        browser.el("#api-key").send_keys(BASE64_KEY, Keys.ENTER)
        browser.wait("window.playground && window.playground.ready")
        browser.click('nav button[data-tab="realtime"]')
        browser.fill("#rt-temperature", "0")
        browser.fill("#rt-text", "Hello with a key.")
        browser.click("#rt-send")
        browser.wait("window.playground.realtime.turns.length === 1")
        assert browser.js("return window.playground.realtime.status") == "done", browser.errors()
        assert browser.js("return window.playground.realtime.player.samples") > 0
        browser.js("localStorage.clear()")


@pytest.fixture(scope="module")
def fish_url(tmp_path_factory):
    from fish_cases import FISH_DIR

    with closing(TTS.from_pretrained(FISH_DIR)) as tts, serve_model(tts, tmp_path_factory.mktemp("fish")) as url:
        yield url


def test_fish_reference_with_transcript_and_chunk_length_are_sent(browser, fish_url) -> None:
    text = "<|speaker:0|>Good morning! How are you today?<|speaker:1|>I am fine, thanks."
    transcript = "A reference line for the voice."
    browser.open(fish_url)
    assert "fish" in browser.text("#model")
    assert browser.el("#chunk-length").is_displayed() and browser.el("#ref-text").is_displayed()
    assert not browser.el("#depth").is_displayed() and not browser.el("#instructions").is_displayed()
    browser.el("#ref-file").send_keys(str(VOICE_FILE.resolve()))
    browser.fill("#ref-text", transcript)
    browser.fill("#chunk-length", "40")
    speak(browser, text, SEED)
    browser.screenshot("fish")
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    reference = "data:audio/wav;base64," + base64.b64encode(VOICE_FILE.read_bytes()).decode()
    expected = api_pcm(fish_url, input=text, seed=SEED, ref_audio=reference, ref_text=transcript, chunk_length=40)
    assert page_pcm(browser, "speech") == expected
    one_batch = api_pcm(fish_url, input=text, seed=SEED, ref_audio=reference, ref_text=transcript)
    assert one_batch != expected  # chunk_length 40 splits the turns into two batches


def test_fish_speakers_are_tagged_as_fish_tags_them_and_not_capped(browser, fish_url) -> None:
    """Fish S2 Pro names speaker i `<|speaker:i|>` and takes any number (MOSS-TTSD: [S1]..[S5])."""
    browser.open(fish_url)
    for _ in range(6):
        browser.click("#add-speaker")
    labels = [el.text for el in browser.driver.find_elements("css selector", "#speakers .speaker span")]
    assert labels == [f"<|speaker:{i}|>" for i in range(6)]
    browser.click("#speakers .speaker:first-child .remove")
    labels = [el.text for el in browser.driver.find_elements("css selector", "#speakers .speaker span")]
    assert labels == [f"<|speaker:{i}|>" for i in range(5)]


def test_speed_set_in_the_page_is_sent(browser, demo_url) -> None:
    browser.open(demo_url)
    browser.fill("#speed", "1.5")
    speak(browser, TEXT, SEED)
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    faster = api_pcm(demo_url, input=TEXT, seed=SEED, speed=1.5)
    assert page_pcm(browser, "speech") == faster
    assert len(faster) < len(api_pcm(demo_url, input=TEXT, seed=SEED)) / 1.4


def test_the_socket_takes_a_base64url_encoded_key(server_app) -> None:
    """Any key as a subprotocol: base64url without padding under its own prefix (the raw
    `mossserve-api-key.<key>` form, for keys that are tokens: test_server_realtime.py)."""
    encoded = base64.urlsafe_b64encode(BASE64_KEY.encode()).decode().rstrip("=")
    with live_server(server_app(api_key=BASE64_KEY)) as base:
        ws_url = base.replace("http://", "ws://") + "/v1/realtime/speech"
        with connect(ws_url, open_timeout=30, subprotocols=[f"mossserve-api-key-b64.{encoded}"]) as ws:
            assert ws.subprotocol == f"mossserve-api-key-b64.{encoded}"
            assert json.loads(ws.recv(timeout=30))["type"] == "error"  # admitted; the demo model has no sessions
        wrong = base64.urlsafe_b64encode(b"wrong").decode().rstrip("=")
        for protocol in (f"mossserve-api-key-b64.{wrong}", "mossserve-api-key-b64.a", f"mossserve-api-key.{encoded}"):
            with pytest.raises(InvalidStatus, match="403"), connect(ws_url, open_timeout=30, subprotocols=[protocol]):
                pass


def open_realtime(browser, url: str) -> None:
    browser.open(url)
    browser.click('nav button[data-tab="realtime"]')


def realtime(browser, expression: str):
    return browser.js(f"return window.playground.realtime.{expression}")


def ws_error(url: str, message: dict) -> str:
    """The message of the error the server answers `message` with, on a fresh socket."""
    with connect(url.replace("http://", "ws://") + "/v1/realtime/speech", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=60))["type"] == "session.created"
        ws.send(json.dumps(message))
        event = json.loads(ws.recv(timeout=60))
        assert event["type"] == "error", event
        return event["error"]["message"]


def test_realtime_refused_first_text_opens_no_turn(browser, realtime_url) -> None:
    """Text the server refuses before a turn opens: its error stays, nothing more is sent for it, and
    the next Send works."""
    refused = "Say <|im_end|> please."
    message = ws_error(realtime_url, {"type": "text.delta", "delta": refused})
    open_realtime(browser, realtime_url)
    browser.js(RECORD_MESSAGES + RECORD_ERRORS)
    browser.fill("#rt-text", refused)
    browser.click("#rt-send")
    browser.wait("!document.getElementById('error').hidden")
    assert [realtime(browser, x) for x in ("status", "turnOpen", "ended", "sent")] == ["idle", False, False, ""]
    assert browser.text("#error") == message
    browser.fill("#rt-text", "Hello there.")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 1")
    assert realtime(browser, "status") == "done", browser.errors()
    assert browser.js("return window.shown") == [message]  # the server said nothing else, the page neither
    assert [m["type"] for m in browser.js("return window.sent")] == [
        "session.update", "text.delta", "session.update", "text.delta", "text.done"]


def test_realtime_new_context_ends_a_turn_in_progress(browser, realtime_url) -> None:
    open_realtime(browser, realtime_url)
    browser.click("#rt-live")
    browser.el("#rt-text").send_keys("An unfinished turn")
    browser.wait("window.playground.realtime.turnOpen")
    browser.click("#rt-new")
    assert [realtime(browser, x) for x in ("status", "turnOpen", "ws")] == ["idle", False, None]
    assert browser.el("#error").get_attribute("hidden") is not None, browser.errors()
    browser.click("#rt-live")
    browser.click("#rt-send")  # the text still in the box, as a new turn on a new socket
    browser.wait("window.playground.realtime.turns.length === 1")
    assert realtime(browser, "status") == "done", browser.errors()
    assert realtime(browser, "turns[0].text") == "An unfinished turn"


def test_realtime_dropped_connection_ends_the_turn(browser, realtime_url) -> None:
    """The socket closes under an open turn (a server restart, a proxy's idle timeout): the page says
    so, and Send opens a new socket."""
    open_realtime(browser, realtime_url)
    browser.click("#rt-live")
    browser.el("#rt-text").send_keys("A turn cut off")
    browser.wait("window.playground.realtime.turnOpen")
    browser.js("window.playground.realtime.ws.close()")
    browser.wait("window.playground.realtime.status === 'disconnected'")
    assert browser.text("#error") == "the realtime connection closed during the turn"
    assert [realtime(browser, x) for x in ("turnOpen", "ended", "sent")] == [False, False, ""]
    browser.click("#rt-live")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 1")
    assert realtime(browser, "status") == "done", browser.errors()


def test_realtime_cleared_temperature_is_the_default_again(browser, realtime_url) -> None:
    """The session keeps a setting a session.update leaves out: a cleared field is sent as null."""
    open_realtime(browser, realtime_url)
    browser.js(RECORD_MESSAGES)
    for n, temperature in enumerate(("0", ""), 1):
        browser.fill("#rt-temperature", temperature)
        browser.fill("#rt-text", f"Turn {n}.")
        browser.click("#rt-send")
        browser.wait(f"window.playground.realtime.turns.length === {n}")
    updates = [m["session"] for m in browser.js("return window.sent") if m["type"] == "session.update"]
    assert [u.get("temperature", "left out") for u in updates] == [0, None]


def test_realtime_cancel_stops_a_finished_turns_audio(browser, realtime_url) -> None:
    """Generation outruns playback: after audio.done the turn's audio still plays until Cancel."""
    open_realtime(browser, realtime_url)
    browser.js(RECORD_MESSAGES)
    browser.fill("#rt-text", "Hello there.")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 1")
    assert realtime(browser, "player.sources.length") > 0
    browser.click("#rt-cancel")
    assert realtime(browser, "player.sources.length") == 0
    assert "turn.cancel" not in [m["type"] for m in browser.js("return window.sent")]  # no turn to cancel


def test_stop_stops_a_finished_requests_audio(browser, demo_url) -> None:
    browser.open(demo_url)
    speak(browser, TEXT, SEED)
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    assert browser.js("return window.playground.speech.player.sources.length") > 0
    browser.click("#stop")
    assert browser.js("return window.playground.speech.player.sources.length") == 0


def test_a_stopped_player_plays_no_later_chunks(browser, demo_url) -> None:
    """A cancelled realtime turn's last chunks arrive after Cancel: they are kept, not played."""
    browser.open(demo_url)
    assert browser.js("""const p = window.playground.speech.player; p.reset(24000, 1);
        p.push(new Uint8Array(480)); p.stop(); p.push(new Uint8Array(480));
        return [p.sources.length, p.samples];""") == [0, 480]


def test_speak_again_while_streaming_leaves_the_new_request_alone(browser, demo_url) -> None:
    """The first request, aborted by the second Speak, neither shows `stopped` nor stops its audio."""
    browser.open(demo_url)
    browser.fill("#text", TEXT)
    browser.click("details summary")
    browser.fill("#seed", str(SEED))
    browser.js("""const s = window.playground.speech; window.seen = [];
        const set = s.setStatus.bind(s); s.setStatus = (x) => { window.seen.push(x); set(x); };
        s.speak(); s.speak();""")
    browser.wait("window.playground.speech.status !== 'generating'")
    assert browser.js("return window.seen") == ["generating", "generating", "done"], browser.errors()
    assert page_pcm(browser, "speech") == api_pcm(demo_url, input=TEXT, seed=SEED)


@pytest.fixture
def stored_voice(demo_url):
    """A voice in the demo server's library for one test (the others expect the library empty)."""
    with VOICE_FILE.open("rb") as audio:
        response = httpx.post(f"{demo_url}/v1/audio/voices", data={"name": "bob"}, timeout=60,
                              files={"file": (VOICE_FILE.name, audio, "audio/wav")})
    assert response.status_code == 201, response.text
    yield "bob"
    assert httpx.delete(f"{demo_url}/v1/audio/voices/bob").status_code == 200


# The stored voice and whether reference audio the Speech tab would send.
SPEECH_VOICE_JS = "return window.playground.speech.body().then((b) => [b.voice ?? null, 'ref_audio' in b])"


def test_speech_voice_and_reference_audio_exclude_each_other(browser, demo_url, stored_voice) -> None:
    """The form reads "Voice or reference audio" and the server refuses both: picking one drops the
    other (a file, a recording), and Clear drops the reference."""
    browser.open(demo_url)
    browser.el("#ref-file").send_keys(str(VOICE_FILE.resolve()))
    assert browser.js(SPEECH_VOICE_JS) == [None, True]
    browser.select("#voice", stored_voice)
    assert browser.js(SPEECH_VOICE_JS) == [stored_voice, False]
    assert browser.el("#ref-file").get_attribute("value") == ""
    browser.click("#ref-record")
    browser.wait("document.getElementById('ref-status').textContent === 'recording…'")
    browser.click("#ref-record")
    browser.wait("document.getElementById('ref-status').textContent.startsWith('recorded')")
    assert browser.js(SPEECH_VOICE_JS) == [None, True]
    browser.click("#ref-clear")
    assert browser.js(SPEECH_VOICE_JS) == [None, False]
    assert browser.text("#ref-status") == ""


def test_playing_a_voice_again_releases_the_audio_before(browser, demo_url, stored_voice) -> None:
    browser.open(demo_url)
    browser.js(RECORD_REVOKED)
    browser.click('nav button[data-tab="voices"]')
    play = f'#voice-list tr[data-voice="{stored_voice}"] button.play'
    browser.click(play)
    browser.wait("document.getElementById('voice-audio').duration > 0")
    first = browser.js("return document.getElementById('voice-audio').src")
    browser.click(play)
    browser.wait(f"document.getElementById('voice-audio').src !== {json.dumps(first)}")
    assert browser.js("return window.revoked") == [first]


PEAK_BLOCK = 64  # frames per min/max pair the player keeps for the waveform (player.js BLOCK)
# Waveform updates in one task, then the draws two animation frames later.
COALESCED_DRAWS_JS = """const wave = window.playground.speech.wave; let draws = 0;
const draw = wave.draw.bind(wave); wave.draw = () => { draws += 1; draw(); };
for (let i = 0; i < 10; i++) wave.update();
return new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => done(draws))));"""


def test_waveform_is_drawn_from_kept_peaks_once_per_frame(browser, demo_url) -> None:
    """A redraw per delta from a copy of every sample so far fell behind real time on long outputs:
    streaming copies no PCM, the min/max per block are kept as chunks arrive, and the updates of one
    animation frame draw once."""
    browser.open(demo_url)
    browser.js("""const player = window.playground.speech.player; window.copies = 0;
        const pcm = player.pcm.bind(player); player.pcm = () => { window.copies += 1; return pcm(); };""")
    speak(browser, TEXT, SEED)
    assert browser.js("return window.playground.speech.status") == "done", browser.errors()
    assert browser.js("return window.copies") == 0
    samples = np.frombuffer(page_pcm(browser, "speech"), np.int16)
    blocks = [samples[i:i + PEAK_BLOCK] for i in range(0, len(samples), PEAK_BLOCK)]
    assert browser.js("return window.playground.speech.player.lows") == [int(b.min()) for b in blocks]
    assert browser.js("return window.playground.speech.player.highs") == [int(b.max()) for b in blocks]
    assert browser.js(COALESCED_DRAWS_JS) == 1
    assert browser.js("""const c = document.getElementById('wave');
        return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v)""")


def test_fish_offers_no_repetition_penalty_and_asks_for_each_speakers_voice(browser, fish_url) -> None:
    """Fish S2 Pro refuses a repetition penalty other than 1, and clones every speaker from a voice
    (it has no own voice per speaker)."""
    browser.open(fish_url)
    browser.click("details summary")
    assert not browser.el("#repetition-penalty").is_displayed()
    browser.js("document.getElementById('repetition-penalty').value = '1.2'")
    assert "repetition_penalty" not in browser.js("return window.playground.speech.body()")
    browser.click("#add-speaker")
    assert browser.js("return document.querySelector('#speakers .speaker-voice option').text") == \
        "choose a voice (required)"


# Every AudioBufferSourceNode start (time, seconds) and the number of stops, in window.starts, window.stops.
RECORD_PLAYBACK = """window.starts = []; window.stops = 0; const node = AudioBufferSourceNode.prototype;
const start = node.start, stop = node.stop;
node.start = function (when, ...rest) {
  window.starts.push([when, this.buffer.duration]); return start.call(this, when, ...rest); };
node.stop = function (...rest) { window.stops += 1; return stop.apply(this, rest); };"""


def test_realtime_next_turn_plays_after_the_audio_before(browser, realtime_url) -> None:
    """Generation outruns playback: a new turn, and one the server refuses, leave the audio of the turn
    before playing, and the new turn's audio starts after it (only Cancel and New context stop audio)."""
    open_realtime(browser, realtime_url)
    browser.js(RECORD_PLAYBACK)
    browser.fill("#rt-text", "The first turn.")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 1")
    browser.fill("#rt-text", "Say <|im_end|> please.")
    browser.click("#rt-send")
    browser.wait("!document.getElementById('error').hidden")
    assert browser.js("return window.stops") == 0
    browser.fill("#rt-text", "The second turn.")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 2")
    assert realtime(browser, "status") == "done", browser.errors()
    assert browser.js("return window.stops") == 0
    starts = browser.js("return window.starts")
    assert all(later >= when + seconds - 1e-6 for (when, seconds), (later, _) in zip(starts, starts[1:]))
    assert len(page_pcm(browser, "realtime")) // 2 == realtime(browser, "turns[1].samples") > 0  # its own audio


def test_realtime_text_typed_after_cancel_starts_the_next_turn(browser, realtime_url) -> None:
    """Keys typed after Cancel, before the cancelled turn's audio.done, are not that turn's: they stay
    in the box and open the next turn."""
    from selenium.webdriver.common.keys import Keys

    open_realtime(browser, realtime_url)
    browser.js(RECORD_MESSAGES)
    browser.click("#rt-live")
    browser.el("#rt-text").send_keys("Hello there")
    browser.wait("window.playground.realtime.turnOpen")
    browser.js("""document.getElementById('rt-cancel').click(); const box = document.getElementById('rt-text');
        for (const key of ' world') { box.value += key; box.dispatchEvent(new Event('input')); }""")
    browser.wait("window.playground.realtime.turns.length === 1 && window.playground.realtime.turnOpen")
    assert [realtime(browser, f"turns[0].{x}") for x in ("text", "finish")] == ["Hello there", "aborted"]
    assert browser.el("#rt-text").get_attribute("value") == " world"
    browser.el("#rt-text").send_keys(Keys.ENTER)
    browser.wait("window.playground.realtime.turns.length === 2")
    assert [realtime(browser, x) for x in ("status", "turns[1].text")] == ["done", " world"], browser.errors()
    sent = browser.js("return window.sent")
    after_cancel = sent[[m["type"] for m in sent].index("turn.cancel") + 1:]
    assert [(m["type"], m.get("delta")) for m in after_cancel] == [
        ("session.update", None), ("text.delta", " world"), ("text.done", None)]


# At the first turn.started, the text arguments[0] added to the box and Send clicked: the turn's text
# is done and its audio.done not yet here. The statuses shown go to window.seen.
SEND_AT_TURN_STARTED = """const rt = window.playground.realtime, more = arguments[0]; window.seen = [];
const set = rt.setStatus.bind(rt); rt.setStatus = (s) => { window.seen.push(s); set(s); };
const on = rt.onEvent.bind(rt); let once = true;
rt.onEvent = (event) => { on(event); if (event.type === 'turn.started' && once) { once = false;
  document.getElementById('rt-text').value += more; document.getElementById('rt-send').click(); } };"""


def test_realtime_send_while_a_turn_speaks_queues_the_next(browser, realtime_url) -> None:
    """The server takes no more text for a turn after its text.done: Send says the next turn is queued
    and sends it at the turn's audio.done."""
    open_realtime(browser, realtime_url)
    browser.js(RECORD_MESSAGES)
    browser.js(SEND_AT_TURN_STARTED, " And the next one.")
    browser.fill("#rt-text", "The first turn.")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 2")
    assert [realtime(browser, f"turns[{n}].text") for n in (0, 1)] == ["The first turn.", " And the next one."]
    assert realtime(browser, "status") == "done", browser.errors()
    assert "next turn queued" in browser.js("return window.seen")
    assert [m["type"] for m in browser.js("return window.sent")] == [
        "session.update", "text.delta", "text.done", "session.update", "text.delta", "text.done"]


# At the first turn.started, before the page sees it, window.beforeTurnStarted() runs; its Send's
# flush (microtasks) is done by the time the page takes turn.started (a task).
BEFORE_TURN_STARTED = """const rt = window.playground.realtime, on = rt.onEvent.bind(rt); let once = true;
rt.onEvent = (event) => { if (event.type !== 'turn.started' || !once) return on(event); once = false;
  window.beforeTurnStarted(); setTimeout(() => on(event), 0); };"""


def test_realtime_send_before_turn_started_queues_the_next(browser, realtime_url) -> None:
    """Text added and sent while the turn waited for turn.started showed "next turn queued" but went
    into that turn (at turn.started the page sent the whole box)."""
    open_realtime(browser, realtime_url)
    browser.js(RECORD_MESSAGES)
    browser.js(BEFORE_TURN_STARTED)
    browser.js("window.beforeTurnStarted = () => { document.getElementById('rt-text').value += ' And the next one.';"
               "document.getElementById('rt-send').click(); };")
    browser.fill("#rt-text", "The first turn.")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 2")
    assert [realtime(browser, f"turns[{n}].text") for n in (0, 1)] == ["The first turn.", " And the next one."]
    assert [m.get("delta") for m in browser.js("return window.sent") if m["type"] == "text.delta"] == [
        "The first turn.", " And the next one."]


def test_realtime_a_refused_send_before_turn_started_leaves_send_working(browser, realtime_url) -> None:
    """Sent text edited, then Send, while the turn waited for turn.started: refused at turn.started, as
    it should be; but every later Send refused the same stale text, even once the box was mended."""
    open_realtime(browser, realtime_url)
    browser.js(RECORD_MESSAGES)
    browser.js(BEFORE_TURN_STARTED)
    browser.js("window.beforeTurnStarted = () => { document.getElementById('rt-text').value = 'Hullo there, friend';"
               "window.playground.realtime.send(true); };")
    browser.js("const rt = window.playground.realtime; document.getElementById('rt-text').value = 'Hello there';"
               "rt.send(false);")  # as typing does, live
    browser.wait("document.getElementById('error').textContent.includes('cannot be changed')")
    browser.fill("#rt-text", "Hello there, friend")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 1")
    assert realtime(browser, "turns[0].text") == "Hello there, friend"
    assert [m.get("delta") for m in browser.js("return window.sent") if m["type"] == "text.delta"] == [
        "Hello there", ", friend"]


def test_realtime_new_context_releases_the_historys_audio(browser, realtime_url) -> None:
    open_realtime(browser, realtime_url)
    browser.js(RECORD_REVOKED)
    browser.fill("#rt-text", "Hello there.")
    browser.click("#rt-send")
    browser.wait("window.playground.realtime.turns.length === 1")
    url = browser.js("return document.querySelector('#rt-history audio').src")
    browser.click("#rt-new")
    assert browser.js("return window.revoked") == [url]
