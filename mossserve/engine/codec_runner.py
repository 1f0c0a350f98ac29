"""Batched streaming codec decode across every active request, on its own thread.

Each round takes the oldest queued chunk of every request (one per request keeps each
request's audio in order) and decodes them all in one call of the streaming decoder. On CUDA
the thread works on its own stream, so codec rounds overlap the talker's steps. A request's
chunks are decoded in one decoder stream per clip; a chunk that fails to decode fails only
its request (the round is retried one chunk at a time to find it).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from typing import Callable

import torch

from ..models.codecs.base import Codec, StreamingDecoder
from .pipeline import CodecWork
from .request import AudioChunk, EngineRequest
from .worker import Worker

log = logging.getLogger(__name__)


class CodecRunner:
    def __init__(self, get_codec: Callable[[], Codec], max_streams: int, max_chunk_frames: int, n_quantizers: int,
                 on_final: Callable[[EngineRequest], None], on_error: Callable[[EngineRequest, str], None]) -> None:
        self._get_codec = get_codec
        self.max_streams, self.max_chunk_frames, self.n_quantizers = max_streams, max_chunk_frames, n_quantizers
        self._on_final, self._on_error = on_final, on_error
        self._codec: Codec | None = None  # loaded with the decoder, on first use
        self._decoder: StreamingDecoder | None = None
        self._queue: deque[CodecWork] = deque()
        self._streams: dict[str, tuple[int, int]] = {}  # request id -> (segment, decoder stream id)
        self._lock = threading.Condition()
        self._worker = Worker("mossserve-codec", self._lock, self._has_work, self.run_once, self._crashed)
        self._cuda_stream = None
        self._in_round: set[str] = set()  # requests whose chunks are being decoded now (outside the lock)

    # ---- called from other threads -------------------------------------------------------
    def submit(self, work: CodecWork) -> None:
        with self._lock:
            self._queue.append(work)
            self._lock.notify()

    def drop(self, request: EngineRequest) -> None:
        """Forget a request's queued chunks and stream; no chunk of it is delivered after this returns."""
        with self._lock:
            self._drop(request)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def wait_idle(self) -> None:
        self._worker.wait_idle()

    # ---- one round ---------------------------------------------------------------------
    def run_once(self) -> bool:
        """Decode the next chunk of every request that has one (up to the free streams); False if idle.
        A round that fails outside the decoder (the codec cannot load, a bug) fails the requests whose
        chunks it took, so that none waits for a chunk that will never come; so does an interrupt
        (Ctrl-C in a caller that steps the engine), which then goes on to that caller."""
        with self._lock:
            batch = self._take()
        if not batch:
            return False
        try:
            self._round(batch)
        except BaseException as error:  # noqa: BLE001 - fail this round's requests, keep serving
            if isinstance(error, Exception):
                log.exception("codec round failed")
            with self._lock:
                self._in_round.clear()
                self._fail(batch, error)
            if not isinstance(error, Exception):
                raise
        return True

    def _round(self, batch: list[CodecWork]) -> None:
        decoder = self._ensure_decoder()
        with self._lock, self._on_codec_stream():  # a new stream's state is zeroed where it is decoded
            decoding = [w for w in batch if len(w.codes) and not w.request.dropped]
            for work in decoding:
                current = self._streams.get(work.request.id)
                if current is None or current[0] != work.segment:
                    self._close_stream(work.request.id)
                    self._streams[work.request.id] = (work.segment, decoder.open())
            # Read under the lock; while they decode, a drop from another thread leaves their streams
            # open (closing one would change the decoder's slots under the call) until the round ends.
            ids = [self._streams[w.request.id][1] for w in decoding]
            self._in_round.update(w.request.id for w in decoding)
        audio = self._decode(decoding, ids) if decoding else {}
        with self._lock:
            self._in_round.clear()
            for work in batch:
                rid = work.request.id
                if work.request.dropped:
                    self._close_stream(rid)
                    continue
                if rid in audio:
                    if isinstance(audio[rid], str):
                        self._drop(work.request)
                        self._on_error(work.request, audio[rid])
                        continue
                    wave = audio[rid][:, work.trim * self._decoder.samples_per_frame:]
                    if wave.shape[-1]:
                        work.request.emit(AudioChunk(rid, wave, self._codec.sample_rate, work.frame_start,
                                                     work.frame_start + len(work.codes), work.codes, work.segment))
                if work.end_segment:
                    self._close_stream(rid)
                if work.final:
                    self._on_final(work.request)

    def _take(self) -> list[CodecWork]:
        """The oldest chunk of each request, as far as decoder streams allow; the rest stay queued."""
        taken, seen, kept = [], set(), deque()
        free = self.max_streams - len(self._streams)
        for work in self._queue:
            if work.request.dropped:
                continue
            rid = work.request.id
            needs_stream = len(work.codes) and rid not in self._streams
            if rid in seen or (needs_stream and free <= 0):
                seen.add(rid)
                kept.append(work)
                continue
            seen.add(rid)
            free -= bool(needs_stream)
            taken.append(work)
        self._queue = kept
        return taken

    def _decode(self, batch: list[CodecWork], ids: list[int]) -> dict[str, object]:
        """request id -> audio (channels, samples) as numpy, or an error message; `ids`: the batch's
        decoder streams. One decode call per codebook count in the round (a request at reduced depth
        is decoded with that many quantizers); a call that fails is retried one chunk at a time to
        find the culprit (a decoder call that raises leaves its streams as they were), and no chunk
        is decoded twice."""
        chunks = [torch.from_numpy(w.codes.T.copy()) for w in batch]
        full = getattr(self._decoder, "n_quantizers", None)
        rows = [int(c.shape[0]) if full is None else min(int(c.shape[0]), full) for c in chunks]
        out: dict[str, object] = {}
        for count in sorted(set(rows), reverse=True):
            group = [i for i, r in enumerate(rows) if r == count]
            try:
                waves = self._run_decoder([ids[i] for i in group], [chunks[i] for i in group], count)
            except Exception as e:  # noqa: BLE001 - find the culprit: one chunk at a time
                if len(group) == 1:
                    out[batch[group[0]].request.id] = f"codec decode failed: {e}"
                    continue
                waves = []
                for i in group:
                    try:
                        waves.append(self._run_decoder([ids[i]], [chunks[i]], count)[0])
                    except Exception as e:  # noqa: BLE001 - reported to that request only
                        waves.append(f"codec decode failed: {e}")
            out.update((batch[i].request.id, wave) for i, wave in zip(group, waves))
        return out

    def _run_decoder(self, ids: list[int], chunks: list[torch.Tensor], count: int) -> list:
        """One decode call for chunks of `count` codebooks (the decoder's count, or fewer)."""
        full = getattr(self._decoder, "n_quantizers", None)
        reduced = full is not None and count < full
        with self._on_codec_stream(), torch.inference_mode():
            if reduced:
                self._decoder.n_quantizers = count
            try:
                return [w.float().cpu().numpy() for w in self._decoder.decode(ids, chunks)]
            finally:
                if reduced:
                    self._decoder.n_quantizers = full

    def _ensure_decoder(self) -> StreamingDecoder:
        if self._decoder is None:
            self._codec = self._get_codec()
            self._decoder = self._codec.streaming_decoder(self.max_streams, self.max_chunk_frames, self.n_quantizers)
            device = torch.device(self._codec.device)
            if device.type == "cuda":
                self._cuda_stream = torch.cuda.Stream(device)
                # the codec's weights and the decoder's zeroed state were made on the default stream
                self._cuda_stream.wait_stream(torch.cuda.current_stream(device))
        return self._decoder

    def _on_codec_stream(self) -> contextlib.AbstractContextManager:
        """The codec's own CUDA stream as the current one (nothing elsewhere)."""
        return torch.cuda.stream(self._cuda_stream) if self._cuda_stream is not None else contextlib.nullcontext()

    def _has_work(self) -> bool:
        return bool(self._queue)

    def _crashed(self, error: Exception) -> None:
        """A round failed before it took its chunks (a bug): fail every request with codec work."""
        with self._lock:
            self._fail(list(self._queue), error)

    def _fail(self, works: list[CodecWork], error: BaseException) -> None:
        """Drop the requests of `works` and report `error` to each once (the caller holds the lock)."""
        for request in {id(w.request): w.request for w in works}.values():
            if request.dropped:  # dropped during the round, its stream left open until the round's end
                self._close_stream(request.id)
            else:
                self._drop(request)
                self._on_error(request, f"codec stage failed: {type(error).__name__}: {error}")

    def _drop(self, request: EngineRequest) -> None:
        request.dropped = True
        self._queue = deque(w for w in self._queue if w.request is not request)
        self._close_stream(request.id)

    def _close_stream(self, request_id: str) -> None:
        if request_id in self._in_round:  # the round in flight closes it when it ends
            return
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            self._decoder.close(entry[1])
