"""`speed`: audio played faster or slower at the same pitch, the same whole or in chunks."""
from __future__ import annotations

import numpy as np
import pytest

from mossserve.audio.tempo import TempoChange, atempo_factors, change_tempo
from mossserve.errors import AudioError

RATE = 24000


def tone(hz: float, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[None]


def pitch(samples: np.ndarray) -> float:
    """The strongest frequency of the middle second (the ends hold the filter's ramps)."""
    middle = samples[0, len(samples[0]) // 2 - RATE // 2: len(samples[0]) // 2 + RATE // 2]
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    return float(np.fft.rfftfreq(len(middle), 1 / RATE)[spectrum.argmax()])


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.25, 2.0, 4.0])
def test_length_scales_and_pitch_stays(speed) -> None:
    x = tone(440.0, seconds=8.0)
    y = change_tempo(x, RATE, speed)
    assert y.dtype == np.float32 and y.shape[0] == 1
    assert y.shape[1] == round(x.shape[1] / speed)
    assert pitch(y) == pytest.approx(440.0, abs=2.0)  # a resampler would give 440 * speed


def test_chunks_give_the_whole_result_and_stereo_keeps_its_channels() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([tone(300.0)[0], 0.3 * rng.standard_normal(2 * RATE).astype(np.float32)])
    whole = change_tempo(x, RATE, 1.5)
    tempo = TempoChange(1.5, RATE, channels=2)
    pieces = [tempo.write(piece) for piece in np.array_split(x, [1, 480, 500, 9000, 9001], axis=1)]
    chunked = np.concatenate(pieces + [tempo.close()], axis=1)
    assert whole.shape[0] == 2
    np.testing.assert_array_equal(chunked, whole)
    assert pitch(whole[:1]) == pytest.approx(300.0, abs=2.0)


@pytest.mark.parametrize("speed", [0.5, 0.8, 1.5, 2.0])
def test_a_chunk_gives_its_own_audio_at_once(speed) -> None:
    """Each write returns most of its own chunk stretched: a stream's first audio comes with its first
    chunk (atempo answers a pushed frame with the frame before it, so a chunk pushed whole came out a
    chunk late: time to first audio moved to the second chunk)."""
    tempo = TempoChange(speed, RATE, 1)
    chunk = tone(300.0, seconds=0.08)  # one MOSS frame, 1920 samples
    first = tempo.write(chunk)
    assert first.shape[1] >= 0.2 * chunk.shape[1] / speed  # less its filter window (tens of ms)


@pytest.mark.parametrize("samples", [1, 100, 960, 1920])
def test_a_clip_shorter_than_the_filter_window_is_stretched_too(samples) -> None:
    """atempo holds a window back until the end; a clip shorter than it came back empty (one frame of
    audio at speed 4 was no audio)."""
    x = tone(300.0, seconds=samples / RATE)
    for speed in (0.25, 0.5, 1.5, 4.0):
        y = change_tempo(x, RATE, speed)
        assert y.shape[1] == round(samples / speed)
        if samples >= 960:
            assert np.abs(y).max() > 0.1  # the tone, not the padding's silence


def test_speed_one_is_the_audio_itself_and_out_of_range_is_refused() -> None:
    x = tone(200.0)
    assert change_tempo(x, RATE, 1.0) is not None and np.array_equal(change_tempo(x, RATE, 1.0), x)
    assert np.prod(atempo_factors(0.3)) == pytest.approx(0.3) and min(atempo_factors(0.3)) >= 0.5
    for speed in (0.2, 4.5, float("nan")):
        with pytest.raises(AudioError, match="speed must lie in 0.25..4.0"):
            TempoChange(speed, RATE, 1)
    with pytest.raises(AudioError, match="1 or 2 channels"):
        TempoChange(2.0, RATE, 3)
