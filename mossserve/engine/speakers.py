"""Speaker cache: reference audio -> codec codes, computed once per distinct file content.

Servers see the same few voices over and over, often under different file names and often many
requests at once. Keying by the sha256 of the file's bytes (and the quantizer count) makes a
repeated voice free; requests for a voice already being encoded share that one encode; and cold
voices that arrive together are encoded together, in `codec.encode_batch` calls of up to about a
minute of padded audio, by a worker thread.

    cache = SpeakerCache(codec, n_quantizers=32)
    codes = cache.encode("me.wav")                       # (frames, 32) int64, read-only
    codes = await asyncio.wrap_future(cache.request(b"...wav bytes..."))
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from ..audio import load_audio
from ..audio.loudness import normalize_loudness
from ..errors import AudioError, EngineClosedError
from ..openmp import release_openmp_pool
from .worker import Worker

VoiceSource = str | PathLike | bytes | bytearray | memoryview
Key = tuple[str, int]  # (sha256 of the file's bytes, n_quantizers)
# A round's encode_batch pads every clip to the longest and runs them at once: clips x longest is what the
# codec holds on the device, so a round stops taking queued voices there (the first always goes).
MAX_ROUND_SECONDS = 60.0


@dataclass
class _Job:
    key: Key
    data: bytes
    label: str  # names the file in error messages
    future: Future
    samples: np.ndarray | None = None  # decoded, when a round left it for the next


class SpeakerCache:
    """Thread-safe LRU of voice codes with shared in-flight encodes and batched cold encodes.

    `request()` may be called from any thread (and from asyncio via `asyncio.wrap_future`).
    With `start_worker=False` nothing is encoded until `run_pending()` is called, which makes
    the batching deterministic for tests and lets a caller drive encodes from its own loop.
    """

    def __init__(self, codec, n_quantizers: int, max_entries: int = 256, start_worker: bool = True,
                 max_seconds: float | None = None, normalize_loudness: bool = True) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if not 1 <= n_quantizers <= codec.num_quantizers:
            raise ValueError(f"n_quantizers must be in 1..{codec.num_quantizers}, got {n_quantizers}")
        self.codec = codec
        self.n_quantizers = n_quantizers
        self.max_entries = max_entries
        self.max_seconds = max_seconds  # passed to load_audio: longer references are refused
        self.normalize_loudness = normalize_loudness  # the MOSS processors' -20 dBFS; Fish's reference has none
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._inflight: dict[Key, Future] = {}  # queued or being encoded
        self._pending: list[_Job] = []  # queued, not yet taken by a round
        self._cond = threading.Condition()
        self._closed = False
        self._hits = self._misses = self._encodes = self._batches = 0
        self._worker = Worker("mossserve-speakers", self._cond, self._has_pending, self.run_pending, self._round_failed)
        if start_worker:
            self._worker.start()

    # ---- public -------------------------------------------------------------------------------
    def request(self, source: VoiceSource) -> Future:
        """A future of the codes (frames, n_quantizers): already done on a hit, else shared with
        every other request for the same content until its encode finishes. Unreadable input
        gives a failed future (AudioError), not an exception here. A path is read and hashed on
        the calling thread (the key needs the content); decoding and encoding happen in a round."""
        try:
            data, label = _read(source)
        except AudioError as e:
            return _failed(e)
        digest = hashlib.sha256(data).hexdigest()
        key = (digest, self.n_quantizers)
        label = label or f"voice audio (sha256 {digest[:12]})"
        with self._cond:
            if self._closed:
                raise EngineClosedError("the speaker cache is closed")
            codes = self._entries.get(key)
            if codes is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return _done(codes.view())
            future = self._inflight.get(key)
            if future is not None:  # joins the encode already queued or running
                self._hits += 1
                return future
            self._misses += 1
            future = Future()
            # RUNNING from the start so that no caller can cancel an encode others share
            # (asyncio.wrap_future cancels its source future when the awaiting task is cancelled).
            future.set_running_or_notify_cancel()
            self._inflight[key] = future
            self._pending.append(_Job(key, data, label, future))
            self._cond.notify()
        return future

    def encode(self, source: VoiceSource) -> np.ndarray:
        """Blocking `request`; raises the request's error."""
        return self.request(source).result()

    def run_pending(self) -> int:
        """One round: take queued voices in order, decoding each, until they make MAX_ROUND_SECONDS of
        padded audio, encode them in one batch and resolve their futures; the rest wait for the next
        round. Returns how many clips were encoded."""
        jobs: list[_Job] = []
        try:
            return self._run(self._take(jobs))
        except BaseException as e:  # never leave a waiter hanging
            for job in jobs:
                if not job.future.done():
                    self._finish(job, error=e)
            raise
        finally:
            # An idle OpenMP pool on this thread would slow every step of the talker's (mossserve/openmp.py).
            release_openmp_pool()

    def stats(self) -> dict[str, int]:
        """hits: requests served without a new encode (cached, or joined one in flight);
        misses: requests that queued an encode; encodes: clips encoded; batches: encode_batch calls."""
        with self._cond:
            return {"entries": len(self._entries), "hits": self._hits, "misses": self._misses,
                    "encodes": self._encodes, "batches": self._batches}

    def wait_idle(self) -> None:
        """Block until no voice is being encoded or waiting to be."""
        self._worker.wait_idle()

    def close(self) -> None:
        """Stop the worker after its current round; voices still queued fail with EngineClosedError."""
        with self._cond:
            self._closed = True
            jobs, self._pending = self._pending, []
            self._cond.notify_all()
        self._worker.stop()
        for job in jobs:
            self._finish(job, error=EngineClosedError("the speaker cache closed before the voice was encoded"))

    # ---- internals ----------------------------------------------------------------------------
    def _has_pending(self) -> bool:
        return bool(self._pending) and not self._closed

    def _round_failed(self, error: Exception) -> None:
        """Nothing to do: `run_pending` has already handed the error to that round's futures."""

    def _take(self, taken: list[_Job]) -> list[tuple[_Job, np.ndarray]]:
        """Queued voices, each decoded as it is taken (a bad file fails alone and early), up to
        MAX_ROUND_SECONDS of padded audio; `taken` gets every job taken, for the caller's clean-up."""
        ready: list[tuple[_Job, np.ndarray]] = []
        longest, cap = 0, MAX_ROUND_SECONDS * self.codec.sample_rate
        while True:
            with self._cond:
                if not self._pending:
                    break
                job = self._pending.pop(0)
            taken.append(job)
            try:
                samples = job.samples if job.samples is not None else self._prepare(job)
            except Exception as e:  # noqa: BLE001 - reported to that request only
                self._finish(job, error=e)
                continue
            if ready and (len(ready) + 1) * max(longest, samples.shape[-1]) > cap:  # first in the next round
                job.samples = samples
                taken.pop()
                with self._cond:
                    self._pending.insert(0, job)
                break
            ready.append((job, samples))
            longest = max(longest, samples.shape[-1])
        return ready

    def _run(self, ready: list[tuple[_Job, np.ndarray]]) -> int:
        if not ready:
            return 0
        try:
            results: list[np.ndarray | Exception] = self._encode([samples for _, samples in ready])
        except Exception as e:  # noqa: BLE001 - retried clip by clip below
            if len(ready) == 1:
                results = [e]
            else:  # isolate the clip that broke the batch
                results = [self._encode_one(samples) for _, samples in ready]
        encoded = 0
        for (job, _), result in zip(ready, results):
            if isinstance(result, Exception):
                self._finish(job, error=result)
            else:
                self._finish(job, codes=result)
                encoded += 1
        return encoded

    def _prepare(self, job: _Job) -> np.ndarray:
        """The file's samples as the model's processor prepares a reference: codec rate and channels,
        and for the MOSS models loudness toward -20 dBFS."""
        codec = self.codec
        try:
            samples = load_audio(job.data, codec.sample_rate, channels=codec.channels, max_seconds=self.max_seconds)
        except AudioError as e:
            raise AudioError(f"{job.label}: {e}") from None
        if samples.shape[-1] < codec.samples_per_frame:
            raise AudioError(f"{job.label}: audio is shorter than one codec frame "
                             f"({codec.samples_per_frame / codec.sample_rate * 1000:g} ms)")
        return normalize_loudness(samples) if self.normalize_loudness else samples

    def _encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """One encode_batch call -> each clip's valid frames, int64 (frames, n_quantizers)."""
        with self._cond:
            self._batches += 1
        codec = self.codec
        with torch.inference_mode():
            out = codec.encode_batch([torch.from_numpy(c).to(codec.device) for c in clips],
                                     n_quantizers=self.n_quantizers)
            codes, lengths = out.codes.cpu(), out.lengths.cpu().tolist()
        return [codes[:, i, :n].T.numpy().astype(np.int64, order="C") for i, n in enumerate(lengths)]

    def _encode_one(self, clip: np.ndarray) -> np.ndarray | Exception:
        try:
            return self._encode([clip])[0]
        except Exception as e:  # noqa: BLE001 - reported to that request only
            return e

    def _finish(self, job: _Job, codes: np.ndarray | None = None, error: BaseException | None = None) -> None:
        """Store (on success) and resolve; failures are not cached, so a retry encodes again."""
        with self._cond:
            self._inflight.pop(job.key, None)
            if codes is not None:
                codes.flags.writeable = False
                self._entries[job.key] = codes
                self._entries.move_to_end(job.key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
                self._encodes += 1
        if codes is not None:
            job.future.set_result(codes.view())  # a view of a read-only owner cannot be made writable
        else:
            job.future.set_exception(error)


def _read(source: VoiceSource) -> tuple[bytes, str]:
    """The bytes to hash and decode, and a label naming the file for error messages
    ("" for raw bytes: the caller names them by their hash)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), ""
    elif isinstance(source, (str, PathLike)):
        label = f"voice file {str(source)!r}"
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise AudioError(f"{label}: file not found") from None
        except OSError as e:
            raise AudioError(f"{label}: cannot read it ({e.strerror or e})") from None
    else:
        raise TypeError(f"a voice is a path or the file's bytes, not {type(source).__name__}")
    if not data:
        raise AudioError(f"{label or 'voice audio'}: file is empty (0 bytes)")
    return data, label


def _done(codes: np.ndarray) -> Future:
    future: Future = Future()
    future.set_running_or_notify_cancel()
    future.set_result(codes)
    return future


def _failed(error: BaseException) -> Future:
    future: Future = Future()
    future.set_running_or_notify_cancel()
    future.set_exception(error)
    return future
