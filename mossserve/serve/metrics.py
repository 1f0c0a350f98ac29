"""Prometheus metrics of one server: request outcomes, latency, speed, and the engine's load.

Each app has its own registry (several servers in one process, as in tests, do not collide).
Engine gauges are read from `engine.stats()` at scrape time, so they are never stale.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

OUTCOMES = ("ok", "client_error", "rejected", "disconnected", "cancelled", "timeout", "error")

_ENGINE_GAUGES = {
    "queued": ("mossserve_queue_depth", "requests waiting for a batch slot"),
    "running": ("mossserve_running_requests", "requests in the running batch"),
    "cache_slots_used": ("mossserve_kv_cache_slots_used", "KV cache slots in use"),
    "cache_slots": ("mossserve_kv_cache_slots", "KV cache slots in all"),
    "cache_slots_kept": ("mossserve_kv_cache_slots_kept", "free KV cache slots holding a prompt prefix for reuse"),
    "prompt_rows_prefilled": ("mossserve_prompt_rows_prefilled", "prompt rows run through prefill since start"),
    "prompt_rows_reused": ("mossserve_prompt_rows_reused",
                           "prompt rows started from keys and values already in the cache since start"),
    "codec_streams_open": ("mossserve_codec_streams_open", "streaming codec decoders in use"),
    "sessions": ("mossserve_sessions", "open realtime sessions (contexts); new ones are refused at --max-sessions"),
}


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict | None]) -> None:
        self._stats = stats

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        for key, (name, doc) in _ENGINE_GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats[key])
        speakers = stats.get("speakers")
        if speakers is not None:
            yield GaugeMetricFamily("mossserve_speaker_cache_entries", "voices held encoded in memory",
                                    value=speakers["entries"])
            for key in ("hits", "misses"):
                yield GaugeMetricFamily(f"mossserve_speaker_cache_{key}", f"speaker cache {key} since start",
                                        value=speakers[key])


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mossserve_requests", "requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.ttfa = Histogram("mossserve_time_to_first_audio_seconds", "request arrival to first audio bytes",
                              buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30), registry=self.registry)
        self.rtf = Histogram("mossserve_real_time_factor", "wall time / audio duration of finished requests",
                             buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5), registry=self.registry)
        self.audio_seconds = Counter("mossserve_audio_seconds", "audio sent to clients", registry=self.registry)
        self.underruns = Counter("mossserve_stream_underruns",
                                 "streamed chunks that arrived after a real-time player would have run dry",
                                 registry=self.registry)
        self.registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StreamClock:
    """Times one HTTP request as its audio is sent: the first audio bytes (an encoder such as AAC's
    holds the first chunks back), underruns of a streamed one (a player started at the first bytes
    would have run out of audio before this chunk came), and the real-time factor of a request that
    finished. Audio seconds count as they are sent, so a request cut short counts what it sent."""

    def __init__(self, metrics: Metrics, streamed: bool) -> None:
        self.metrics, self.streamed, self.start = metrics, streamed, time.perf_counter()
        self.first: float | None = None
        self.audio_s = 0.0

    def sent(self, data: bytes, seconds: float, audible: bool = True) -> None:
        """`data` goes to the client now, with `seconds` more audio in it or held by its encoder;
        `audible`: whether what was sent so far holds audio (a container's headers alone do not)."""
        now = time.perf_counter()
        if data and audible and self.first is None:
            self.first = now
            self.metrics.ttfa.observe(now - self.start)
        elif seconds and self.first is not None and self.streamed and now - self.first > self.audio_s:
            self.metrics.underruns.inc()
        self.audio_s += seconds
        self.metrics.audio_seconds.inc(seconds)

    def finish(self) -> None:
        """The request finished and its audio is sent."""
        if self.audio_s > 0:
            self.metrics.rtf.observe((time.perf_counter() - self.start) / self.audio_s)
