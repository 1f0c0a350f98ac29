"""VoiceStore: voices stored once, used by name, surviving restarts and concurrent adds."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import soundfile as sf

from mossserve.errors import InvalidRequestError
from mossserve.serve.voices import VoiceExistsError, VoiceStore, validate_voice_name

SR = 24000


def sample(seed: int = 0, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Audio (channels, samples) float32 and codes (frames, codebooks) int32 (stored as int64)."""
    rng = np.random.default_rng(seed)
    audio = rng.uniform(-1, 1, (channels, SR // 2)).astype(np.float32)
    codes = rng.integers(0, 1024, (6, 4)).astype(np.int32)
    return audio, codes


def add(store: VoiceStore, name: str, seed: int = 0, channels: int = 1):
    audio, codes = sample(seed, channels)
    voice = store.add(name, audio, SR, codes, f"transcript {seed}", codec=f"codec-{seed}", sha256=f"{seed:064x}")
    return voice, audio, codes


@pytest.fixture
def store(tmp_path):
    store = VoiceStore(tmp_path)
    yield store
    store.close()


def assert_stored(store: VoiceStore, name: str, audio: np.ndarray, codes: np.ndarray) -> None:
    stored = store.codes(name)
    assert stored.dtype == np.int64 and np.array_equal(stored, codes)
    samples, rate = sf.read(io.BytesIO(store.audio(name)), dtype="float32", always_2d=True)
    assert rate == SR and np.array_equal(samples.T, audio)


def test_add_get_list_codes_round_trip(store, tmp_path) -> None:
    voice, audio, codes = add(store, "alice", seed=1, channels=2)
    bob, bob_audio, bob_codes = add(store, "Bob-2", seed=2)
    assert voice.to_json() == {
        "name": "alice", "transcript": "transcript 1", "created_at": voice.created_at, "duration_s": 0.5,
        "sample_rate": SR, "frames": 6, "codebooks": 4, "codec": "codec-1", "sha256": f"{1:064x}"}
    assert isinstance(voice.created_at, float)
    assert store.get("alice") == voice and store.get("carol") is None
    assert store.list() == [bob, voice]  # sorted by name: uppercase before lowercase
    assert_stored(store, "alice", audio, codes)
    assert_stored(store, "Bob-2", bob_audio, bob_codes)
    assert store.audio("alice") == (tmp_path / "voices" / "alice" / "reference.wav").read_bytes()
    assert (tmp_path / "voices" / "alice" / "codes.npy").is_file()
    assert (tmp_path / "mossserve.db").is_file()


def test_voices_survive_a_restart(tmp_path) -> None:
    first = VoiceStore(tmp_path)
    voice, audio, codes = add(first, "alice", seed=3)
    other, *_ = add(first, "v1.0_test", seed=4)
    first.close()
    second = VoiceStore(tmp_path)
    try:
        assert second.list() == [voice, other]
        assert second.get("alice") == voice
        assert_stored(second, "alice", audio, codes)
    finally:
        second.close()


def test_delete_removes_row_and_files(store, tmp_path) -> None:
    add(store, "alice")
    kept, audio, codes = add(store, "bob", seed=5)
    assert store.delete("ALICE") == "alice"  # the name as stored
    assert store.get("alice") is None and store.list() == [kept]
    assert not (tmp_path / "voices" / "alice").exists()
    assert store.delete("alice") is None
    with pytest.raises(InvalidRequestError, match="not found"):
        store.audio("alice")
    assert_stored(store, "bob", audio, codes)
    again, audio, codes = add(store, "alice", seed=6)  # the name is free again
    assert store.get("alice") == again
    assert_stored(store, "alice", audio, codes)


def test_duplicate_name_is_refused_and_leaves_the_first_voice(store, tmp_path) -> None:
    voice, audio, codes = add(store, "alice", seed=7)
    for name in ("alice", "ALICE"):  # names are unique regardless of case
        with pytest.raises(VoiceExistsError, match="already exists"):
            add(store, name, seed=8)
    assert store.list() == [voice] and store.get("Alice") == voice
    assert_stored(store, "alice", audio, codes)
    assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == ["alice"]


BAD_NAMES = ["", ".", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "-x", "_x", "a b", " a", "a\tb", "a\nb",
             "alice\n", "x" * 65, "nul\x00", "é", "caf\u00e9", "a:b", "a*b", 5, None, b"alice"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_everywhere(store, tmp_path, name) -> None:
    with pytest.raises(InvalidRequestError, match="1 to 64 characters"):
        validate_voice_name(name)
    with pytest.raises(InvalidRequestError, match="invalid voice name"):
        add(store, name)
    for method in (store.get, store.codes, store.audio, store.delete):
        with pytest.raises(InvalidRequestError, match="invalid voice name"):
            method(name)
    assert store.list() == [] and list((tmp_path / "voices").iterdir()) == []


@pytest.mark.parametrize("name", ["alice", "Bob-2", "v1.0_test", "0", "a..b", "x" * 64])
def test_good_names_are_accepted(store, name) -> None:
    assert validate_voice_name(name) == name
    voice, audio, codes = add(store, name)
    assert store.get(name) == voice and voice.name == name
    assert_stored(store, name, audio, codes)


def test_concurrent_adds_of_one_name_have_exactly_one_winner(store, tmp_path) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = add(store, "alice", seed=i)
        except Exception as e:  # noqa: BLE001 - recorded and checked below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, tuple)]
    losers = [r for r in results if isinstance(r, VoiceExistsError)]
    assert len(winners) == 1 and len(losers) == n - 1, results
    voice, audio, codes = winners[0]
    assert store.list() == [voice]
    assert_stored(store, "alice", audio, codes)
    assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == ["alice"]  # no stray temp dirs
    assert sorted(p.name for p in (tmp_path / "voices" / "alice").iterdir()) == ["codes.npy", "reference.wav"]


def test_replace_codes_updates_codes_and_codec_and_keeps_each_codecs_codes(store, tmp_path) -> None:
    voice, audio, codes = add(store, "alice")
    new = np.arange(30, dtype=np.int16).reshape(10, 3)
    updated = store.replace_codes("ALICE", new, codec="codec-v2")
    assert updated.name == "alice" and (updated.frames, updated.codebooks, updated.codec) == (10, 3, "codec-v2")
    assert updated.created_at == voice.created_at and updated.sha256 == voice.sha256
    assert store.get("alice") == updated
    assert_stored(store, "alice", audio, new)
    assert np.array_equal(store.codes("alice", "codec-v2"), new)
    assert store.codes("alice", "codec-v3") is None
    assert store.codes("alice", voice.codec) is None  # codes.npy is no longer the recorded codec's
    store.replace_codes("alice", codes, codec=voice.codec)  # that codec's server re-encodes it once
    for codec, expected in ((voice.codec, codes), ("codec-v2", new)):  # and then each server reads its own
        assert np.array_equal(store.codes("alice", codec), expected)
    updated = store.replace_codes("alice", new, codec="codec-v2")
    assert not list((tmp_path / "voices" / "alice").glob("*.tmp"))
    store.close()
    reopened = VoiceStore(tmp_path)
    try:
        assert reopened.get("alice") == updated
        assert np.array_equal(reopened.codes("alice"), new)
    finally:
        reopened.close()


def test_codes_re_encoded_from_replaced_audio_are_not_swapped_in(store) -> None:
    """The server re-encodes a voice another codec made (slow); if the voice was deleted and
    uploaded again meanwhile, the codes of the old audio must not replace the new voice's."""
    old, _, _ = add(store, "alice", seed=0)
    store.delete("alice")
    new, audio, codes = add(store, "alice", seed=1)
    stale = np.zeros((4, 3), dtype=np.int64)
    assert store.replace_codes("alice", stale, codec="codec-v2", sha256=old.sha256) == new
    assert_stored(store, "alice", audio, codes)
    updated = store.replace_codes("alice", stale, codec="codec-v2", sha256=new.sha256)
    assert updated.codec == "codec-v2" and np.array_equal(store.codes("alice"), stale)


def test_missing_voice_is_an_invalid_request(store) -> None:
    for method in (store.codes, store.audio):
        with pytest.raises(InvalidRequestError, match="voice 'ghost' not found"):
            method("ghost")
    with pytest.raises(InvalidRequestError, match="voice 'ghost' not found"):
        store.replace_codes("ghost", np.zeros((1, 1), dtype=np.int64), codec="c")
    assert store.list() == []


def test_leftovers_of_a_crash_are_cleaned_or_replaced(tmp_path) -> None:
    """A crash can leave a temp dir (mid-write) or a voice dir without a row (before commit)."""
    (tmp_path / "voices" / ".tmp-crashed").mkdir(parents=True)
    (tmp_path / "voices" / ".tmp-crashed" / "codes.npy").write_bytes(b"partial")
    (tmp_path / "voices" / "alice").mkdir()
    (tmp_path / "voices" / "alice" / "codes.npy").write_bytes(b"orphan")
    store = VoiceStore(tmp_path)
    try:
        assert store.list() == [] and store.get("alice") is None
        assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == ["alice"]
        voice, audio, codes = add(store, "alice")
        assert store.list() == [voice]
        assert_stored(store, "alice", audio, codes)
    finally:
        store.close()


def test_a_failed_write_leaves_neither_row_nor_files(store, tmp_path, monkeypatch) -> None:
    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mossserve.serve.voices.sf.write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        add(store, "alice")
    assert store.list() == [] and list((tmp_path / "voices").iterdir()) == []
    monkeypatch.undo()
    voice, audio, codes = add(store, "alice")  # the name was not taken by the failed add
    assert store.list() == [voice]
    assert_stored(store, "alice", audio, codes)


class Encoder:
    """The engine's `encode_voice` stand-in: codes from the audio file's length; `during` runs while
    it encodes (another request's work meanwhile)."""

    def __init__(self, during=None) -> None:
        self.during, self.calls = during, 0

    async def encode_voice(self, audio: bytes) -> np.ndarray:
        self.calls += 1
        if self.during is not None:
            self.during()
        return np.full((2, 3), len(audio) % 1000, dtype=np.int64)


def test_a_stored_voice_of_another_codec_is_re_encoded_once(store) -> None:
    import asyncio

    from mossserve.serve.references import VoiceResolver

    add(store, "alice", seed=0)  # stored with codec "codec-0"
    encoder = Encoder()
    resolver = VoiceResolver(store, encoder, "server-codec", 3)
    codes, transcript, name, param = asyncio.run(resolver.stored("alice", "voice"))
    assert encoder.calls == 1 and transcript == "transcript 0" and name == "alice" and param == "voice"
    assert store.get("alice").codec == "server-codec"
    assert np.array_equal(store.codes("alice"), codes)
    again = asyncio.run(resolver.stored("alice", "voice")).codes
    assert encoder.calls == 1 and np.array_equal(again, codes)


def test_a_voice_uploaded_again_during_its_re_encode_keeps_its_own_codes(store) -> None:
    import asyncio

    from mossserve.serve.references import VoiceResolver

    add(store, "alice", seed=0)
    replaced = {}

    def upload_again() -> None:
        store.delete("alice")
        replaced["voice"], _, replaced["codes"] = add(store, "alice", seed=1)

    resolver = VoiceResolver(store, Encoder(during=upload_again), "server-codec", 3)
    asyncio.run(resolver.stored("alice", "voice"))
    assert store.get("alice") == replaced["voice"]
    assert np.array_equal(store.codes("alice"), replaced["codes"])


@pytest.mark.parametrize("damage", ["garbage database", "database is a directory", "voices is a file"])
def test_a_damaged_voice_library_is_an_error_that_names_the_file(tmp_path, damage) -> None:
    """These were raw sqlite3 / FileExistsError tracebacks from `serve`."""
    from mossserve.errors import MossServeError
    from mossserve.serve.voices import VoiceLibraryError

    culprit = tmp_path / ("voices" if damage == "voices is a file" else "mossserve.db")
    if damage == "database is a directory":
        culprit.mkdir()
    else:
        culprit.write_text("garbage, not a SQLite database " * 10)
    with pytest.raises(VoiceLibraryError, match="move it aside") as error:
        VoiceStore(tmp_path)
    assert str(culprit) in str(error.value) and isinstance(error.value, MossServeError)  # the CLI's `error: ...`


@pytest.mark.parametrize("stray", ["file", "link to a directory", "dangling link"])
def test_whatever_is_where_a_voices_directory_goes_without_a_row_is_replaced(store, tmp_path, stray) -> None:
    """A stray file there made the upload a 500 (NotADirectoryError)."""
    path, elsewhere = tmp_path / "voices" / "alice", tmp_path / "elsewhere"
    if stray == "file":
        path.write_text("not a voice")
    else:
        elsewhere.mkdir()
        (elsewhere / "keep.txt").write_text("not ours")
        path.symlink_to(elsewhere if stray == "link to a directory" else tmp_path / "missing")
    voice, audio, codes = add(store, "alice")
    assert store.list() == [voice] and path.is_dir() and not path.is_symlink()
    assert_stored(store, "alice", audio, codes)
    assert stray == "file" or (elsewhere / "keep.txt").exists()  # a link is removed, not followed


def test_a_stored_transcript_is_checked_by_this_server_where_it_is_used(store) -> None:
    """It was checked by the server that stored it (another model, another --max-input-chars); the
    model then refused it as `ref_text`, a field the client never sent."""
    import asyncio

    from mossserve.serve.errors import APIError
    from mossserve.serve.references import VoiceResolver
    from mossserve.serve.schemas import SpeakerBody, SpeechBody

    add(store, "alice")  # "transcript 0", codec "codec-0"
    audio, codes = sample(1)
    store.add("bea", audio, SR, codes, "hi <|bad|>", codec="codec-0", sha256="1" * 64)

    def check_text(text: str, name: str) -> None:
        if "<|bad|>" in text:
            raise InvalidRequestError(f"{name} contains <|bad|>")

    def resolver(needs_transcript: bool) -> VoiceResolver:
        return VoiceResolver(store, Encoder(), "codec-0", 4, needs_transcript, check_text=check_text, max_chars=11)

    def refusal(call) -> APIError:
        with pytest.raises(APIError) as error:
            asyncio.run(call)
        return error.value

    error = refusal(resolver(True).main_voice(SpeechBody(input="Hi.", voice="alice")))
    assert (error.param, error.code) == ("voice", "text_too_long")
    assert error.message.startswith("the transcript of the stored voice 'alice' has 12 characters; this server "
                                    "takes at most 11 per field (--max-input-chars): give ref_text, or store")
    error = refusal(resolver(False).speakers([SpeakerBody(ref_audio="bea")]))
    assert error.param == "speakers[0].ref_audio" and error.code is None
    assert error.message.startswith("the transcript of the stored voice 'bea' contains <|bad|>; "
                                    "give speakers[0].ref_text")
    # not used, so not refused: a model that clones from audio alone, and a transcript given instead
    assert asyncio.run(resolver(False).main_voice(SpeechBody(input="Hi.", voice="bea")))[1] == "hi <|bad|>"
    asyncio.run(resolver(True).main_voice(SpeechBody(input="Hi.", voice="bea", ref_text="Hello.")))
    asyncio.run(resolver(False).speakers([SpeakerBody(voice="bea", ref_text="Hello.")]))


def test_a_preset_voice_name_means_the_default_voice_for_a_speaker_too(store) -> None:
    """`voice: "alloy"` means the model's own voice; a speaker's was refused as "not a stored voice (...
    the OpenAI preset names mean the model's default voice)", which contradicted itself."""
    import asyncio

    from mossserve.serve.errors import APIError
    from mossserve.serve.references import VoiceResolver
    from mossserve.serve.schemas import SpeakerBody

    resolver = VoiceResolver(store, Encoder(), "codec-0", 4)
    speaker, = asyncio.run(resolver.speakers([SpeakerBody(voice="alloy")]))
    assert speaker.voice is None and speaker.reference_text is None
    with pytest.raises(APIError) as error:
        asyncio.run(resolver.speakers([SpeakerBody(voice="nobody")]))
    assert error.value.code == "voice_not_found" and error.value.param == "speakers[0].voice"


def test_a_stored_transcripts_dialogue_label_is_not_a_speakers(store) -> None:
    """A voice stored with its TTSD label ("[S1] Hello.") used as speaker 2 was refused as speaker 2's
    transcript holding [S1], naming speakers[1].ref_text, a field the client never sent."""
    import asyncio

    from mossserve.serve.references import VoiceResolver
    from mossserve.serve.schemas import SpeakerBody

    audio, codes = sample(1)
    store.add("bob", audio, SR, codes, " [S1] Hello [S1] there.", codec="codec-0", sha256="1" * 64)
    resolver = VoiceResolver(store, Encoder(), "codec-0", 4)
    speakers = asyncio.run(resolver.speakers([SpeakerBody(voice="bob"), SpeakerBody(voice="bob", ref_text="[S2] Hi.")]))
    assert [s.reference_text for s in speakers] == ["Hello [S1] there.", "[S2] Hi."]  # only a stored label goes
