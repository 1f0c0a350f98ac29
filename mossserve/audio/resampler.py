"""Sample-rate conversion with soxr: the recipe the codec fixtures were made with."""

import numpy as np
import soxr


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 `(channels, n)` or `(n,)` at `to_rate`; soxr "HQ" on float64, as the codec fixtures."""
    if from_rate == to_rate:
        return np.asarray(samples, dtype=np.float32)
    x = np.asarray(samples, dtype=np.float64)
    y = soxr.resample(x.T, from_rate, to_rate, quality="HQ")  # soxr wants (n, channels)
    return np.ascontiguousarray(y.T, dtype=np.float32)


class StreamResampler:
    """Chunk-by-chunk resampling for the streaming writers; keeps the filter state between chunks."""

    def __init__(self, from_rate: int, to_rate: int, channels: int):
        self._soxr = soxr.ResampleStream(from_rate, to_rate, channels, dtype="float64", quality="HQ")

    def __call__(self, chunk: np.ndarray, last: bool = False) -> np.ndarray:
        """`(channels, n)` in, `(channels, m)` out; `last=True` flushes the filter's tail."""
        y = self._soxr.resample_chunk(np.ascontiguousarray(chunk.T, dtype=np.float64), last=last)
        return np.ascontiguousarray(y.T, dtype=np.float32)
