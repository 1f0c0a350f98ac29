"""Realtime sampling ops against the reference's (sampling_ops goldens), the draw protocol, the history window."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from realtime_cases import golden, golden_json, realtime_family

from mossserve.errors import InvalidRequestError
from mossserve.layers.sampler import apply_repetition_penalty, exponential_noise
from mossserve.models.family import Prompt
from mossserve.models.moss_realtime_sampling import (
    filtered_probs,
    sample_codes,
    window_seen,
)
from mossserve.sampling import SamplingParams

OPS = {case["name"]: case for case in golden_json("sampling_ops")["cases"]}


@pytest.mark.parametrize("name", ["rep1.1_win50", "rep1.3_nowindow", "rep0.9_win5"])
def test_repetition_penalty(name: str) -> None:
    g, case = golden("sampling_ops"), OPS[name]
    seen = window_seen(g["history"], case["window"], 1027)
    out = apply_repetition_penalty(g["logits"][:, 0], seen, torch.full((2,), case["penalty"]))
    torch.testing.assert_close(out, g[f"{name}.penalized"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["t0.8_k30_p0.6", "t1.3_k5_p0.95", "t0.5_k1000_p0.3"])
def test_temperature_top_k_top_p(name: str) -> None:
    g, case = golden("sampling_ops"), OPS[name]
    rows = torch.ones(2)
    filtered, probs = filtered_probs(g[case["input"]], case["temperature"] * rows,
                                     (case["top_k"] * rows).long(), torch.full((2,), case["top_p"], dtype=torch.float64))
    expected = g[f"{name}.filtered"]
    assert torch.equal(torch.isinf(filtered), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(filtered[finite], expected[finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, g[f"{name}.probs"], atol=1e-6, rtol=0)


def test_a_draw_is_torch_multinomial_from_the_same_generator() -> None:
    """argmax(probs / exponential noise) is what torch's CPU multinomial(probs, 1) draws: a request's own
    generator seeded like the reference's global one replays its draws."""
    logits = torch.randn(40, 1027, generator=torch.Generator().manual_seed(0)) * 3
    temperature, top_k, top_p = torch.full((1,), 0.8), torch.full((1,), 30), torch.full((1,), 0.6, dtype=torch.float64)
    ours, reference = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for row in logits:
        _, probs = filtered_probs(row[None], temperature, top_k, top_p)
        drawn = sample_codes(row[None], temperature, top_k, top_p, exponential_noise(1, 1027, ours, row.device))
        assert drawn.item() == torch.multinomial(probs, 1, generator=reference).item()


def test_greedy_rows_take_the_first_maximum_after_the_penalty() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]])
    assert sample_codes(logits, torch.zeros(1), torch.full((1,), 30), torch.full((1,), 0.6), None).item() == 1
    seen = torch.tensor([[False, True, False, False]])
    assert sample_codes(apply_repetition_penalty(logits, seen, torch.full((1,), 1.1)), torch.zeros(1), torch.zeros(1, dtype=torch.long),
                        torch.ones(1), None).item() == 2


@pytest.mark.parametrize("window", [0, 1, 3, 50])
def test_history_counts_follow_the_window(window: int) -> None:
    """The family's running counts equal the reference's seen set (last `window` frames) at every frame."""
    fam = realtime_family()
    state = fam.new_state(3, torch.device("cpu"))
    sampling = SamplingParams(audio_repetition_window=window)
    fam.admit(state, 2, Prompt(rows=np.zeros((1, 17), dtype=np.int64)), sampling)
    frames = torch.randint(0, 6, (12, 16), generator=torch.Generator().manual_seed(window))
    slots = torch.tensor([2])
    for k, frame in enumerate(frames):
        fam._remember(state, slots, frame[None])
        state.frames[slots] += 1
        history = frames[: k + 1].T  # (16, frames so far)
        assert torch.equal(state.counts[2] > 0, window_seen(history, window, 1027))


def test_a_window_longer_than_any_turn_is_the_whole_history() -> None:
    """A window of 3,000,000 grew every slot's frame ring to it (6 GB) for the engine's life; no turn has
    more frames than the model has positions, so such a window is the whole history (0)."""
    fam = realtime_family()
    state = fam.new_state(3, torch.device("cpu"))
    window = fam.backbone_config.max_position_embeddings
    fam.admit(state, 2, Prompt(rows=np.zeros((1, 17), dtype=np.int64)), SamplingParams(audio_repetition_window=window))
    assert state.window[2] == 0 and state.ring.shape[1] < window


def test_window_must_be_a_non_negative_integer() -> None:
    for bad in (-1, 2.5, True):
        with pytest.raises(InvalidRequestError):
            SamplingParams(audio_repetition_window=bad).validate()
    SamplingParams(audio_repetition_window=0).validate()


def test_a_frames_noise_is_each_codebooks_own_draw() -> None:
    """The frame's noise, one call per request, equals one draw per drawing codebook in codebook order
    from the request's generator (the reference's multinomial per codebook), and leaves the generator
    where those draws do; codebooks that do not draw take no numbers."""
    from types import SimpleNamespace

    from mossserve.models.moss_realtime_family import MossRealtimeFamily

    vocab, seeds = 1027, (3, 11)
    drawing = torch.ones(2, 16, dtype=torch.bool)
    drawing[1, [0, 5, 15]] = False  # greedy codebooks in the second request
    state = SimpleNamespace(generators=[torch.Generator().manual_seed(s) for s in seeds])
    noise = MossRealtimeFamily._noise(None, state, torch.tensor([0, 1]), drawing, vocab, torch.device("cpu"))
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        for codebook in range(16):
            if drawing[row, codebook]:
                expected = torch.empty(1, vocab).exponential_(1, generator=generator)[0]
                assert torch.equal(noise[row, codebook], expected)
            else:
                assert torch.equal(noise[row, codebook], torch.ones(vocab))
        assert torch.equal(generator.get_state(), state.generators[row].get_state())
