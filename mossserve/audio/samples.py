"""Sample layout and quantization shared by every writer."""

import numpy as np

from mossserve.errors import AudioError

MAX_CHANNELS = 64  # more "channels" than this is a (n, channels) array the wrong way round


def as_channels_first(samples: np.ndarray) -> np.ndarray:
    """float32 `(channels, n)` from `(n,)` (mono) or `(channels, n)`. Integer PCM (int16, as most
    audio libraries read it; int8/16/32, uint8) is scaled by its largest value, the scale `to_s16`
    writes with, so int16 comes back bit for bit (as floats its samples were clipped to full scale)."""
    x = np.asarray(samples)
    if x.dtype.kind in "iu" and x.dtype.itemsize <= 4 and x.dtype not in (np.uint16, np.uint32):
        info = np.iinfo(x.dtype)
        middle = (int(info.max) + 1) / 2 if x.dtype.kind == "u" else 0.0
        x = (x.astype(np.float64) - middle) / (int(info.max) - middle)
    elif x.dtype.kind != "f":
        raise AudioError(f"audio samples must be floats in [-1, 1] or integer PCM (int8, int16, int32, uint8), "
                         f"got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if x.ndim == 1:
        return x[None]
    if x.ndim != 2:
        raise AudioError(f"audio samples must be (n,) or (channels, n), got shape {x.shape}")
    if x.shape[0] > MAX_CHANNELS:
        raise AudioError(f"audio samples must be (n,) or (channels, n), got shape {x.shape}: {x.shape[0]} "
                         "channels; transpose a (n, channels) array")
    return x


def clip(samples: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1]; NaN becomes 0, so a bad chunk cannot reach an encoder as garbage."""
    return np.clip(np.nan_to_num(samples, nan=0.0), -1.0, 1.0)


def to_s16(samples: np.ndarray) -> np.ndarray:
    """int16 of the same shape: clip, then round (not truncate) to the 16-bit grid.

    The scale is 32767, so +1 and -1 both map exactly and the grid is symmetric.
    """
    return np.round(clip(samples) * 32767.0).astype(np.int16)
