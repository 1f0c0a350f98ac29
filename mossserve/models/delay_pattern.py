"""The delay pattern: codebook c of frame t sits in row t + c. Offline helpers (numpy)."""
from __future__ import annotations

import numpy as np


def delay_pattern(codes: np.ndarray, pad_code: int) -> np.ndarray:
    """(T, n) codes -> (T + n - 1, n): codebook c shifted down by c rows, pad elsewhere."""
    frames, n = codes.shape
    out = np.full((frames + n - 1, n), pad_code, dtype=np.int64)
    out[np.arange(frames)[:, None] + np.arange(n), np.arange(n)] = codes
    return out


def dedelay(audio_rows: np.ndarray) -> np.ndarray:
    """(L, n) delayed rows -> (L - n + 1, n) frames, out[t, c] = in[t + c, c]; no frame if L < n."""
    length, n = audio_rows.shape
    frames = max(length - n + 1, 0)
    t = np.arange(frames)[:, None] + np.arange(n)[None, :]
    return audio_rows[t, np.arange(n)[None, :]]


def segments(frames: np.ndarray, pad_code: int) -> list[np.ndarray]:
    """Contiguous runs of frames that are not entirely pad: what the reference decodes, one clip each."""
    keep = np.concatenate([[False], ~(frames == pad_code).all(axis=1), [False]])
    edges = np.flatnonzero(np.diff(keep.astype(np.int8)))
    return [frames[start:end] for start, end in zip(edges[0::2], edges[1::2])]


def split_segments(frames: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    return np.split(frames, np.cumsum(lengths)[:-1]) if lengths else []
