"""End-to-end engine benchmark: continuous-batching throughput and streaming time to first audio.

Everything runs in one process on one loaded talker and codec, through the engine the server and
`TTS` use (threaded talker loop, streaming pipeline, batched codec runner), with full synthesis:
every request's frames are decoded to audio.

* Throughput at concurrency c (1, 4, 16): an engine with `EngineConfig(max_running=c)` gets all
  requests at once (continuous batching) and runs them to their last audio chunk; throughput =
  audio seconds (generated frames / frame rate, counted from the results) / wall seconds.
  `sequential_throughput` is the concurrency-1 run: one request in the talker at a time, batch
  size 1, same code path. `speedup_16` = throughput at 16 / sequential.
* TTFA: one request at a time on the concurrency-1 engine with the default chunk schedule (first
  chunk 2 frames); wall time from `add_request` to the sink receiving the first chunk that holds
  audio, median of `ttfa_runs`. Each run is aborted once its first audio arrives. The runs take
  the bench's texts in turn (cycling), starting after the last text the concurrency-1 run ran, so
  each is a new text on a warm engine whatever `requests` is: the engine starts it from the prefix
  (the chat template) that the previous request left in its free slot, and prefills the rest.
* TTFA floor: the same work timed piece by piece in this thread while the engine is idle, on the
  same model and codec: prefill of the rows the engine prefills (the kept prefix is put in the
  slot untimed first), every talker step (decode forward + family step) until the first chunk's
  frames exist (a Delay frame t is complete n_vq steps after its first codebook), one codec
  decode of that chunk on a fresh stream. Floor rounds alternate with the TTFA runs (so that both
  see the machine alike) on the same prompts; the pieces' medians are summed.
  `ttfa_ratio` = TTFA / floor: what the engine adds (threads, queues, scheduling) on top.
* Codec streaming decode (`codec_streaming`, the family's own codec; codec.py): 16 streams of
  2 s decoded chunk by chunk, batched vs one at a time.
* First audio under load: after the concurrency-16 run, `ttfa_runs` rounds on that engine each
  submit 16 requests at once, one per slot whatever `requests` is (more would queue), with new texts
  ("Take k. " before each of the 16 bench texts, so that only the chat template is found kept), and
  abort them once all have audio. A round's figure is the median of its first-audio latencies
  (from the first submission); `ttfa_16_s` is the median of the rounds' figures (`ttfa_16_runs_s`),
  `ttfa_16_max_s` the median of each round's last one, `ttfa_16_vs_1` = `ttfa_16_s` / TTFA. Rounds,
  not one run, because a batch-16 step is what this figure is made of and its time varies most with
  whatever else the machine runs.

* Floors (`floors`, see floors.py and docs/bench.md), measured after the runs (and after
  `peak_rss_mb` and, on a GPU, `peak_device_memory_mb` are taken): memory read bandwidth and GEMM
  throughput of the bench's device (the GPU's own where it runs on one), and one
  decode step of this model counted op by op (weight bytes at batch 1, FLOPs at batch 16).
  Batch-1 floor = weight bytes / bandwidth; batch-16 floor = FLOPs / GEMM throughput, or the
  weight bytes / bandwidth where that is higher. Measured step times come from the throughput
  runs: wall / talker steps (requests run in waves of c, each for the longest request's steps),
  so they include prefill, scheduling and audio decoding; `fraction_*` = floor / measured.

Every family (`--family delay|local|realtime|fish`) runs the same way; with no `--model` the bench
builds a bench-size random checkpoint of that family (checkpoint.py, family_checkpoints.py), made
never to stop by itself. Every request is greedy, submitted with `guard=False` and a fixed step
cap, so every request generates the same number of frames; the frames each request actually
produced are reported. The steps before frame 0 (Delay: n_vq, Local and Realtime: 0) are read
from the first warm-up (rows - frames) and added to the cap. Each engine is warmed up with one
short request before it is timed: the lead, the first chunk and 2 frames (the first warm-up, before
the lead is known, leaves room for n_vq lead steps). `frames` is at least the first chunk's frames
(2), the chunk TTFA times. Thread settings are left as they are.
"""
from __future__ import annotations

import math
import queue
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequestError, MossServeError
from ..loader import parse_device
from ..openmp import release_openmp_pool
from .codec import streaming_figures
from .floors import count_step, floors, gemm_throughput, memory_bandwidth
from .machine import machine_info

SUPPORTED_FAMILIES = ("delay", "local", "realtime", "fish")
CONCURRENCY = (1, 4, 16)
TOGETHER = 16  # requests of a first-audio-under-load round: one per slot of the concurrency-16 engine
TARGETS = {"speedup_16": 5.0, "ttfa_ratio": 1.3, "ttfa_16_vs_1": 2.0}  # from the issue; reported, not asserted
RANDOM_MODEL = "random bench checkpoint"

TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Please leave the package at the front door.",
    "It is going to rain in the afternoon, so take an umbrella.",
    "Our flight departs at seven thirty tomorrow morning.",
    "She sells sea shells by the sea shore.",
    "The meeting has been moved to Thursday at noon.",
    "Turn left at the next traffic light and keep going.",
    "Thank you for calling, how can I help you today?",
    "The museum opens at nine and closes at five.",
    "A cup of tea would be lovely right now.",
    "Remember to water the plants while I am away.",
    "The train to the city leaves from platform four.",
    "We found a small cafe near the river last weekend.",
    "Your order has shipped and should arrive on Monday.",
    "The children built a sandcastle on the beach.",
    "Could you speak a little more slowly, please?",
)


@dataclass
class _Result:
    chunks: list = field(default_factory=list)
    first_audio_at: float | None = None
    done_at: float | None = None
    arrived: threading.Event = field(default_factory=threading.Event)  # first audio, or the end


class _Collector:
    """Sinks for a set of requests: each chunk is stamped on arrival (in the engine's thread)."""

    def __init__(self, count: int) -> None:
        self.results = [_Result() for _ in range(count)]
        self.finals: queue.Queue = queue.Queue()

    def sink(self, index: int) -> Callable:
        def receive(chunk) -> None:
            now = time.perf_counter()
            result = self.results[index]
            result.chunks.append(chunk)
            if result.first_audio_at is None and chunk.audio is not None and chunk.audio.shape[-1]:
                result.first_audio_at = now
                result.arrived.set()
            if chunk.final:
                result.done_at = now
                result.arrived.set()
                self.finals.put(index)
        return receive

    def wait(self, count: int, timeout: float = 3600.0) -> None:
        for _ in range(count):
            self.finals.get(timeout=timeout)


def run_engine_bench(family: str = "delay", model: str | Path | None = None, codec: str | Path | None = None,
                     device: str = "cpu", dtype: str = "float32", frames: int = 40, requests: int = 16,
                     ttfa_runs: int = 5, seed: int = 0, bandwidth_mb: float = 256.0,
                     log: Callable[[str], None] | None = None, concurrency: tuple[int, ...] = CONCURRENCY) -> dict:
    """Run the engine bench and return its figures (see the module docstring). `concurrency`:
    the streams of the throughput runs, 1, 4 and 16 among them (a GPU's run adds 32, say)."""
    from ..api import TTS
    from ..config import EngineConfig
    from ..sampling import SamplingParams
    from ..speech_request import SpeechRequest

    if family not in SUPPORTED_FAMILIES:
        raise InvalidRequestError(f"unknown model family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    parse_device(device)  # before a bench checkpoint is built
    if requests < 1 or ttfa_runs < 1:
        raise InvalidRequestError("requests and ttfa_runs must be >= 1")
    defaults = EngineConfig()
    _check_frames(frames, defaults.chunk_schedule.first)
    if not set(CONCURRENCY) <= set(concurrency):
        raise InvalidRequestError(f"concurrency must include {CONCURRENCY}")
    say = log or (lambda message: None)
    started = time.perf_counter()

    model_dir = model if model is not None else _bench_checkpoint(seed, say, family)
    say(f"loading {model_dir}")
    tts = TTS.from_pretrained(model_dir, codec=codec, device=device, dtype=dtype)
    talker = tts.talker
    if talker.name != family:  # before the codec loads (a hub fetch, when the checkpoint names none)
        raise InvalidRequestError(f"{model_dir} is a {talker.name} checkpoint; pass --family {talker.name}")
    codec_model = tts.codec
    prompts = [tts.prompt(SpeechRequest(input=TEXTS[i % len(TEXTS)])) for i in range(requests)]
    sampling = SamplingParams.greedy()
    n_vq = talker.codebooks
    # Rows generated before frame 0 completes: taken from the warm-up (rows - frames of a request
    # that ran to its cap). Delay: n_vq (the audio-start row, then n_vq - 1 rows of the delay
    # pattern); Local and Realtime: 0 (every step yields a frame).
    lead: int | None = None  # set by the first warm-up
    steps = frames

    def config(c: int) -> EngineConfig:  # the defaults otherwise; every request queued at once
        return EngineConfig(max_running=c, max_queued=max(defaults.max_queued, requests))

    max_len = min(defaults.max_len, talker.backbone_config.max_position_embeddings)

    def new_engine(c: int):
        from ..engine.engine import Engine

        engine = Engine(talker, lambda: codec_model, config(c))
        engine.start()
        return engine

    def submit(engine, prompt, cap: int, sink, schedule=None):
        return engine.add_request(prompt, sampling, sink, max_new_frames=cap, schedule=schedule,
                                  decode_audio=True, guard=False)

    def warm_up(engine) -> tuple[int, int, str]:
        collector = _Collector(1)
        submit(engine, prompts[0], _warm_up_steps(n_vq if lead is None else lead, defaults.chunk_schedule.first),
               collector.sink(0))
        collector.wait(1)
        generation = collector.results[0].chunks[-1].generation
        if generation.error:
            raise MossServeError(f"warm-up request failed: {generation.error}")
        return len(generation.rows), len(generation.frames), generation.finish_reason

    def run_all(engine) -> tuple[float, list[_Result]]:
        """Every request submitted at once: the wall time and the results."""
        collector = _Collector(len(prompts))
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            submit(engine, prompt, steps, collector.sink(i))
        collector.wait(len(prompts))
        return max(r.done_at for r in collector.results) - start, collector.results

    throughput, wall, audio_s, produced, reasons = {}, {}, {}, {}, {}
    ttfa_values: list[float] = []
    first_audio_16: list[list[float]] = []  # per round: each request's first audio when all start together
    text_ttfa_values: list[float] = []  # families with streaming text input (Realtime)
    decoded_ok = True
    for c in sorted(set(concurrency)):
        engine = new_engine(c)
        try:
            say(f"concurrency {c}: warming up")
            warm_rows, warm_frames, warm_reason = warm_up(engine)
            if lead is None:
                if warm_reason != "length" or warm_frames < 1:
                    raise MossServeError(f"the warm-up request stopped early ({warm_reason}, {warm_rows} steps, "
                                         f"{warm_frames} frames): the bench needs a model that runs to its step cap")
                lead = warm_rows - warm_frames
                steps = frames + lead
            say(f"concurrency {c}: {len(prompts)} requests x {steps} steps")
            elapsed, results = run_all(engine)
            generations = [r.chunks[-1].generation for r in results]
            errors = [g.error for g in generations if g.error]
            if errors:
                raise MossServeError(f"a bench request failed: {errors[0]}")
            counts = [len(g.frames) for g in generations]
            samples = [sum(ch.audio.shape[-1] for ch in r.chunks if ch.audio is not None) for r in results]
            decoded_ok &= all(s == n * codec_model.samples_per_frame for s, n in zip(samples, counts))
            key = str(c)
            audio_s[key] = sum(counts) / codec_model.frame_rate
            wall[key] = elapsed
            throughput[key] = audio_s[key] / elapsed
            produced[key] = {"min": min(counts), "max": max(counts), "steps_max": max(len(g.rows) for g in generations)}
            reasons[key] = sorted({g.finish_reason for g in generations})
            say(f"concurrency {c}: {throughput[key]:.2f} audio s / s ({audio_s[key]:.1f} s audio in {elapsed:.1f} s)")
            if c == TOGETHER:
                say(f"first audio with {TOGETHER} requests started together: rounds of new texts")
                for run in range(ttfa_runs):
                    batch = [tts.prompt(SpeechRequest(input=f"Take {run + 1}. {TEXTS[i % len(TEXTS)]}"))
                             for i in range(TOGETHER)]
                    engine.wait_idle()
                    first_audio_16.append(_time_first_audio_together(engine, submit, batch, steps))
            if c == 1:
                # TTFA runs and floor rounds alternate, so that both see the machine alike; the
                # floor is timed while the engine is idle (its threads wait, nothing else runs).
                say("TTFA: streaming runs alternating with the floor, piece by piece")
                floor_timer = _FloorTimer(talker, codec_model, sampling, config(1))
                floor_timer.round(prompts[0], prompts[-1])  # warm-up
                ttfa_prompts = [tts.prompt(SpeechRequest(input=text)) for text in _ttfa_texts(requests, ttfa_runs)]
                for prompt, before in zip(ttfa_prompts, [prompts[-1], *ttfa_prompts[:-1]]):
                    engine.wait_idle()
                    ttfa_values.append(_time_first_audio(engine, submit, prompt, steps))
                    engine.wait_idle()
                    floor_timer.round(prompt, before)
                floor = floor_timer.summary(discard=1)
                say(f"TTFA runs: {', '.join(f'{t:.3f}' for t in ttfa_values)} s; floor rounds: "
                    f"{', '.join(f'{t:.3f}' for t in floor['rounds_s'])} s")
                if talker.supports_sessions:
                    say("text to first audio: turns whose text streams in")
                    text_ttfa_values = [_time_first_audio_after_text(engine, talker, sampling, i)
                                        for i in range(ttfa_runs)]
        finally:
            engine.shutdown()
            engine = None  # free its KV cache before the next engine allocates one

    peak_rss = peak_rss_mb()  # before the limits below allocate their test tensors
    peak_device = peak_device_memory_mb(next(talker.model.parameters()).device)
    say("codec: streaming decode of 16 streams, batched vs one at a time")
    codec_streaming = streaming_figures(codec_model, streams=16, seconds=2.0, repeats=2)
    # The "16" run had min(16, requests) streams: its floor is counted at the batch it ran.
    streams = {key: min(int(key), len(prompts)) for key in wall}
    say(f"floors: counting a decode step's weight bytes and FLOPs at batch 1 and {streams['16']}")
    step_counts = {b: count_step(talker, prompts, sampling, defaults.prefill_tokens, streams[str(b)]) for b in (1, 16)}
    say("floors: measuring memory bandwidth and GEMM throughput")
    weight = next(talker.model.parameters())
    bandwidth = memory_bandwidth(bandwidth_mb, device=weight.device)
    backbone = talker.backbone_config
    gemm = gemm_throughput(weight.dtype, backbone.hidden_size, backbone.intermediate_size, device=weight.device)
    # Talker steps of each run: requests run in waves of c, each wave for the longest request's steps.
    engine_steps = {key: math.ceil(len(prompts) / int(key)) * produced[key]["steps_max"] for key in wall}
    floor_figures = floors(bandwidth["gb_s"], gemm["gflop_s"], step_counts[1], step_counts[16],
                           wall["1"] / engine_steps["1"], wall["16"] / engine_steps["16"])
    floor_figures.update(
        # The decode step alone (forward + family step + host copy), from the TTFA floor rounds: the
        # figure the batch-1 floor bounds; step_s_1 adds the codec, prefills and scheduling.
        decode_step_s_1=floor["step_s_median"],
        decode_fraction_1=floor_figures["step_floor_s_1"] / floor["step_s_median"],
        engine_steps={key: engine_steps[key] for key in ("1", "16")},
        memory_bandwidth=bandwidth,
        gemm=gemm,
        weight_bytes_by_group=_grouped(step_counts[1]["weight_bytes_by_parameter"]),
        parameter_bytes=sum(p.numel() * p.element_size() for p in talker.model.parameters()),
    )
    say(f"floors: step at 1 {floor_figures['step_s_1'] * 1000:.1f} ms vs floor {floor_figures['step_floor_s_1'] * 1000:.1f}"
        f" ms; at 16 {floor_figures['step_s_16'] * 1000:.1f} ms vs floor {floor_figures['step_floor_s_16'] * 1000:.1f} ms")

    ttfa = statistics.median(ttfa_values)
    ttfa_16 = statistics.median(statistics.median(run) for run in first_audio_16)
    sequential = throughput["1"]
    result = {
        "benchmark": "engine",
        "family": family,
        "model": RANDOM_MODEL if model is None else str(model),
        "model_dir": str(talker.source),
        "parameters": sum(p.numel() for p in talker.model.parameters()),
        "codec_parameters": sum(p.numel() for p in codec_model.parameters()),
        **machine_info(device, dtype),
        "threads": torch.get_num_threads(),
        "requests": len(prompts),
        "frames_per_request": frames,
        "frame_rate": codec_model.frame_rate,
        "steps_per_request": steps,
        "frames_generated": produced,
        "finish_reasons": reasons,
        "decoded_audio_matches_frames": decoded_ok,
        "max_len": max_len,
        "throughput": throughput,
        "streams": streams,
        "audio_seconds": audio_s,
        "wall_s": wall,
        "sequential_throughput": sequential,
        "sequential_mode": "the concurrency-1 run: max_running=1, one request in the talker at a time",
        "speedup_16": throughput["16"] / sequential,
        "ttfa_s": ttfa,
        "ttfa_runs_s": ttfa_values,
        "text_to_first_audio_s": statistics.median(text_ttfa_values) if text_ttfa_values else None,
        "text_to_first_audio_runs_s": text_ttfa_values or None,
        "ttfa_floor_s": floor["total_s"],
        "ttfa_floor": floor,
        "ttfa_ratio": ttfa / floor["total_s"],
        "ttfa_16_requests": TOGETHER,
        "ttfa_16_s": ttfa_16,
        "ttfa_16_max_s": statistics.median(max(run) for run in first_audio_16),
        "ttfa_16_vs_1": ttfa_16 / ttfa,
        "ttfa_16_runs_s": [statistics.median(run) for run in first_audio_16],
        "targets": dict(TARGETS),
        "floors": floor_figures,
        "ttfa_lead_steps": lead,
        "codec_streaming": {key: codec_streaming[key] for key in (
            "streams", "audio_seconds_per_stream", "batched_audio_s_per_s", "sequential_audio_s_per_s", "speedup")},
        "peak_rss_mb": peak_rss,
        "peak_device_memory_mb": peak_device,
        "bench_wall_s": time.perf_counter() - started,
    }
    return result


def _check_frames(frames: int, first: int) -> None:
    """TTFA and its floor time the first chunk of the default schedule: a request of fewer frames
    never fills it (its first audio would be a shorter last chunk, timed against the full chunk's floor)."""
    if frames < first:
        raise InvalidRequestError(f"--frames must be at least {first}, the frames of the first streaming chunk "
                                  f"that TTFA times; got {frames}")


def _warm_up_steps(lead: int, first: int) -> int:
    """Steps of a warm-up request: `lead` steps before frame 0 (n_vq, the most any family takes, until
    the first warm-up has measured it), the first chunk and a 2-frame last chunk. A timed request
    has at least the first chunk's frames; it runs the same one-row decode step and codec decode,
    and the shapes of a batch or a longer chunk are met only in the runs themselves."""
    return lead + first + 2


def _ttfa_texts(requests: int, runs: int) -> list[str]:
    """The texts of the one-stream TTFA runs: the bench's texts in turn after the last one the
    concurrency-1 run ran (text `requests - 1`), so that no run repeats the text before it, whose
    whole prompt the engine would find kept and not prefill."""
    return [TEXTS[(requests + run) % len(TEXTS)] for run in range(runs)]


def _time_first_audio_after_text(engine, talker, sampling, run: int) -> float:
    """A session turn (a user turn, then the assistant's text streaming in, as from an LLM): its input is
    prefilled while no text has come; the clock starts with the push that lets it speak (the prefill's
    text ids and the first chunk's) and stops at its first audio. The turn is closed at once."""
    from ..text.realtime_prompt import DELAY_TOKENS
    from ..text.realtime_session import RealtimeTurn

    prompt = talker.open_turn_prompt(RealtimeTurn(user_text="Could you tell me the way to the station?"), True)
    arrived, first_audio = threading.Event(), []

    def sink(chunk) -> None:
        if not first_audio and chunk.audio is not None and chunk.audio.shape[-1]:
            first_audio.append(time.perf_counter())
        if first_audio or chunk.final:
            arrived.set()

    session = f"bench-text-{run}"
    ids = talker.tokenizer.encode(TEXTS[run % len(TEXTS)] + " " + TEXTS[(run + 1) % len(TEXTS)])
    handle = engine.add_request(prompt, sampling, sink, session=session, guard=False)
    engine.wait_idle()  # the turn's input is in the cache; it waits for text
    start = time.perf_counter()
    engine.push_input(handle.id, ids[: DELAY_TOKENS + engine.config.chunk_schedule.first])
    arrived.wait(timeout=600)
    engine.close_session(session)
    engine.wait_idle()
    if not first_audio:
        raise MossServeError("a streamed-text turn ended without audio")
    return first_audio[0] - start


def _grouped(read: dict[str, int]) -> dict[str, int]:
    """Bytes read per parameter, with the layer index folded: `language_model.layers.*.mlp...`."""
    groups: dict[str, int] = {}
    for name, nbytes in read.items():
        key = re.sub(r"\.\d+\.", ".*.", name)
        groups[key] = groups.get(key, 0) + nbytes
    return groups


def _time_first_audio(engine, submit, prompt, steps: int) -> float:
    """Seconds from add_request to the first chunk with audio (default chunk schedule); the
    request is aborted then, and the engine is idle again when this returns."""
    collector = _Collector(1)
    start = time.perf_counter()
    handle = submit(engine, prompt, steps, collector.sink(0))
    result = collector.results[0]
    result.arrived.wait()
    engine.abort(handle.id)
    collector.wait(1)
    if result.first_audio_at is None:
        raise MossServeError("the TTFA request ended without audio")
    return result.first_audio_at - start


def _time_first_audio_together(engine, submit, prompts, steps: int) -> list[float]:
    """Each request's seconds from the first submission to its first audio, all submitted at once;
    all are aborted once every one has audio, and the engine is idle again when this returns."""
    collector = _Collector(len(prompts))
    start = time.perf_counter()
    handles = [submit(engine, prompt, steps, collector.sink(i)) for i, prompt in enumerate(prompts)]
    for result in collector.results:
        result.arrived.wait()
    for handle in handles:
        engine.abort(handle.id)
    collector.wait(len(prompts))
    if any(r.first_audio_at is None for r in collector.results):
        raise MossServeError("a request started together with the others ended without audio")
    return [r.first_audio_at - start for r in collector.results]


class _FloorTimer:
    """The TTFA floor, piece by piece in the calling thread, on the same model and codec: prefill
    of the prompt rows the engine prefills, each talker step (decode forward + family step, with
    the host copy the engine makes) until the first chunk's frames exist, one codec decode of that
    chunk on a fresh stream. Talker runner and decoder are built like the engine's (same mode,
    limits and schedule)."""

    def __init__(self, talker, codec_model, sampling, config) -> None:
        from ..engine.talker_runner import TalkerRunner

        self.talker, self.codec, self.sampling, self.config = talker, codec_model, sampling, config
        self.device = next(talker.model.parameters()).device
        mode = "graphs" if self.device.type == "cuda" and config.cuda_graphs else "eager"
        max_len = min(config.max_len, talker.backbone_config.max_position_embeddings)
        self.runner = TalkerRunner(talker, 1, max_len, config.prefill_tokens, mode, config.graph_batch_sizes)
        self.decoder = codec_model.streaming_decoder(1, config.max_chunk_frames, talker.codebooks)
        self.first = config.chunk_schedule.first
        self.rounds: list[tuple[float, list[float], float]] = []

    def round(self, prompt, before) -> None:
        """Time `prompt` as the engine runs it after `before` ended: from the prefix they share
        (the rows the engine finds kept in its free slot), which is put in the slot untimed."""
        from ..engine.prefixes import kept_prefix

        runner, talker, piece = self.runner, self.talker, self.config.prefill_tokens
        _, kept = kept_prefix([(None, before.rows)], prompt, self.config.shared_prefix_rows)
        slot = runner.allocate()
        with torch.inference_mode():
            for start in range(0, kept, piece):
                runner.prefill([slot], [prompt.rows[start : min(start + piece, kept)]])
        _sync(self.device)
        t0 = time.perf_counter()
        talker.admit(runner.state, slot, prompt, self.sampling)
        hidden = None
        for start in range(kept, len(prompt.rows), piece):
            hidden = runner.prefill([slot], [prompt.rows[start : start + piece]])
        _sync(self.device)
        prefill_s = time.perf_counter() - t0
        frames, step_times, finished = [], [], False
        while len(frames) < self.first and not finished:
            t0 = time.perf_counter()
            if step_times:
                hidden = runner.decode([slot])
            out = runner.step(hidden, [slot])
            out.rows.cpu().numpy()  # the engine copies every step's rows to the host too
            if bool(out.has_frame[0]):
                frames.append(out.frames[0].cpu().numpy())
            finished = bool(out.finished[0])
            step_times.append(time.perf_counter() - t0)
        runner.release(slot)
        if len(frames) < self.first:
            raise MossServeError(f"the model stopped after {len(frames)} frames; the TTFA floor needs {self.first}")
        codes = torch.from_numpy(np.stack(frames).T.copy()).to(self.codec.device)
        stream = self.decoder.open()
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.decoder.decode([stream], [codes])[0].float().cpu().numpy()
        codec_s = time.perf_counter() - t0
        self.decoder.close(stream)
        self.rounds.append((prefill_s, step_times, codec_s, len(prompt.rows) - kept))
        # This thread's OpenMP pool, made by the round, would throttle the engine's thread in the TTFA
        # run that follows (two pools on two cores; docs/performance.md): first audio at one stream
        # measured 242 -> 301 ms (bf16) with it left in place.
        release_openmp_pool()

    def summary(self, discard: int = 0) -> dict:
        rounds = self.rounds[discard:]
        prefill_s = statistics.median(r[0] for r in rounds)
        steps_s = statistics.median(sum(r[1]) for r in rounds)
        codec_s = statistics.median(r[2] for r in rounds)
        return {
            "total_s": prefill_s + steps_s + codec_s,  # the sum of the pieces' medians
            "prefill_s": prefill_s,
            "prefilled_rows": statistics.median(r[3] for r in rounds),
            "steps": len(rounds[0][1]),
            "steps_s": steps_s,
            "step_s_median": statistics.median(t for r in rounds for t in r[1]),
            "codec_first_chunk_s": codec_s,
            "first_chunk_frames": self.first,
            "rounds_s": [r[0] + sum(r[1]) + r[2] for r in rounds],
        }


def _bench_checkpoint(seed: int, say: Callable[[str], None], family: str = "delay") -> Path:
    """The cached bench checkpoint; a missing one is built in a child process so that building
    it does not count in this process's peak memory."""
    from .checkpoint import cache_root, family_sizes

    path = _cached_path(seed, family)
    if path is not None:
        return path
    say(f"building the {family} bench checkpoint under {cache_root() / 'bench'} (once)")
    code = ("from mossserve.bench.checkpoint import bench_checkpoint; "
            f"print(bench_checkpoint(seed={seed}, family={family!r}))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MossServeError(f"building the bench checkpoint failed:\n{proc.stderr.strip()}")
    path = _cached_path(seed, family)
    if path is None:
        raise MossServeError(f"the {family} bench checkpoint ({family_sizes(family)}) was not found after building it")
    return path


def _cached_path(seed: int, family: str = "delay") -> Path | None:
    from .checkpoint import checkpoint_path, is_complete

    path = checkpoint_path(seed, family=family)
    return path if is_complete(path) else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_device_memory_mb(device: torch.device) -> float | None:
    """Peak memory torch allocated on a GPU (None on CPU, where `peak_rss_mb` holds it)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(result: dict) -> str:
    """A short human-readable summary of `run_engine_bench`'s result."""
    floor, fl = result["ttfa_floor"], result["floors"]
    lines = [
        (f"engine bench: {result['family']} family, {result['model']} ({result['parameters'] / 1e6:.1f} M "
         f"parameters), {result['device']} {result['dtype']}, {result['threads']} threads"),
        (f"CPU {result['cpu']} ({result['cpu_capability']}, "
         f"{'native' if result['native_bf16'] else 'emulated'} bf16)"),
        (f"{result['requests']} requests x {result['frames_per_request']} frames "
         f"({result['frames_per_request'] / result['frame_rate']:.1f} s audio each), greedy, audio decoded"),
        "  concurrency   audio s / s   wall s",
    ]
    fewer = {key: f" ({n} streams: --requests {result['requests']})" if n < int(key) else ""
             for key, n in result["streams"].items()}
    for key, value in result["throughput"].items():
        lines.append(f"  {key:>11}   {value:11.2f}   {result['wall_s'][key]:6.1f}{fewer[key]}")
    lines += [
        f"  speedup 16 vs sequential: {result['speedup_16']:.2f}x (target >= {TARGETS['speedup_16']:g})",
        (f"  TTFA (streaming, 1 request): {result['ttfa_s'] * 1000:.0f} ms median of {len(result['ttfa_runs_s'])}; "
         f"floor {result['ttfa_floor_s'] * 1000:.0f} ms = prefill {floor['prefill_s'] * 1000:.0f} + "
         f"{floor['steps']} steps {floor['steps_s'] * 1000:.0f} + codec {floor['codec_first_chunk_s'] * 1000:.0f}; "
         f"ratio {result['ttfa_ratio']:.2f} (target <= {TARGETS['ttfa_ratio']:g})"),
        (f"  first audio with {result['ttfa_16_requests']} requests started together "
         f"({len(result['ttfa_16_runs_s'])} rounds): median {result['ttfa_16_s'] * 1000:.0f} ms, "
         f"last {result['ttfa_16_max_s'] * 1000:.0f} ms; {result['ttfa_16_vs_1']:.2f}x the single request's "
         f"(target <= {TARGETS['ttfa_16_vs_1']:g})"),
        *([(f"  text to first audio (a turn whose text streams in): {result['text_to_first_audio_s'] * 1000:.0f} ms "
            f"median of {len(result['text_to_first_audio_runs_s'])}")] if result["text_to_first_audio_s"] else []),
        (f"  step at 1: {fl['step_s_1'] * 1000:.1f} ms, floor {fl['step_floor_s_1'] * 1000:.1f} ms "
         f"({fl['weight_bytes_per_step'] / 1e6:.0f} MB of weights at {fl['memory_bandwidth_gb_s']:.1f} GB/s): "
         f"{fl['fraction_1'] * 100:.0f}% of the floor's speed; the decode step alone "
         f"{fl['decode_step_s_1'] * 1000:.1f} ms ({fl['decode_fraction_1'] * 100:.0f}%)"),
        (f"  step at 16{fewer['16']}: {fl['step_s_16'] * 1000:.1f} ms, floor {fl['step_floor_s_16'] * 1000:.1f} ms "
         f"({fl['flops_per_step_16'] / 1e9:.2f} GFLOP at {fl['gemm_gflop_s']:.0f} GFLOP/s, {fl['bound_16']}-bound): "
         f"{fl['fraction_16'] * 100:.0f}%"),
        (f"  codec streaming decode, {result['codec_streaming']['streams']} streams: batched "
         f"{result['codec_streaming']['batched_audio_s_per_s']:.1f} vs one at a time "
         f"{result['codec_streaming']['sequential_audio_s_per_s']:.1f} audio s / s "
         f"({result['codec_streaming']['speedup']:.2f}x)"),
        f"  peak RSS {result['peak_rss_mb']:.0f} MB; bench took {result['bench_wall_s']:.0f} s",
    ]
    return "\n".join(lines)
