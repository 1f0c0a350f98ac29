"""Speech played faster or slower at the same pitch: OpenAI's `speed`, chunk by chunk.

The models speak at their own pace, so `speed` changes the audio after it is decoded, with FFmpeg's
`atempo` filter (WSOLA: overlapping windows moved in time, so the voice keeps its pitch). One
atempo takes factors from 0.5 up; slower speeds chain two. The filter holds back about one window
(tens of ms) between writes, which `close` hands out; a stream's first audio comes with its first
chunk, as at speed 1.
"""
from __future__ import annotations

import math

import av
import numpy as np
from av.filter import Graph

from mossserve.audio.samples import as_channels_first
from mossserve.errors import AudioError

SPEEDS = (0.25, 4.0)  # OpenAI's range
_LAYOUTS = {1: "mono", 2: "stereo"}
# atempo gives out for each frame pushed about what the frame before it held, so a chunk is pushed in
# small frames: what a write holds back is then one of them and the filter's window, not the chunk
# (under a frame's remainder waits for the next write).
_FRAME_SAMPLES = 512


def atempo_factors(speed: float) -> list[float]:
    """Factors whose product is `speed`, each one atempo takes (>= 0.5)."""
    if not SPEEDS[0] <= speed <= SPEEDS[1]:
        raise AudioError(f"speed must lie in {SPEEDS[0]}..{SPEEDS[1]}, got {speed}")
    if speed >= 0.5:
        return [speed]
    return [math.sqrt(speed)] * 2


class TempoChange:
    """`write` float32 `(channels, n)` chunks at `sample_rate`; get back the audio played `speed` times
    as fast; the concatenation of every write and `close` is the whole stretched audio."""

    def __init__(self, speed: float, sample_rate: int, channels: int):
        if channels not in _LAYOUTS:
            raise AudioError(f"speed supports 1 or 2 channels, not {channels}")
        self.channels, self.sample_rate, self.speed = channels, sample_rate, speed
        self._given = self._given_out = 0  # samples written in, and handed out
        self._pending = np.zeros((channels, 0), np.float32)  # less than a frame, kept for the next write
        self._graph = Graph()
        source = self._graph.add_abuffer(format="fltp", sample_rate=sample_rate, layout=_LAYOUTS[channels],
                                         time_base=f"1/{sample_rate}")
        chain = [source] + [self._graph.add("atempo", f"{factor:.6f}") for factor in atempo_factors(speed)]
        chain += [self._graph.add("aformat", "sample_fmts=fltp"), self._graph.add("abuffersink")]
        for upstream, downstream in zip(chain, chain[1:]):
            upstream.link_to(downstream)
        self._graph.configure()
        self._pts = 0

    def write(self, chunk: np.ndarray) -> np.ndarray:
        x = as_channels_first(chunk)
        if x.shape[0] != self.channels:
            raise ValueError(f"expected {self.channels}-channel audio, got shape {x.shape}")
        self._given += x.shape[1]
        x = np.concatenate([self._pending, x], axis=1)
        whole = x.shape[1] - x.shape[1] % _FRAME_SAMPLES
        self._push(x[:, :whole])
        self._pending = x[:, whole:]
        out = self._drain()
        self._given_out += out.shape[1]
        return out

    def close(self) -> np.ndarray:
        """The rest: the filter is flushed through a little silence (what it holds back is a window,
        which a clip shorter than one would lose whole) and the audio cut at its stretched length."""
        silence = np.zeros((self.channels, self.sample_rate // 5), np.float32)
        self._push(np.concatenate([self._pending, silence], axis=1))
        self._graph.push(None)
        rest = max(round(self._given / self.speed) - self._given_out, 0)
        return self._drain()[:, :rest]

    def _push(self, x: np.ndarray) -> None:
        """Frames of _FRAME_SAMPLES, the remainder joined to the last: atempo answers a frame with the
        one before it, and fails on a frame it would stretch to no sample (one sample at speed 4)."""
        for piece in np.split(x, range(_FRAME_SAMPLES, x.shape[1] - _FRAME_SAMPLES + 1, _FRAME_SAMPLES), axis=1):
            if not piece.shape[1]:
                continue
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="fltp", layout=_LAYOUTS[self.channels])
            frame.sample_rate, frame.pts = self.sample_rate, self._pts
            self._pts += piece.shape[1]
            self._graph.push(frame)

    def _drain(self) -> np.ndarray:
        pieces = [np.zeros((self.channels, 0), np.float32)]
        while True:
            try:
                pieces.append(self._graph.pull().to_ndarray())
            except (av.BlockingIOError, av.EOFError):
                return np.concatenate(pieces, axis=1).astype(np.float32, copy=False)


def change_tempo(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Whole audio `(channels, n)` played `speed` times as fast (unchanged at 1.0)."""
    x = as_channels_first(samples)
    if speed == 1.0:
        return x
    tempo = TempoChange(speed, sample_rate, x.shape[0])
    return np.concatenate([tempo.write(x), tempo.close()], axis=1)
