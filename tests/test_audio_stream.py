"""Streaming writers: any chunk sizes, bytes before the end, and the concatenation is one valid file."""

import io
import wave

import av
import numpy as np
import pytest
import soundfile as sf

from mossserve.audio import StreamEncoder, encode_audio, read_audio
from mossserve.audio.samples import to_s16
from mossserve.errors import AudioError

# 1-sample chunks up to chunks of a second, and sizes that straddle codec frames (480, 576, 1152)
SIZES = [1, 1, 2, 3, 5, 8, 13, 479, 480, 481, 575, 1153, 24000, 7, 4410]


def tone(rate: int, seconds: float = 1.5, channels: int = 1) -> np.ndarray:
    """A 440 Hz sine with a 3 Hz swell, so that a codec delay has one clear alignment."""
    t = np.arange(round(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return np.stack([x * (0.9 ** c) for c in range(channels)]).astype(np.float32)


def stream(format: str, x: np.ndarray, rate: int) -> list[bytes]:
    """Every write()'s bytes, then close()'s; mono input is passed as (n,) to cover that shape."""
    encoder = StreamEncoder(format, rate, channels=x.shape[0])
    parts, start, i = [], 0, 0
    while start < x.shape[1]:
        chunk = x[:, start : start + SIZES[i % len(SIZES)]]
        parts.append(encoder.write(chunk[0] if x.shape[0] == 1 else chunk))
        start += chunk.shape[1]
        i += 1
    return parts + [encoder.close()]


def aligned_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int) -> float:
    n = len(reference)
    decoded = np.pad(decoded, (0, max(0, n + max_lag - len(decoded))))
    lag = int(np.argmax([np.dot(reference, decoded[lag : lag + n]) for lag in range(max_lag + 1)]))
    return float(np.corrcoef(reference, decoded[lag : lag + n])[0, 1])


def decode_ffmpeg(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="fltp")
        frames = [o.to_ndarray() for f in container.decode(audio=0) for o in resampler.resample(f)]
        return np.concatenate(frames, axis=1), container.streams.audio[0].rate


@pytest.mark.parametrize("channels", [1, 2])
def test_streamed_wav_is_the_whole_file_for_every_reader(channels):
    x = tone(24000, channels=channels)
    parts = stream("wav", x, 24000)
    assert parts[0].startswith(b"RIFF") and all(parts[:-1])
    data = b"".join(parts)
    whole, _ = sf.read(io.BytesIO(encode_audio(x, 24000, "wav")), dtype="int16", always_2d=True)
    np.testing.assert_array_equal(whole.T, to_s16(x))

    by_soundfile, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    assert rate == 24000
    np.testing.assert_array_equal(by_soundfile, whole)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, channels, 2)
        by_wave = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, channels)
    np.testing.assert_array_equal(by_wave, whole)
    by_ffmpeg, rate = decode_ffmpeg(data)
    assert rate == 24000
    np.testing.assert_array_equal(np.round(by_ffmpeg * 32768).astype(np.int16), whole.T)


def test_wav_stream_with_no_audio_is_a_valid_empty_file():
    encoder = StreamEncoder("wav", 24000)
    data = encoder.close()
    assert sf.read(io.BytesIO(data))[0].shape == (0,)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("format", ["flac", "mp3", "opus", "aac"])
def test_compressed_stream_with_no_audio_opens_as_silence(format, channels):
    encoder = StreamEncoder(format, 24000, channels)
    data = encoder.write(np.zeros((channels, 0), np.float32)) + encoder.close()
    decoded, _ = decode_ffmpeg(data)
    assert decoded.shape[0] == channels and decoded.shape[1] >= 1
    assert np.abs(decoded).max() < 1e-3


def test_streamed_pcm_is_the_whole_pcm():
    x = tone(24000, channels=2)
    assert b"".join(stream("pcm", x, 24000)) == encode_audio(x, 24000, "pcm")


def test_streamed_flac_is_lossless():
    x = tone(24000)
    parts = stream("flac", x, 24000)
    assert sum(map(len, parts[:-1])) > len(parts[-1])  # frames leave as they complete
    y, rate = read_audio(b"".join(parts))  # unknown length in STREAMINFO: read by FFmpeg
    assert rate == 24000
    np.testing.assert_array_equal(np.round(y * 32768).astype(np.int16), to_s16(x))


@pytest.mark.parametrize("rate,channels", [(24000, 1), (44100, 2)])
def test_streamed_mp3_is_a_valid_file(rate, channels):
    x = tone(rate, channels=channels)
    parts = stream("mp3", x, rate)
    assert sum(map(len, parts[:-1])) > 4 * len(parts[-1])
    data = b"".join(parts)
    frame = 576 if rate <= 24000 else 1152
    for y, got_rate in (sf.read(io.BytesIO(data), dtype="float32", always_2d=True), decode_ffmpeg(data)):
        y = y if y.shape[0] == channels else y.T
        assert got_rate == rate and y.shape[0] == channels
        # without a seekable output there is no gapless header: decoders keep delay and padding
        assert x.shape[1] <= y.shape[1] <= x.shape[1] + 3 * frame
        for c in range(channels):
            assert aligned_correlation(x[c], y[c], max_lag=3 * frame) > 0.9


def test_streamed_aac_is_the_whole_file():
    """ADTS has no header to patch at the end: the streamed bytes are the whole file's."""
    x = tone(24000, channels=2)
    parts = stream("aac", x, 24000)
    assert sum(map(len, parts[:-1])) > 4 * len(parts[-1])
    assert b"".join(parts) == encode_audio(x, 24000, "aac")


@pytest.mark.parametrize("rate,channels", [(24000, 1), (24000, 2), (44100, 1)])
def test_streamed_opus_is_a_valid_file(rate, channels):
    x = tone(rate, channels=channels)
    encoder_rate = StreamEncoder("opus", rate).sample_rate
    assert encoder_rate == (48000 if rate == 44100 else rate)
    parts = stream("opus", x, rate)
    assert b"".join(parts).startswith(b"OggS")
    assert sum(map(len, parts[:-1])) > 4 * len(parts[-1])
    y, got_rate = decode_ffmpeg(b"".join(parts))
    assert got_rate == 48000 and y.shape[0] == channels
    # ogg granule positions trim the encoder delay and padding: the exact duration, up to rounding
    assert abs(y.shape[1] / 48000 - x.shape[1] / rate) < 1e-3
    if rate == 24000:
        by_soundfile, sf_rate = sf.read(io.BytesIO(b"".join(parts)), dtype="float32", always_2d=True)
        assert sf_rate == 24000 and by_soundfile.shape == (x.shape[1], channels)
        for c in range(channels):
            assert aligned_correlation(x[c], by_soundfile[:, c], max_lag=480) > 0.9


# the share of 1 s of writes that the bytes already sent decode to (FFmpeg's count: mp3 includes
# its leading encoder delay, opus has its pre-skip removed)
SENT_BEFORE_CLOSE = {"wav": 1.0, "pcm": 1.0, "flac": 0.9, "mp3": 0.9, "opus": 0.97, "aac": 0.9}


@pytest.mark.parametrize("format", list(SENT_BEFORE_CLOSE))
def test_what_was_written_is_sent_without_waiting_for_close(format):
    x = tone(24000, seconds=1.0)
    encoder = StreamEncoder(format, 24000)
    sent = b"".join(encoder.write(x[0, i : i + 2400]) for i in range(0, 24000, 2400))
    if format == "pcm":
        heard = len(sent) // 2
    else:
        y, rate = decode_ffmpeg(sent)
        heard = y.shape[1] * 24000 // rate
    assert heard >= SENT_BEFORE_CLOSE[format] * 24000
    encoder.close()


def test_a_streamed_flacs_first_small_chunk_is_audio_not_only_its_header():
    """Two Fish frames (4096 samples at 44.1 kHz) sent only the header: FFmpeg's 4608-sample block held them."""
    encoder = StreamEncoder("flac", 44100)
    assert not encoder.audio_out
    sent = encoder.write(tone(44100)[0, :4096])
    assert encoder.audio_out and decode_ffmpeg(sent)[0].shape[1] >= 3 * 1152
    encoder.close()


def test_an_ogg_page_held_back_is_not_audio_out():
    """ogg keeps its newest page back: a first 20 ms chunk sends only the two header pages, though the
    muxer has its packet (audio_out counted packets and said True)."""
    encoder = StreamEncoder("opus", 24000)
    first = encoder.write(tone(24000)[0, :480])
    assert first and not encoder.audio_out
    encoder.write(tone(24000)[0, 480:2400])
    assert encoder.audio_out
    encoder.close()


def test_unknown_stream_format_names_the_supported_ones():
    with pytest.raises(AudioError, match="unknown audio format 'm4a'.*wav, pcm, flac, mp3, opus, aac"):
        StreamEncoder("m4a", 24000)


def test_chunk_with_the_wrong_channel_count_is_a_bug():
    with pytest.raises(ValueError, match="2-channel"):
        StreamEncoder("wav", 24000, channels=2).write(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="2-channel"):
        StreamEncoder("opus", 24000, channels=2).write(np.zeros((1, 100), np.float32))
