"""mossserve next to the upstream reference, on the directory ../shared/bench/upstream_delay.py writes.

That script builds the bench checkpoint (Delay, published format, a text head edited so every
request decodes audio for exactly `steps_per_request` steps), writes 16 continuation prompts
(`requests/NN.prompt.npy`), and times the reference's own greedy `generate` one request at a time
and as one static batch of 16 (`upstream_bench.json`), keeping each request's generated rows
(`upstream_generation.npz`). Here the same prompts run through mossserve's engine, greedy, the
same step cap, codes only (the reference's `generate` decodes no audio either), no runaway guard:

* 1 stream: an engine with one batch slot gets all requests at once, so they run one at a time;
* 16 streams: an engine with 16 slots gets them at once (continuous batching).

Each engine is warmed up first with one short request on prompt 0 with its first text id changed,
so that the rows it leaves kept in its slot are a prefix of no timed prompt: no timed request
starts from them, only from a prefix that an earlier timed request left (the reference keeps none).

Audio seconds = generated steps / 12.5, the convention of `upstream_bench.json`. The 16-stream
run's rows are compared with the reference's; the first difference is reported.
"""
from __future__ import annotations

import json
import math
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InvalidRequestError, MossServeError
from .machine import machine_info

FRAME_RATE = 12.5
UPSTREAM_FIGURES = ("upstream_sequential_audio_s_per_s", "upstream_batch16_audio_s_per_s")


def run_compare_upstream(directory: str | Path, device: str = "cpu", dtype: str = "float32",
                         log: Callable[[str], None] | None = None) -> dict:
    from ..api import TTS
    from ..config import EngineConfig
    from ..engine.engine import Engine
    from ..sampling import SamplingParams

    say = log or (lambda message: None)
    root = Path(directory)
    upstream, expected, prompt_rows = _read_directory(root)
    steps = upstream["steps_per_request"]
    say(f"loading {root}")
    talker = TTS.from_pretrained(root, device=device, dtype=dtype).talker
    prompts = [talker.prompt_from_rows(rows) for rows in prompt_rows]
    warm_up = _warm_up_prompt(talker, prompts)
    sampling = SamplingParams.greedy()

    def run(slots: int) -> tuple[float, list]:
        engine = Engine(talker, None, EngineConfig(max_running=slots))
        engine.start()
        try:
            _generate(engine, [warm_up], sampling, 4)
            start = time.perf_counter()
            generations = _generate(engine, prompts, sampling, steps)
            return time.perf_counter() - start, generations
        finally:
            engine.shutdown()

    figures, generations = {}, None
    for slots in (1, 16):
        say(f"{slots} stream(s): {len(prompts)} requests x {steps} steps")
        elapsed, generations = run(slots)
        generated = sum(len(g.rows) for g in generations)
        figures[slots] = generated / FRAME_RATE / elapsed
        say(f"{slots} stream(s): {figures[slots]:.2f} audio s / s")
    divergence = _first_divergence([g.rows for g in generations], expected)
    return {
        "directory": str(root),
        **machine_info(device, dtype),
        "requests": len(prompts),
        "steps_per_request": steps,
        "mossserve_1_audio_s_per_s": round(figures[1], 3),
        "mossserve_16_audio_s_per_s": round(figures[16], 3),
        "upstream_sequential_audio_s_per_s": upstream["upstream_sequential_audio_s_per_s"],
        "upstream_batch16_audio_s_per_s": upstream["upstream_batch16_audio_s_per_s"],
        "ratio_1": round(figures[1] / upstream["upstream_sequential_audio_s_per_s"], 3),
        "ratio_16": round(figures[16] / upstream["upstream_batch16_audio_s_per_s"], 3),
        "rows_equal": divergence is None,
        "first_divergence": divergence,
    }


def _read_directory(root: Path) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """The reference's figures, its generated rows and the prompts' rows, all checked before a model
    loads, so that a damaged file is an error that names it."""
    bench, generation = root / "upstream_bench.json", root / "upstream_generation.npz"
    for path in (root / "config.json", bench, generation):
        if not path.is_file():
            raise InvalidRequestError(f"{root} is not a directory written by upstream_delay.py: {path.name} is missing")
    prompt_files = sorted((root / "requests").glob("*.prompt.npy"))
    with _refused_if_damaged(generation), np.load(generation, allow_pickle=False) as data:
        expected = [data[key] for key in sorted(data.files)]
    if not prompt_files or len(prompt_files) != len(expected):
        raise InvalidRequestError(f"{root}: {len(prompt_files)} prompts but {len(expected)} reference generations")
    prompt_rows = []
    for path in prompt_files:
        with _refused_if_damaged(path), path.open("rb") as f:
            prompt_rows.append(np.lib.format.read_array(f, allow_pickle=False))  # .npy only
    return _read_figures(bench), expected, prompt_rows


@contextmanager
def _refused_if_damaged(path: Path) -> Iterator[None]:
    """np.load's errors on a damaged or mistyped file (there are several kinds) as one that names it."""
    try:
        yield
    except (ValueError, TypeError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
        raise InvalidRequestError(f"{path}: not a readable numpy file ({e})") from None


def _read_figures(path: Path) -> dict:
    """upstream_bench.json, checked: a whole step count and positive figures (the ratios divide by them)."""
    try:
        figures = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise InvalidRequestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(figures, dict):
        raise InvalidRequestError(f"{path}: not a JSON object")
    steps = figures.get("steps_per_request")
    if type(steps) is not int or steps < 1:
        raise InvalidRequestError(f"{path}: steps_per_request must be a whole number >= 1, got {steps!r}")
    for key in UPSTREAM_FIGURES:
        value = figures.get(key)
        if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
            raise InvalidRequestError(f"{path}: {key} must be a positive number, got {value!r}")
    return figures


def _warm_up_prompt(talker, prompts: list):
    """Prompt 0 with a first text id that no timed prompt starts with: it warms the same shapes, and
    the rows it leaves kept in its slot are a prefix of no timed prompt (module docstring)."""
    rows = prompts[0].rows.copy()
    taken = {int(p.rows[0, 0]) for p in prompts}
    rows[0, 0] = min(set(range(len(taken) + 1)) - taken)
    return talker.prompt_from_rows(rows)


def _generate(engine, prompts: list, sampling, steps: int) -> list:
    """Every prompt at once, greedy, `steps` steps each; the generations in order."""
    import queue

    finals: queue.Queue = queue.Queue()
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, sampling, lambda chunk, i=index: chunk.final and finals.put((i, chunk)),
                           max_new_frames=steps, decode_audio=False, guard=False)
    generations = [None] * len(prompts)
    for _ in prompts:
        index, chunk = finals.get()
        if chunk.error is not None:
            raise MossServeError(f"request {index} failed: {chunk.error}")
        generations[index] = chunk.generation
    return generations


def _first_divergence(ours: list[np.ndarray], reference: list[np.ndarray]) -> dict | None:
    """The first request, step and column where mossserve's rows differ from the reference's; rows of
    different lengths first differ where the shorter ends, if not before (the column is then None)."""
    for request, (a, b) in enumerate(zip(ours, reference)):
        a = np.asarray(a)
        if a.shape != b.shape:
            n = min(len(a), len(b))
            same_width = a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1]
            diff = np.argwhere(a[:n] != b[:n]) if same_width else np.zeros((0, 2), dtype=int)
            step, column = (int(diff[0, 0]), int(diff[0, 1])) if len(diff) else (n if same_width else 0, None)
            return {"request": request, "step": step, "column": column, "shape": list(a.shape),
                    "reference_shape": list(b.shape)}
        diff = np.argwhere(a != b)
        if len(diff):
            step, column = (int(v) for v in diff[0])
            return {"request": request, "step": step, "column": column, "mossserve": int(a[step, column]),
                    "reference": int(b[step, column])}
    return None
