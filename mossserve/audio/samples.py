"""Sample layout and quantization shared by every writer."""

import numpy as np


def as_channels_first(samples: np.ndarray) -> np.ndarray:
    """float32 `(channels, n)` from `(n,)` (mono) or `(channels, n)`."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        return x[None]
    if x.ndim != 2:
        raise ValueError(f"audio samples must be (n,) or (channels, n), got shape {x.shape}")
    return x


def clip(samples: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1]; NaN becomes 0, so a bad chunk cannot reach an encoder as garbage."""
    return np.clip(np.nan_to_num(samples, nan=0.0), -1.0, 1.0)


def to_s16(samples: np.ndarray) -> np.ndarray:
    """int16 of the same shape: clip, then round (not truncate) to the 16-bit grid.

    The scale is 32767, so +1 and -1 both map exactly and the grid is symmetric.
    """
    return np.round(clip(samples) * 32767.0).astype(np.int16)
