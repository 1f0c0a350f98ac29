"""Audio a model can use: decoded, checked, mapped to the model's channels and rate."""

import numpy as np

from mossserve.audio.read import AudioSource, read_audio
from mossserve.audio.resampler import resample
from mossserve.errors import AudioError


def load_audio(
    source: AudioSource,
    sample_rate: int,
    channels: int = 1,
    max_seconds: float | None = None,
    min_peak: float | None = 1e-3,
) -> np.ndarray:
    """float32 `(channels, n)` at `sample_rate`, or an AudioError a user can act on.

    Stereo → mono averages the channels; mono → stereo duplicates. Refused: undecodable data,
    no samples, NaN/inf samples, more than `max_seconds`, and silence: a peak below `min_peak`
    (default 1e-3, -60 dBFS, for a voice; 0 accepts any non-zero audio, None silence too).
    """
    x, rate = read_audio(source, max_seconds=max_seconds, channels=channels)
    if x.shape[1] == 0:
        raise AudioError("audio contains no samples")
    if not np.isfinite(x).all():
        raise AudioError("audio contains invalid samples (NaN or infinity)")
    x = resample(x, rate, sample_rate)
    peak = float(np.abs(x).max(initial=0.0))
    if min_peak is not None and (peak == 0.0 or peak < min_peak):
        raise AudioError(f"audio is silent (peak level {peak:.2g}, needs at least {min_peak:g})")
    return x

