"""mossserve/openmp.py: the caller's GNU OpenMP pool is released when a CPU engine starts its thread,
and parallel ops on the releasing thread still work (libgomp makes a new pool)."""
from __future__ import annotations

import sys

import torch

from mossserve.engine import engine as engine_module
from mossserve.openmp import loaded_libgomp, release_openmp_pool


def test_the_pool_is_released_and_made_again_on_demand() -> None:
    data = torch.arange(1 << 21, dtype=torch.float64)
    expected = float(data.sum())  # a parallel region: this thread now has a pool
    library = loaded_libgomp()
    if sys.platform == "linux" and torch.__config__.parallel_info().count("OpenMP"):
        assert library is not None and "libgomp" in library
    assert release_openmp_pool() is (library is not None)
    assert float(data.sum()) == expected
    assert release_openmp_pool() is (library is not None)


def test_a_cpu_engine_releases_the_starting_threads_pool(demo_tts, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(engine_module, "release_openmp_pool", lambda: calls.append(1) or True)
    engine = engine_module.Engine(demo_tts.talker, None)
    engine.start()
    engine.shutdown()
    assert calls == [1]
