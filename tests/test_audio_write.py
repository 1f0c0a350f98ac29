"""Whole-file writers: each format reads back; rates a format cannot store; .npy; bad names."""

import io

import av
import numpy as np
import pytest
import soundfile as sf

from mossserve.audio import FORMATS, StreamEncoder, encode_audio, output_rate, read_audio, resample, write_audio
from mossserve.audio.samples import to_s16
from mossserve.errors import AudioError


def tone(rate: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    """A 440 Hz sine with a 3 Hz swell, so that a codec delay has one clear alignment."""
    t = np.arange(round(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    x = np.stack([x * (0.9 ** c) for c in range(channels)])
    return x.astype(np.float32)


def aligned_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int) -> float:
    """Correlation of `decoded` with `reference` after skipping the best lag in [0, max_lag]."""
    n = len(reference)
    decoded = np.pad(decoded, (0, max(0, n + max_lag - len(decoded))))
    scores = [np.dot(reference, decoded[lag : lag + n]) for lag in range(max_lag + 1)]
    lag = int(np.argmax(scores))
    return float(np.corrcoef(reference, decoded[lag : lag + n])[0, 1])


def decode_ffmpeg(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray() for f in container.decode(audio=0)]
        rate = container.streams.audio[0].rate
    return np.concatenate(frames, axis=1), rate


def test_quantization_clips_then_rounds():
    x = np.array([0.49 / 32767, 0.51 / 32767, -0.51 / 32767, 0.5, 1.0, -1.0, 2.0, -3.0, np.nan], np.float32)
    pcm = np.frombuffer(encode_audio(x, 24000, "pcm"), "<i2")
    np.testing.assert_array_equal(pcm, [0, 1, -1, 16384, 32767, -32767, 32767, -32767, 0])


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("format", ["wav", "flac"])
def test_wav_and_flac_are_exact_16_bit(format, channels):
    x = tone(24000, channels=channels)
    data = encode_audio(x, 24000, format)
    y, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    assert rate == 24000
    np.testing.assert_array_equal(y.T, to_s16(x))
    back, _ = read_audio(data)
    assert np.abs(back - x).max() <= 1 / 32767


@pytest.mark.parametrize("format", FORMATS)
def test_no_samples_still_make_a_file_each_reader_opens(format):
    data = encode_audio(np.zeros((1, 0), np.float32), 24000, format)
    if format == "pcm":
        assert data == b""
        return
    if format in ("wav", "flac"):
        decoded, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        assert rate == 24000 and decoded.shape == ((0, 1) if format == "wav" else (1, 1))
    else:  # the encoder pads its one frame; a decoder may keep the padding
        decoded, _ = decode_ffmpeg(data)
        assert decoded.shape[1] >= 1
    assert decoded.size == 0 or np.abs(decoded).max() < 1e-3


def test_pcm_is_raw_interleaved_s16le():
    x = tone(24000, seconds=0.25, channels=2)
    data = encode_audio(x, 24000, "pcm")
    assert len(data) == x.size * 2
    np.testing.assert_array_equal(np.frombuffer(data, "<i2").reshape(-1, 2).T, to_s16(x))


def test_float_wav_keeps_samples_unclipped():
    x = tone(24000) * 3.0
    y, _ = sf.read(io.BytesIO(encode_audio(x, 24000, "wav", wav_float=True)), dtype="float32", always_2d=True)
    np.testing.assert_array_equal(y.T, x)


@pytest.mark.parametrize(
    "format,rate,channels", [("mp3", 24000, 1), ("mp3", 44100, 2), ("opus", 24000, 1), ("opus", 48000, 2)]
)
def test_lossy_formats_read_back(format, rate, channels):
    x = tone(rate, channels=channels)
    data = encode_audio(x, rate, format)
    y, got_rate = read_audio(data)
    assert got_rate == rate and y.shape[0] == channels
    assert y.shape[1] == x.shape[1]  # gapless: a whole file records the codec's delay and padding
    for c in range(channels):
        assert aligned_correlation(x[c], y[c], max_lag=rate // 10) > 0.9


@pytest.mark.parametrize("rate,channels", [(24000, 1), (44100, 2)])
def test_aac_is_adts_that_keeps_its_priming(rate, channels):
    """OpenAI's `aac`: ADTS frames, which every decoder reads as they come. ADTS cannot record the
    encoder's 1024-sample priming or the last frame's padding, so decoders keep both."""
    x = tone(rate, channels=channels)
    data = encode_audio(x, rate, "aac")
    assert data[:2] == b"\xff\xf1"  # an ADTS sync word (MPEG-4, no CRC)
    y, got_rate = decode_ffmpeg(data)
    assert got_rate == rate and y.shape[0] == channels
    assert x.shape[1] + 1024 <= y.shape[1] <= x.shape[1] + 2 * 1024
    for c in range(channels):
        assert aligned_correlation(x[c], y[c, 1024:], max_lag=64) > 0.9


@pytest.mark.parametrize(
    "format,rate,stored", [("opus", 44100, 48000), ("opus", 22050, 24000), ("mp3", 96000, 48000), ("mp3", 20000, 22050)]
)
def test_unsupported_rates_are_resampled_up(format, rate, stored):
    assert output_rate(format, rate) == stored
    x = tone(rate)
    y, got_rate = decode_ffmpeg(encode_audio(x, rate, format))
    expected = stored if format == "mp3" else 48000  # FFmpeg decodes opus at 48 kHz
    assert abs(y.shape[1] / got_rate - 1.0) < 0.03
    assert got_rate == expected
    reference = resample(x[0], rate, got_rate)
    assert aligned_correlation(reference, y[0], max_lag=got_rate // 10) > 0.9


def test_rates_each_format_stores_as_is():
    assert [output_rate("opus", r) for r in (8000, 12000, 16000, 24000, 48000)] == [8000, 12000, 16000, 24000, 48000]
    assert output_rate("mp3", 24000) == 24000 and output_rate("mp3", 44100) == 44100
    assert output_rate("flac", 44100) == 44100 and output_rate("wav", 96000) == 96000


def test_npy_holds_raw_float32_samples(tmp_path):
    mono = tone(24000) * 2.0  # unclipped
    write_audio(tmp_path / "mono.npy", mono, 24000)
    loaded = np.load(tmp_path / "mono.npy")
    assert loaded.dtype == np.float32 and loaded.shape == (24000,)
    np.testing.assert_array_equal(loaded, mono[0])
    stereo = tone(24000, channels=2)
    write_audio(tmp_path / "stereo.npy", stereo, 24000)
    np.testing.assert_array_equal(np.load(tmp_path / "stereo.npy"), stereo)


@pytest.mark.parametrize(
    "name,magic", [("a.wav", b"RIFF"), ("a.flac", b"fLaC"), ("a.mp3", b"ID3"), ("a.ogg", b"OggS"), ("a.opus", b"OggS"),
                   ("a.aac", b"\xff\xf1")]
)
def test_write_audio_takes_the_format_from_the_extension(tmp_path, name, magic):
    write_audio(tmp_path / name, tone(24000, seconds=0.2), 24000)
    data = (tmp_path / name).read_bytes()
    assert data.startswith(magic)
    assert read_audio(data)[0].shape[1] > 0


def test_write_audio_pcm_and_explicit_format(tmp_path):
    x = tone(24000, seconds=0.2)
    write_audio(tmp_path / "a.raw", x, 24000)
    assert (tmp_path / "a.raw").read_bytes() == encode_audio(x, 24000, "pcm")
    write_audio(tmp_path / "a.bin", x, 24000, format="wav")
    assert (tmp_path / "a.bin").read_bytes() == encode_audio(x, 24000, "wav")


def test_unknown_format_names_the_supported_ones(tmp_path):
    with pytest.raises(AudioError, match="unknown audio format 'm4a'.*" + ", ".join(FORMATS)):
        encode_audio(tone(24000), 24000, "m4a")
    with pytest.raises(AudioError, match="extension.*\\.wav"):
        write_audio(tmp_path / "a.xyz", tone(24000), 24000)


def test_lossy_formats_refuse_more_than_two_channels():
    with pytest.raises(AudioError, match="1 or 2 channels"):
        encode_audio(tone(24000, channels=3), 24000, "mp3")


@pytest.mark.parametrize("samples", [0, 1, 500, 1000, 1024])
@pytest.mark.parametrize("rate", [16000, 24000])
def test_a_short_aac_is_one_ffmpeg_recognises(samples, rate):
    """Under three ADTS frames FFmpeg's probe often took the stream for another format and refused
    it (a constant 1,000 samples at 16 kHz; 0.3 of DC at 24 kHz); it is padded with silence to three."""
    for x in (np.full(samples, 0.3, np.float32), tone(rate, seconds=samples / rate)[0]):
        data = encode_audio(x, rate, "aac")
        with av.open(io.BytesIO(data)) as container:
            decoded = sum(f.samples for f in container.decode(audio=0))
        assert decoded >= 1025 + 1024  # the padded samples and the encoder's priming
        assert read_audio(data)[0].shape[1] == decoded
        streamed = StreamEncoder("aac", rate)
        assert streamed.write(x) + streamed.close() == data


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8])
def test_integer_pcm_is_scaled_not_clipped(dtype):
    """int16 (what most audio libraries read) taken as floats was 99.98% full-scale noise."""
    x = tone(24000)[0]
    info = np.iinfo(dtype)
    middle = (int(info.max) + 1) // 2 if info.min == 0 else 0
    pcm = np.round(x * (int(info.max) - middle) + middle).astype(dtype)
    back, _ = sf.read(io.BytesIO(encode_audio(pcm, 24000, "wav")), dtype="float32")
    np.testing.assert_allclose(back, x, atol=1.5 / (int(info.max) - middle) + 1 / 32767)


@pytest.mark.parametrize("format", ["wav", "flac", "pcm"])
def test_int16_pcm_comes_back_bit_for_bit(format):
    pcm = np.array([0, 1, -1, 16385, 32767, -32767, -12345], np.int16)
    data = encode_audio(pcm, 24000, format)
    back = np.frombuffer(data, "<i2") if format == "pcm" else sf.read(io.BytesIO(data), dtype="int16")[0]
    np.testing.assert_array_equal(back, pcm)


def test_a_whole_number_rate_given_as_a_float_is_taken():
    data = encode_audio(tone(24000), 24000.0, "wav")
    assert sf.info(io.BytesIO(data)).samplerate == 24000


@pytest.mark.parametrize("samples, rate, message", [
    (np.zeros((24000, 2), np.float32), 24000, r"got shape \(24000, 2\): 24000 channels; transpose"),
    (np.zeros(10, np.float32), 24000.5, "sample_rate must be a positive whole number of Hz, got 24000.5"),
    (np.zeros(10, np.float32), 0, "sample_rate must be a positive whole number"),
    (np.zeros(10, bool), 24000, "audio samples must be floats"),
    (np.array([0, 100, -100]), 24000, "got dtype int64"),  # no PCM is int64: as int16 values they were near silence
])
def test_samples_or_rates_it_cannot_write_are_named(samples, rate, message):
    """soundfile's own layout (n, channels) failed deep in libsndfile as 24000 channels."""
    with pytest.raises(AudioError, match=message):
        encode_audio(samples, rate, "wav")
