"""Reference-voice loudness: the MOSS processor scales every reference clip toward -20 dBFS
(by at most +-3 dB) before encoding it, so cloned voices start from comparable levels."""
from __future__ import annotations

import numpy as np


def normalize_loudness(samples: np.ndarray, target_dbfs: float = -20.0, max_gain_db: float = 3.0) -> np.ndarray:
    x = samples.astype(np.float32, copy=False)
    if x.size == 0:
        return x
    current_dbfs = 10.0 * np.log10(float(np.mean(x.astype(np.float64) ** 2)) + 1e-9)
    gain_db = min(max(target_dbfs - current_dbfs, -max_gain_db), max_gain_db)
    return (x * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)
