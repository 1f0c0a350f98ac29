"""Reading, loading and resampling audio: the real recordings, bytes and file objects, bad input."""

import hashlib
import io
import json
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from mossserve.audio import StreamEncoder, encode_audio, load_audio, read_audio, resample
from mossserve.errors import AudioError, InvalidRequestError

FIXTURES = Path(__file__).parent / "fixtures" / "audio"
MANIFEST = {e["file"]: e for e in json.loads((FIXTURES / "audio_manifest.json").read_text())}
FILES = sorted(p.name for p in FIXTURES.iterdir() if p.name in MANIFEST)


def expected_samples(entry: dict) -> int:
    # read_audio uses libsndfile where it can (so mpg123 counts for mp3), FFmpeg otherwise (m4a).
    return entry["samples_libsndfile"] if entry["samples_libsndfile"] is not None else entry["samples_ffmpeg"]


def sine(rate: int, freq: float = 1000.0, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_fixture_copies_cover_every_decoder_path():
    suffixes = {Path(name).suffix for name in FILES}
    assert {".wav", ".mp3", ".m4a"} <= suffixes


@pytest.mark.parametrize("name", FILES)
def test_fixture_decodes_as_the_manifest_says(name):
    entry = MANIFEST[name]
    x, rate = read_audio(FIXTURES / name)
    assert x.dtype == np.float32
    assert rate == entry["sample_rate"]
    assert x.shape == (entry["channels"], expected_samples(entry))
    assert abs(float(np.abs(x).max()) - entry["peak"]) < 6e-5  # manifest peaks have 4 decimals


@pytest.mark.parametrize("name", ["reference_zh.wav", "reference_en_3.mp3", "reference_en.m4a"])
def test_bytes_and_file_objects_decode_like_the_path(name):
    path = FIXTURES / name
    x, rate = read_audio(path)
    from_bytes, rate_b = read_audio(path.read_bytes())
    with open(path, "rb") as f:
        from_file, rate_f = read_audio(f)
    assert rate == rate_b == rate_f
    np.testing.assert_array_equal(x, from_bytes)
    np.testing.assert_array_equal(x, from_file)


@pytest.mark.parametrize("format,subtype", [("OGG", "VORBIS"), ("OGG", "OPUS"), ("FLAC", "PCM_16"), ("WAV", "FLOAT")])
def test_other_libsndfile_formats_decode(format, subtype):
    buffer = io.BytesIO()
    sf.write(buffer, sine(24000, amplitude=0.25), 24000, format=format, subtype=subtype)
    x, rate = read_audio(buffer.getvalue())
    assert rate == 24000 and x.shape == (1, 24000)
    assert abs(float(np.abs(x).max()) - 0.25) < 0.02


def test_streamed_flac_of_unknown_length_falls_back_to_ffmpeg():
    encoder = StreamEncoder("flac", 24000)
    data = encoder.write(sine(24000)) + encoder.close()
    with pytest.raises((ValueError, sf.LibsndfileError)):
        sf.read(io.BytesIO(data))  # libsndfile cannot read a FLAC without its length
    x, rate = read_audio(data)
    assert rate == 24000 and x.shape == (1, 24000)


# sha256 of the float32 clips stored in the MOSS-Audio-Tokenizer codec fixtures (goldens.json):
# load_audio must prepare reference audio exactly as those fixtures were prepared.
CODEC_CLIPS = [
    ("reference_zh.wav", 0.10, 2.50, "6fd11bffdf963d84c97bcefb9fe5d939b0797edb2bbdd63b4c16acf74c20ee59"),
    ("reference_02_s1.wav", 0.50, 2.56, "3d2dcc3d3e09f6aabae5088be0e6975b7ad380b07063d4d2c3b1b0e59aab90e0"),
    ("demo_gt.wav", 1.00, 2.20, "cf93d8414887724668b4f97ab45f62558811559f60d7e6ce18967eb5cf983573"),
]


@pytest.mark.parametrize("name,start,dur,sha", CODEC_CLIPS)
def test_load_audio_reproduces_the_codec_fixture_clips(name, start, dur, sha):
    x = load_audio(FIXTURES / name, 24000)
    a = round(start * 24000)
    clip = x[0, a : a + round(dur * 24000)]
    assert hashlib.sha256(clip.astype("<f4").tobytes()).hexdigest() == sha


def test_load_audio_averages_stereo_to_mono():
    # the stereo fixtures hold the same signal twice, so build channels that differ
    left, right = sine(24000, 440.0), sine(24000, 1000.0, amplitude=0.2)
    mono = load_audio(encode_audio(np.stack([left, right]), 24000, "flac"), 24000)
    assert mono.shape == (1, 24000)
    expected = (np.round(left * 32767) / 32768 + np.round(right * 32767) / 32768) / 2
    np.testing.assert_allclose(mono[0], expected, atol=1e-7)


def test_load_audio_duplicates_mono_for_two_channels():
    mono = load_audio(FIXTURES / "demo_gt.wav", 24000)
    stereo = load_audio(FIXTURES / "demo_gt.wav", 24000, channels=2)
    assert stereo.shape == (2, mono.shape[1])
    np.testing.assert_array_equal(stereo[0], mono[0])
    np.testing.assert_array_equal(stereo[1], mono[0])


def test_load_audio_resamples_to_the_target_rate():
    x = load_audio(FIXTURES / "reference_02_s1.wav", 24000)  # 124620 samples at 16 kHz
    assert x.dtype == np.float32
    assert x.shape == (1, 124620 * 3 // 2)


@pytest.mark.parametrize("src,dst", [(16000, 24000), (44100, 24000), (48000, 24000), (24000, 48000)])
def test_resample_keeps_frequency_and_level(src, dst):
    x = sine(src, freq=1000.0)
    y = resample(x, src, dst)
    assert y.dtype == np.float32 and y.shape == (dst,)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) * dst / len(y) - 1000.0) <= 1.0
    edge = dst // 20  # leave out the filter's start-up and tail
    assert rms(y[edge:-edge]) == pytest.approx(rms(x), rel=0.01)


def test_resample_keeps_channels_apart():
    x = np.stack([sine(44100, 440.0), sine(44100, 3000.0, amplitude=0.2)])
    y = resample(x, 44100, 24000)
    assert y.shape == (2, 24000)
    np.testing.assert_allclose(y[1], resample(x[1], 44100, 24000), atol=1e-6)
    assert rms(y[0]) > 2 * rms(y[1])


# --- bad input ---------------------------------------------------------------------------------


def test_audio_error_is_an_invalid_request():
    assert issubclass(AudioError, InvalidRequestError)


def test_random_bytes_are_refused():
    data = np.random.default_rng(0).bytes(4096)
    with pytest.raises(AudioError, match="not a supported audio format"):
        read_audio(data)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 100)
    with pytest.raises(AudioError, match="not a supported audio format"):
        load_audio(path, 24000)


def test_empty_data_and_empty_file_are_refused(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        read_audio(b"")
    with pytest.raises(AudioError, match="empty"):
        read_audio(io.BytesIO(b""))
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        read_audio(tmp_path / "empty.wav")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        read_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="not a regular file"):
        read_audio(tmp_path)


def test_a_file_without_audio_is_named(tmp_path):
    subtitles = tmp_path / "captions.srt"  # FFmpeg opens it: a subtitle stream, no audio
    subtitles.write_text("1\n00:00:00,000 --> 00:00:01,000\nHello there\n\n2\n00:00:01,000 --> 00:00:02,000\nAgain\n")
    with pytest.raises(AudioError, match="captions.srt' holds no audio stream"):
        read_audio(subtitles)


@pytest.mark.parametrize("name,keep", [("demo_gt.wav", 30), ("reference_en_0.mp3", 200), ("reference_en.m4a", 5000)])
def test_truncated_files_are_refused(name, keep):
    with pytest.raises(AudioError, match="cannot decode"):
        read_audio((FIXTURES / name).read_bytes()[:keep])


def test_header_without_samples_is_refused():
    header_only = (FIXTURES / "demo_gt.wav").read_bytes()[:44]
    assert read_audio(header_only)[0].shape == (1, 0)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(header_only, 24000)


def test_silent_audio_is_refused():
    zeros = encode_audio(np.zeros(24000, np.float32), 24000, "wav")
    with pytest.raises(AudioError, match="silent"):
        load_audio(zeros, 24000)
    with pytest.raises(AudioError, match="silent"):
        load_audio(zeros, 24000, min_peak=0)
    hiss = encode_audio(sine(24000, amplitude=3e-4), 24000, "wav")
    with pytest.raises(AudioError, match="silent"):
        load_audio(hiss, 24000)
    assert load_audio(hiss, 24000, min_peak=1e-4).shape == (1, 24000)


def test_too_long_audio_is_refused():
    with pytest.raises(AudioError, match="too long.*limit is 4.9 s"):
        load_audio(FIXTURES / "demo_gt.wav", 24000, max_seconds=4.9)  # 5.067 s
    assert load_audio(FIXTURES / "demo_gt.wav", 24000, max_seconds=5.1).shape[1] == 121600


def test_a_recording_of_the_limit_is_not_refused_for_its_encoders_padding():
    """AAC keeps its priming and last frame: one second of audio reads back as 1.067 s, and was refused
    at a limit of 1 s ("1.0 s or more, the limit is 1 s")."""
    t = np.arange(24000) / 24000
    data = encode_audio((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 24000, "aac")
    assert read_audio(data)[0].shape[-1] > 24000  # the padding is there
    assert load_audio(data, 24000, max_seconds=1).shape[-1] > 24000
    with pytest.raises(AudioError, match="too long"):
        load_audio(data, 24000, max_seconds=0.9)


def test_too_long_audio_is_refused_while_decoding_with_ffmpeg():
    with pytest.raises(AudioError, match="too long.*limit is 1 s"):
        load_audio(FIXTURES / "reference_en.m4a", 24000, max_seconds=1)


def test_non_finite_samples_are_refused():
    x = sine(24000)
    x[100] = np.nan
    buffer = io.BytesIO()
    sf.write(buffer, x, 24000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinity"):
        load_audio(buffer.getvalue(), 24000)


def test_unmappable_channel_count_is_refused():
    three = encode_audio(np.stack([sine(24000)] * 3), 24000, "wav")
    with pytest.raises(AudioError, match="3-channel"):
        load_audio(three, 24000, channels=2)


def encoded(x: np.ndarray, rate: int, format: str = "adts", codec: str = "aac") -> bytes:
    """`x` (channels, n) as one raw stream (one file of a broadcast capture: ADTS AAC by default)."""
    layout = {1: "mono", 2: "stereo"}[len(x)]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        for start in range(0, x.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, start : start + 1024]), format="fltp",
                                               layout=layout)
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize("second_rate, second_channels", [(22050, 1), (44100, 2)])
def test_a_stream_that_changes_rate_or_layout_midway_keeps_the_first(second_rate, second_channels):
    """Two ADTS files joined (a 1 kHz tone, mono at 44.1 kHz, then at another rate or in stereo):
    one second of each, at the first part's rate and channels, the tone's pitch kept throughout
    (labelled with the last rate, the first part played at half speed; or the concatenation failed)."""
    first = sine(44100)[None]
    second = np.repeat(sine(second_rate, amplitude=0.25)[None], second_channels, axis=0)
    x, rate = read_audio(encoded(first, 44100) + encoded(second, second_rate))
    assert rate == 44100 and x.shape[0] == 1
    assert abs(x.shape[1] / rate - 2.0) < 0.15  # AAC adds priming and padding to each part (the bug: 3.2 s)
    half = rate // 2
    assert dominant_frequency(x[0, :half], rate) == pytest.approx(1000, abs=2)
    assert dominant_frequency(x[0, -half:], rate) == pytest.approx(1000, abs=2)
    assert rms(x[0, 1000:half]) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert rms(x[0, -half:-1000]) == pytest.approx(0.25 / np.sqrt(2), rel=0.05)


def test_an_mp2_stream_that_changes_layout_midway_is_read():
    """MP2 decodes to int16: FFmpeg's resampler, set up by the first (mono) frame, refused the first
    stereo frame with a ValueError, a server error."""
    first, second = sine(32000)[None], np.repeat(sine(32000, amplitude=0.25)[None], 2, axis=0)
    x, rate = read_audio(encoded(first, 32000, "mp2", "mp2") + encoded(second, 32000, "mp2", "mp2"))
    assert rate == 32000 and x.shape[0] == 1
    assert abs(x.shape[1] / rate - 2.0) < 0.15
    assert rms(x[0, -rate // 2 : -1000]) == pytest.approx(0.25 / np.sqrt(2), rel=0.05)


def test_a_192_khz_file_exactly_at_the_limit_is_taken():
    """The sample budget rounded (5.1 s x 192000 = 979199.99...) and refused the one file at exactly the
    limit that the seconds check takes."""
    data = io.BytesIO()
    sf.write(data, np.full(979_200, 0.1, np.float32), 192_000, format="WAV", subtype="PCM_16")
    x, rate = read_audio(data.getvalue(), max_seconds=5)
    assert (x.shape, rate) == ((1, 979_200), 192_000)


def test_a_file_at_a_rate_far_past_real_recordings_is_refused_by_its_samples():
    """A 655 kHz, 8-channel FLAC of 59 s is 337 KB and decoded to 3.4 GB: its seconds were within the
    limit. Samples per channel past the limit's seconds at 192 kHz are refused."""
    rate = 1_000_000
    data = encode_audio(np.zeros((8, rate // 10), np.float32) + 0.25, rate, "wav")  # 0.1 s
    with pytest.raises(AudioError, match="too many samples.*limit is 0.1 s at 192000 Hz"):
        load_audio(data, 24000, max_seconds=0.1)
    assert load_audio(data, 24000, max_seconds=0.5).shape == (1, 2400)


def test_decoding_holds_the_wanted_channels_not_the_files(tmp_path):
    """16 channels mixed to mono block by block: the file's channels are never all in memory (they
    were, three times: the blocks, their concatenation, its transposed copy)."""
    channels, n = 16, 48000 * 6
    path = tmp_path / "many.wav"
    sf.write(path, np.tile(sine(48000, seconds=6)[:, None], (1, channels)), 48000, subtype="PCM_16")
    tracemalloc.start()
    try:
        x = load_audio(path, 48000, channels=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (1, n)
    np.testing.assert_array_equal(x, read_audio(path)[0].mean(axis=0, keepdims=True, dtype=np.float64)
                                  .astype(np.float32))
    assert peak < channels * n * 4  # the file's channels as float32


def test_a_chained_ogg_file_is_read_to_its_end():
    """Two Ogg Vorbis files joined end to end (a stream recording): libsndfile reads the first only."""
    parts = []
    for freq in (1000.0, 500.0):
        buffer = io.BytesIO()
        sf.write(buffer, sine(44100, freq), 44100, format="OGG", subtype="VORBIS")
        parts.append(buffer.getvalue())
    x, rate = read_audio(b"".join(parts))
    assert rate == 44100 and abs(x.shape[1] / rate - 2.0) < 0.02
    assert dominant_frequency(x[0, : rate // 2], rate) == pytest.approx(1000, abs=2)
    assert dominant_frequency(x[0, -rate // 2 :], rate) == pytest.approx(500, abs=2)
    one, _ = read_audio(parts[0])  # one stream still goes through libsndfile
    assert one.shape[1] == 44100


def flac_claiming(samples: int) -> bytes:
    """A one-second FLAC whose STREAMINFO says it holds `samples` samples."""
    buffer = io.BytesIO()
    sf.write(buffer, sine(44100), 44100, format="FLAC")
    data = bytearray(buffer.getvalue())
    at = 4 + 4 + 10  # "fLaC", the block header, then rate/channels/bits/total in 8 bytes (36 bits total)
    fields = int.from_bytes(data[at : at + 8], "big")
    data[at : at + 8] = ((fields >> 36 << 36) | samples).to_bytes(8, "big")
    return bytes(data)


def test_a_header_that_overstates_the_length_neither_sizes_the_read_nor_refuses_it():
    """One second of FLAC that says 2**36 - 1 samples (a buffer of 256 GiB was asked for) or five
    hours (a 60 s limit refused it)."""
    for claim in (2**36 - 1, 44100 * 3600 * 5):
        data = flac_claiming(claim)
        assert sf.info(io.BytesIO(data)).frames == claim
        x, rate = read_audio(data, max_seconds=60)
        assert rate == 44100 and x.shape == (1, 44100)
        assert np.allclose(x[0], sine(44100), atol=1e-4)


def test_an_mp3_cut_short_gives_the_samples_it_holds_and_no_more(monkeypatch):
    """A cut MP3's header promises its whole length; libsndfile decodes what is there, and soundfile's
    blocks() handed out the rest of its buffer as samples: here np.empty's memory is NaN, as reused
    memory may be (the voice was then refused at random, or cloned with garbage in it)."""
    cut = (FIXTURES / "reference_en_0.mp3").read_bytes()[:30000]
    with sf.SoundFile(io.BytesIO(cut)) as f:
        claimed, decoded = f.frames, len(f.read(dtype="float32"))
    assert claimed > 2 * decoded
    empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *args, **kwargs: np.full_like(empty(*args, **kwargs), np.nan))
    x, rate = read_audio(cut)
    assert rate == 44100 and x.shape[1] == decoded
    assert np.isfinite(x).all()
    load_audio(cut, 24000)  # a usable voice


def scrambled(data: bytes, at: int, length: int) -> bytes:
    """`data` with `length` bytes from `at` replaced by fixed random ones (a damaged stretch)."""
    noise = np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8).tobytes()
    return data[:at] + noise + data[at + length :]


def test_mp3_files_joined_end_to_end_are_read_to_the_end():
    """mpg123 ends where the first file's LAME header says, so libsndfile read only the first."""
    first, second = encode_audio(sine(24000, 1000.0), 24000, "mp3"), encode_audio(sine(24000, 500.0, 2.0), 24000, "mp3")
    x, rate = read_audio(first + second)
    assert rate == 24000 and abs(x.shape[1] / rate - 3.0) < 0.1
    assert dominant_frequency(x[0, 2000:12000], rate) == pytest.approx(1000, abs=5)
    assert dominant_frequency(x[0, -24000:], rate) == pytest.approx(500, abs=5)
    recorded = (FIXTURES / "reference_en_0.mp3").read_bytes()
    x, rate = read_audio(recorded + recorded)
    assert x.shape[1] / rate > 2 * 6.5


def test_a_damaged_stretch_of_an_mp3_costs_that_stretch_not_the_rest():
    """mpg123 stopped at the first frame it could not parse, without an error: a third of the file."""
    data = (FIXTURES / "reference_en_0.mp3").read_bytes()
    whole = read_audio(data)[0].shape[1]
    x, rate = read_audio(scrambled(data, len(data) // 3, 2000))
    assert whole - 44100 * 0.3 < x.shape[1] <= whole + 4096


def test_a_healthy_mp3_keeps_mpg123s_samples():
    """The check for a short decode sends no healthy file to FFmpeg, whose sample counts differ."""
    path = FIXTURES / "reference_en_0.mp3"
    with sf.SoundFile(path) as f:
        expected = f.read(dtype="float32", always_2d=True).T
    np.testing.assert_array_equal(read_audio(path)[0], expected)


def test_a_damaged_packet_of_a_flac_or_m4a_is_skipped():
    """FFmpeg refused the whole file for one packet it could not decode."""
    flac = encode_audio(sine(24000, seconds=2.0), 24000, "flac")
    x, rate = read_audio(scrambled(flac, len(flac) // 2, 300))
    assert rate == 24000 and 1.5 < x.shape[1] / rate <= 2.0
    m4a = (FIXTURES / "reference_en.m4a").read_bytes()
    x, rate = read_audio(scrambled(m4a, len(m4a) // 3, 2000))
    assert x.shape[1] / rate > 6.0


def test_a_file_whose_packets_mostly_fail_is_refused():
    flac = encode_audio(sine(24000, seconds=2.0), 24000, "flac")
    with pytest.raises(AudioError, match="damaged .* packets do not decode"):
        read_audio(scrambled(flac, 100, len(flac) - 200))


def test_bytes_after_an_mp3_that_are_not_audio_change_nothing():
    """FFmpeg finds false frame headers in random bytes: read again by it, a 2 s tone gained 1,583
    samples of noise peaking at +13 dBFS, and a cut recording was refused; mpg123's reading stands."""
    tone = encode_audio(sine(24000, 440.0, 2.0, amplitude=0.3), 24000, "mp3")
    recorded = (FIXTURES / "reference_en_0.mp3").read_bytes()[:3000]
    for head, seed, size in ((tone, 1, 100_000), (recorded, 2, 50_000)):
        tail = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
        with sf.SoundFile(io.BytesIO(head + tail)) as f:
            mpg123 = f.read(dtype="float32", always_2d=True).T
        np.testing.assert_array_equal(read_audio(head + tail)[0], mpg123)


def test_an_mp3_with_a_mis_encoded_tag_or_a_colon_in_its_name_is_read(tmp_path, monkeypatch):
    """FFmpeg's look at every mp3 raised what read_audio let through: a UTF-8 title in Latin-1 (a
    UnicodeDecodeError), a relative name FFmpeg read as a protocol ("take:" in take:1.mp3)."""
    def syncsafe(n: int) -> bytes:
        return bytes([(n >> 21) & 127, (n >> 14) & 127, (n >> 7) & 127, n & 127])

    title = b"\x03" + "Café".encode("latin-1")  # says UTF-8, is Latin-1, as some taggers write
    frame = b"TIT2" + syncsafe(len(title)) + b"\x00\x00" + title
    audio = encode_audio(sine(24000, seconds=2.0), 24000, "mp3")
    tagged = b"ID3\x04\x00\x00" + syncsafe(len(frame)) + frame + audio
    assert read_audio(tagged)[0].shape == (1, 48000)
    monkeypatch.chdir(tmp_path)
    Path("take:1.mp3").write_bytes(audio)
    assert read_audio("take:1.mp3")[0].shape == (1, 48000)
    Path("take:1.m4a").write_bytes((FIXTURES / "reference_en.m4a").read_bytes())  # FFmpeg's own formats too
    assert read_audio("take:1.m4a")[0].shape[1] == MANIFEST["reference_en.m4a"]["samples_ffmpeg"]
