"""The voice library shared by two processes (two servers, or Ray replicas, on one --data-dir) and
surviving crashes: each process is a VoiceStore of its own here (its own connection and lock), and
the other process's step is run at the exact point in between, so every interleaving is deterministic."""
from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import sqlite3

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import AUDIO_DIR
from server_harness import live_server
from test_voice_store import SR, add, assert_stored, sample

import mossserve.serve.voices as voices_module
from mossserve.serve.references import VoiceResolver
from mossserve.serve.voices import VoiceLibraryError, VoiceNotFoundError, VoiceStore


@pytest.fixture
def two(tmp_path):
    """Two processes' stores on one data directory."""
    a, b = VoiceStore(tmp_path), VoiceStore(tmp_path)
    yield a, b
    a.close()
    b.close()


def test_a_delete_never_removes_the_files_of_an_upload_of_that_name_in_another_process(two, monkeypatch) -> None:
    """The delete's files were removed after its commit, by path: a re-upload in between lost its
    files, leaving a row that answered 500 and refused uploads with 409."""
    a, b = two
    add(a, "x", seed=0)
    real_rmtree, readded = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):  # a's delete has committed: b uploads "x" again before a's clean-up
        if not readded:
            readded.append(None)  # first, as b's add may remove files too
            readded[0] = add(b, "x", seed=1)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(voices_module.shutil, "rmtree", rmtree)
    assert a.delete("x") == "x"
    assert readded, "the delete removed nothing after its commit"
    voice, audio, codes = readded[0]
    for store in (a, b):
        assert store.get("x") == voice
        assert_stored(store, "x", audio, codes)


def test_files_deleted_by_another_process_under_a_read_are_not_found(two, monkeypatch) -> None:
    """The row was read, then the other process deleted the voice: a FileNotFoundError, a 500 that
    showed the data directory's path."""
    a, b = two
    add(a, "x")
    real_load, real_read_bytes = np.load, voices_module.Path.read_bytes

    def load(path, *args, **kwargs):
        b.delete("x")
        return real_load(path, *args, **kwargs)

    def read_bytes(path):
        b.delete("x")
        return real_read_bytes(path)

    monkeypatch.setattr(voices_module.np, "load", load)
    with pytest.raises(VoiceNotFoundError, match="voice 'x' has no files") as error:
        a.codes("x")
    assert str(a.root) not in str(error.value)
    add(a, "x")
    monkeypatch.setattr(voices_module.Path, "read_bytes", read_bytes)
    with pytest.raises(VoiceNotFoundError, match="voice 'x' has no files"):
        a.audio("x")


def test_a_voice_whose_files_were_removed_by_hand_is_not_found_and_can_be_deleted(tmp_path) -> None:
    store = VoiceStore(tmp_path)
    try:
        voice, *_ = add(store, "x")
        shutil.rmtree(tmp_path / "voices" / "x")
        for read in (store.codes, store.audio):
            with pytest.raises(VoiceNotFoundError, match="delete it and upload it again"):
                read("x")
        with pytest.raises(VoiceNotFoundError):
            store.replace_codes("x", np.zeros((2, 4), np.int64), codec="other")
        assert store.get("x") == voice  # the failed replace changed nothing
        assert store.delete("x") == "x" and store.list() == []
        again, audio, codes = add(store, "x", seed=2)
        assert_stored(store, "x", audio, codes)
    finally:
        store.close()


def test_a_delete_that_never_committed_keeps_its_files(tmp_path) -> None:
    """A crash between moving the directory aside and the commit: the next start puts it back
    (the row is there); a moved-aside directory whose row is gone is removed."""
    store = VoiceStore(tmp_path)
    _, audio, codes = add(store, "kept")
    add(store, "gone", seed=1)
    store.delete("gone")
    store.close()
    voices = tmp_path / "voices"
    (voices / "kept").rename(voices / ".trash-0123abcd-kept")  # the crashed delete's
    (voices / ".trash-4567cdef-gone").mkdir()  # a committed delete's, not yet removed
    reopened = VoiceStore(tmp_path)
    try:
        assert_stored(reopened, "kept", audio, codes)
        assert sorted(p.name for p in voices.iterdir()) == ["kept"]
    finally:
        reopened.close()


def test_a_start_while_another_process_removes_a_deleted_voice_starts(tmp_path, monkeypatch) -> None:
    """A committed delete's moved-aside directory is removed by its process after the commit; a store
    opening meanwhile removed it too, and losing that race failed the server's start."""
    trash = tmp_path / "voices" / ".trash-89abcdef-gone"
    (trash / "inner").mkdir(parents=True)
    (trash / "inner" / "codes.npy").write_bytes(b"x")
    rmtree = shutil.rmtree

    def the_deleter_first(path, *args, **kwargs):
        if os.path.exists(trash / "inner"):
            rmtree(trash / "inner")  # the other process got there first
            raise FileNotFoundError(2, "No such file or directory", str(trash / "inner" / "codes.npy"))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(voices_module.shutil, "rmtree", the_deleter_first)
    VoiceStore(tmp_path).close()


class FailingCommit:
    """The store's connection, with one COMMIT that fails (a full disk)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.failed = db, False

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def test_a_delete_whose_commit_fails_keeps_the_voice_and_the_store_usable(tmp_path) -> None:
    store = VoiceStore(tmp_path)
    try:
        voice, audio, codes = add(store, "x")
        store._db = FailingCommit(store._db)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            store.delete("x")
        assert store.get("x") == voice
        assert_stored(store, "x", audio, codes)
        assert store.delete("x") == "x" and store.list() == []  # not left inside the failed transaction
    finally:
        store.close()


def test_codes_swapped_in_by_a_crashed_replace_are_never_read_as_the_old_codecs(tmp_path, monkeypatch) -> None:
    """The codes file was swapped before the commit: a crash in between left another codec's codes
    under the codec the row records (docstring: 'only makes the server re-encode once more')."""
    store = VoiceStore(tmp_path)
    voice, audio, codes = add(store, "x")
    real_replace = os.replace

    def crash_after(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt  # the process dies here: before the commit

    monkeypatch.setattr(voices_module.os, "replace", crash_after)
    new = np.arange(20).reshape(10, 2)
    with pytest.raises(KeyboardInterrupt):
        store.replace_codes("x", new, codec="other@2")
    monkeypatch.undo()
    store.close()
    reopened = VoiceStore(tmp_path)
    try:
        assert reopened.get("x") == voice
        assert_stored(reopened, "x", audio, codes)
        stored = reopened.codes("x", "other@2")
        assert stored is None or np.array_equal(stored, new)  # that codec's codes of this audio, or none
    finally:
        reopened.close()


class Encoder:
    """The engine's encode_voice stand-in: this server's codec's codes, 4 codebooks."""

    def __init__(self) -> None:
        self.calls = 0

    async def encode_voice(self, audio: bytes) -> np.ndarray:
        self.calls += 1
        return np.full((3, 4), 7, dtype=np.int64)


def test_another_servers_re_encode_between_lookup_and_read_never_gives_its_codes(two) -> None:
    """The codec was checked (get) apart from reading the codes: another server's replace_codes in
    between gave its codes (another codebook count: a false 400; the same one: wrong codes)."""
    mine, other = two
    _, _, codes = add(mine, "x")
    mine.replace_codes("x", codes, codec="mine@4")  # this server's codes
    real_codes = mine.codes

    def codes_after_the_other_server_re_encoded(*args):
        other.replace_codes("x", np.zeros((22, 10), np.int64), codec="other@10")
        return real_codes(*args)

    mine.codes = codes_after_the_other_server_re_encoded
    encoder = Encoder()
    reference = asyncio.run(VoiceResolver(mine, encoder, "mine@4", 4).stored("x", "voice"))
    assert np.array_equal(reference.codes, codes) and encoder.calls == 0
    assert np.array_equal(other.codes("x"), np.zeros((22, 10)))  # each codec keeps its own
    assert np.array_equal(real_codes("x", "mine@4"), codes)


def test_a_damaged_voice_library_is_reported_before_the_model_loads(tmp_path) -> None:
    """A damaged mossserve.db was a raw sqlite traceback, after minutes of model loading."""
    from mossserve.serve import ServerSettings
    from mossserve.serve.state import ServerState

    (tmp_path / "mossserve.db").write_text("garbage, not a SQLite database " * 10)
    with pytest.raises(VoiceLibraryError, match="mossserve.db"):
        ServerState.create(ServerSettings(model="/nonexistent/model", data_dir=tmp_path))


# ---- over HTTP ----------------------------------------------------------------------------------------

SPEECH, VOICES = "/v1/audio/speech", "/v1/audio/voices"
_samples, _rate = sf.read(AUDIO_DIR / "reference_zh.wav", dtype="float32")


def wav(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


SHORT = wav(_samples[:_rate], _rate)


def upload(client: httpx.Client, name: str) -> httpx.Response:
    return client.post(VOICES, data={"name": name}, files={"file": ("v.wav", SHORT, "audio/wav")})


@pytest.fixture
def server(server_app, tmp_path):
    with live_server(server_app(data_dir=tmp_path)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_a_voice_without_its_files_is_not_found_not_a_server_error(server, tmp_path) -> None:
    assert upload(server, "x").status_code == 201
    shutil.rmtree(tmp_path / "voices" / "x")
    r = server.post(SPEECH, json={"input": "Hi.", "voice": "x", "response_format": "wav"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "voice_not_found", r.text
    assert "delete it and upload it again" in r.json()["error"]["message"]  # not "upload it": that is a 409
    r = server.get(VOICES + "/x/audio")
    assert r.status_code == 404 and str(tmp_path) not in r.text, r.text
    assert server.delete(VOICES + "/x").status_code == 200
    assert upload(server, "x").status_code == 201


def test_a_stray_file_where_an_uploads_directory_goes_is_replaced(server, tmp_path) -> None:
    (tmp_path / "voices" / "stray").write_text("not a voice directory")
    r = upload(server, "stray")
    assert r.status_code == 201, r.text
    assert server.get(VOICES + "/stray/audio").status_code == 200


@pytest.mark.parametrize("value", ["bob", "x" * 64, "abcd" * 16])
def test_ref_audio_that_is_a_voice_name_and_no_audio_is_a_voice_not_found(server, value) -> None:
    """'anna' was voice_not_found, but 'bob' (not base64) 'neither a stored voice name nor base64' and
    'x' * 64 (48 bytes of base64) invalid_audio."""
    r = server.post(SPEECH, json={"input": "Hi.", "ref_audio": value, "response_format": "wav"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "voice_not_found" and error["param"] == "ref_audio" and f"{value!r}" in error["message"]


def test_ref_audio_of_real_audio_is_still_used_and_bad_base64_still_named(server) -> None:
    inline = base64.b64encode(SHORT).decode()
    r = server.post(SPEECH, json={"input": "Hi.", "ref_audio": inline, "response_format": "wav"})
    assert r.status_code == 200, r.text
    r = server.post(SPEECH, json={"input": "Hi.", "ref_audio": "not base64!", "response_format": "wav"})
    assert r.status_code == 400 and "neither a stored voice name nor base64" in r.text
    r = server.post(SPEECH, json={"input": "Hi.", "ref_audio": base64.b64encode(b"RIFF" + bytes(60)).decode(),
                                  "response_format": "wav"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio", r.text


def test_a_stored_transcript_another_model_refuses_names_the_voice(tmp_path) -> None:
    """Stored by a server of another model or a larger --max-input-chars: Fish S2 Pro refused it as
    `ref_text`, a field the client never sent."""
    from contextlib import closing

    from fish_cases import FISH_DIR

    from mossserve.api import TTS
    from mossserve.serve import ServerSettings, create_app
    from mossserve.serve.state import voice_codes_id

    with closing(TTS.from_pretrained(FISH_DIR)) as fish:
        codec = voice_codes_id(fish)
        store = VoiceStore(tmp_path)
        audio, _ = sample()
        for name, transcript in (("tokens", "hi <|audio_pad|> there"), ("long", "word " * 20)):
            store.add(name, audio, SR, np.zeros((5, fish.talker.codebooks), np.int64), transcript, codec, "0" * 64)
        store.close()
        app = create_app(ServerSettings(data_dir=tmp_path, max_input_chars=50), tts=fish)
        with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
            for body, param, message in [
                ({"voice": "tokens"}, "voice", "the transcript of the stored voice 'tokens' contains"),
                ({"ref_audio": "long"}, "ref_audio", "the transcript of the stored voice 'long' has 100 characters"),
                ({"speakers": [{"voice": "tokens"}]}, "speakers[0].voice", "the stored voice 'tokens'"),
            ]:
                r = client.post(SPEECH, json={"input": "Hi.", "response_format": "wav", **body})
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["param"] == param and message in error["message"], error
                assert "ref_text," in error["message"]  # what to do instead
            r = client.post(SPEECH, json={"input": "Hi.", "voice": "tokens", "ref_text": "Hello.", "max_new_tokens": 2,
                                          "response_format": "wav"})
            assert r.status_code == 200, r.text  # its own ref_text: the stored transcript is not used


def test_servers_whose_references_differ_in_loudness_share_no_codes(tmp_path, delay_model_dirs) -> None:
    """MOSS-TTSD and MOSS-TTS-Realtime share a codec and 16 codebooks, but only TTSD brings a
    reference to -20 dBFS first: a voice uploaded on one served the other that model's codes."""
    from contextlib import closing

    from conftest import CODEC_DIR
    from realtime_cases import REALTIME_DIR

    from mossserve.api import TTS
    from mossserve.serve import ServerSettings, create_app

    quiet = io.BytesIO()  # -33 dBFS: the loudness step raises it 3 dB
    sf.write(quiet, 0.03 * np.sin(np.linspace(0, 2000, 24000 * 2)).astype(np.float32), 24000, format="WAV")
    with closing(TTS.from_pretrained(delay_model_dirs["tiny_nvq16"], codec=CODEC_DIR / "tiny")) as ttsd, \
            closing(TTS.from_pretrained(REALTIME_DIR, codec=CODEC_DIR / "tiny")) as realtime:
        assert (ttsd.codec_source, ttsd.talker.codebooks) == (realtime.codec_source, realtime.talker.codebooks)
        with live_server(create_app(ServerSettings(data_dir=tmp_path), tts=ttsd)) as url:
            response = httpx.post(f"{url}/v1/audio/voices", data={"name": "anna"},
                                  files={"file": ("anna.wav", quiet.getvalue(), "audio/wav")}, timeout=120)
            assert response.status_code == 201, response.text
        state = create_app(ServerSettings(data_dir=tmp_path), tts=realtime).state.server
        stored = asyncio.run(state.resolver.stored("anna", "voice")).codes
        state.voices.close()
        assert np.array_equal(stored, realtime.encode_voice(quiet.getvalue()))
        assert not np.array_equal(stored, ttsd.encode_voice(quiet.getvalue()))
