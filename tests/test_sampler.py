"""The sampler's building blocks against the reference's `sample_token` pieces (no randomness),
and the draw rule against torch's own multinomial."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DELAY_DIR
from mossserve.layers.sampler import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    exponential_draws,
    exponential_noise,
    noise_from_bits,
    race,
    sample,
    top_k_candidates,
)

OPS = np.load(DELAY_DIR / "sampling_ops.npz")
CASES = json.loads((DELAY_DIR / "sampling_ops.json").read_text())["cases"]


def history_mask(rows: int, vocab: int) -> torch.Tensor:
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    seen[:, torch.unique(torch.from_numpy(OPS["prev_tokens"]))] = True
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sampling_ops(case: dict) -> None:
    logits = torch.from_numpy(OPS["input_logits"])
    rows, vocab = logits.shape
    full = lambda v, dtype=torch.float32: torch.full((rows,), v, dtype=dtype)  # noqa: E731
    x = apply_temperature(logits, full(case["temperature"]))
    x = apply_repetition_penalty(x, history_mask(rows, vocab), full(case["repetition_penalty"]))
    assert torch.equal(x, torch.from_numpy(OPS[f"{case['name']}/after_repetition_penalty"]))
    filtered, candidates = top_k_candidates(x, full(case["top_k"] or 0, torch.int64))
    assert torch.equal(filtered, apply_top_k(x, full(case["top_k"] or 0, torch.int64)))
    expected = torch.from_numpy(OPS[f"{case['name']}/filtered_logits"])
    assert torch.equal(apply_top_p(filtered, full(case["top_p"] or 1.0)), expected)  # the whole vector sorted
    x = apply_top_p(filtered, full(case["top_p"] or 1.0), candidates)  # top-k's candidates alone, where they may
    assert torch.equal(x, expected)
    probs = torch.softmax(x, dim=-1)
    torch.testing.assert_close(probs, torch.from_numpy(OPS[f"{case['name']}/probs"]), atol=1e-6, rtol=0)


def test_greedy_with_repetition_penalty() -> None:
    logits = torch.from_numpy(OPS["input_logits"])
    rows, vocab = logits.shape
    tokens = sample(logits, torch.zeros(rows), torch.zeros(rows, dtype=torch.int64), torch.ones(rows),
                    penalty=torch.full((rows,), 1.5), seen=history_mask(rows, vocab))
    assert torch.equal(tokens, torch.from_numpy(OPS["greedy_rep_1.5/argmax"]))


def test_per_row_settings_equal_separate_calls() -> None:
    """One batched call with different settings per row equals one call per row."""
    logits = torch.from_numpy(OPS["input_logits"])
    rows = logits.shape[0]
    top_k = torch.tensor([0, 5, 25, 1, 1024, 3])
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.3, 0.99])
    batched = apply_top_p(apply_top_k(logits, top_k), top_p)
    for r in range(rows):
        alone = apply_top_p(apply_top_k(logits[r : r + 1], top_k[r : r + 1]), top_p[r : r + 1])
        assert torch.equal(batched[r : r + 1], alone)


@pytest.mark.parametrize("seed", [0, 7, 1234])
def test_draw_equals_torch_multinomial(seed: int) -> None:
    """`argmax(probs / noise)` with the generator's exponential noise is torch's CPU multinomial."""
    probs = torch.softmax(torch.from_numpy(OPS["input_logits"]) / 0.7, dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).flatten()
    noise = exponential_noise(probs.shape[0], probs.shape[1], torch.Generator().manual_seed(seed), probs.device)
    assert torch.equal(torch.argmax(probs / noise, dim=-1), expected)


@pytest.mark.parametrize("rows, vocab", [(1, 151936), (32, 1025), (3, 7)])
def test_exponential_noise_is_torchs_own(rows: int, vocab: int) -> None:
    """The noise made of random bits is torch's `exponential_`: the same values, the generator left
    at the same point."""
    ours, theirs = torch.Generator().manual_seed(rows), torch.Generator().manual_seed(rows)
    expected = torch.empty(rows, vocab).exponential_(1, generator=theirs)
    assert torch.equal(exponential_noise(rows, vocab, ours, torch.device("cpu")), expected)
    assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("seed", range(4))
def test_top_p_over_the_candidates_is_the_whole_sort(seed: int, monkeypatch) -> None:
    """Top-p over top-k's candidates cuts where sorting the whole vector does, per-row k and p mixed,
    rows of probabilities too small for float32 among them; with two candidates of equal probability
    in a row it sorts the whole vector, whose order among them decides the cut."""
    generator = torch.Generator().manual_seed(seed)
    rows, vocab = 64, 1025
    # Logits a step apart (no two probabilities equal), scales where most probabilities underflow to 0.
    steps = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)]).float()
    logits = steps * torch.tensor([0.05, 0.5, 3.0, 60.0]).repeat(16)[:, None]
    top_k = torch.randint(1, 60, (rows,), generator=generator)
    top_p = torch.rand(rows, generator=generator).clamp(0.05, 1.0)
    top_p[::5] = 1.0
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    filtered, candidates = top_k_candidates(logits, top_k)
    fast = apply_top_p(filtered, top_p, candidates)
    assert not sorts, "distinct probabilities need no sort"
    assert torch.equal(fast, apply_top_p(filtered, top_p))
    tied = logits.clone()
    tied[3, candidates[3, 1]] = tied[3, candidates[3, 0]]  # the two largest equal: a cut between them
    top_p[3] = 0.5 * torch.softmax(apply_top_k(tied, top_k.clamp(min=2))[3], dim=-1).max()
    filtered, candidates = top_k_candidates(tied, top_k.clamp(min=2))
    sorts.clear()
    assert torch.equal(apply_top_p(filtered, top_p, candidates), apply_top_p(filtered, top_p))
    assert sorts, "a tie takes the whole sort"


def test_top_p_written_out() -> None:
    """The cut by its definition, one row at a time: keep the largest probabilities while the mass
    before each is at most p."""
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(8, 50, generator=generator) * 2
    top_k = torch.tensor([0, 3, 10, 50, 7, 20, 1, 5])
    top_p = torch.tensor([0.5, 0.9, 0.3, 0.95, 1.0, 0.6, 0.2, 0.99])
    filtered, candidates = top_k_candidates(logits, top_k)
    got = apply_top_p(filtered, top_p, candidates)
    for row in range(8):
        probs = torch.softmax(filtered[row].double(), dim=-1)
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]
        keep = order[(before <= top_p[row]) | (torch.arange(50) == 0)] if top_p[row] < 1 else order[probs[order] > 0]
        assert set(torch.nonzero(torch.isfinite(got[row])).flatten().tolist()) == set(keep[probs[keep] > 0].tolist())


def candidates_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled rows of Delay audio width with per-row top-k and top-p: (logits, top_k, top_p, bits)."""
    generator = torch.Generator().manual_seed(seed)
    rows, vocab = 48, 1025
    logits = torch.randn(rows, vocab, generator=generator) * torch.tensor([0.3, 1.0, 4.0]).repeat(16)[:, None]
    top_k = torch.randint(1, 40, (rows,), generator=generator)
    top_p = torch.rand(rows, generator=generator).clamp(0.05, 1.0)
    bits = exponential_draws(rows, vocab, torch.Generator().manual_seed(seed), torch.device("cpu"))
    assert bits.dtype == torch.int64, "this torch build makes the noise of its random bits"
    return logits, top_k, top_p, bits


@pytest.mark.parametrize("seed", range(3))
def test_race_over_the_candidates_is_the_whole_race(seed: int, monkeypatch) -> None:
    """With the noise's bits, only the candidates' noise is made, and the winner is the whole
    vector's argmax(probs / noise); sample() gives the same tokens from the bits as from the noise."""
    logits, top_k, top_p, bits = candidates_case(seed)
    filtered, candidates = top_k_candidates(logits, top_k)
    probs = torch.softmax(apply_top_p(filtered, top_p, candidates), dim=-1)
    made = []
    import mossserve.layers.sampler as sampler
    real = sampler.noise_from_bits
    monkeypatch.setattr(sampler, "noise_from_bits", lambda b, d: made.append(tuple(b.shape)) or real(b, d))
    got = race(probs, bits, candidates)
    assert made == [tuple(candidates.shape)], "only the candidates' noise is made"
    assert torch.equal(got, torch.argmax(probs / noise_from_bits(bits, torch.device("cpu")), dim=-1))
    temperature = torch.full((len(logits),), 0.8)
    temperature[::7] = 0.0  # greedy rows among them
    assert torch.equal(sample(logits, temperature, top_k, top_p, noise=bits),
                       sample(logits, temperature, top_k, top_p, noise=real(bits, torch.device("cpu"))))


def test_a_row_of_nan_takes_its_top_candidate_not_an_id_past_the_vocabulary() -> None:
    """A request whose logits were not finite gave id `vocab` (1025), whose lookup then failed every
    request in the batch."""
    logits, top_k, top_p, bits = candidates_case(2)
    filtered, candidates = top_k_candidates(logits, top_k)
    probs = torch.softmax(filtered, dim=-1)
    probs[3] = float("nan")
    got = race(probs, bits, candidates)
    assert got[3] == candidates[3, 0]
    others = torch.arange(len(logits)) != 3
    assert torch.equal(got[others], torch.argmax(probs / noise_from_bits(bits, torch.device("cpu")), dim=-1)[others])


def test_race_ties_and_zero_bits_as_the_whole_race() -> None:
    """Equal quotients go to the smaller index (candidates list it second), and a zero among the
    bits (a noise of -0.0: NaN and -inf quotients) sends the row to the whole race."""
    logits, top_k, top_p, bits = candidates_case(5)
    filtered, candidates = top_k_candidates(logits, top_k.clamp(min=3))
    probs = torch.softmax(filtered, dim=-1)
    row, listed = 0, candidates[0].tolist()
    a, b = next((x, y) for i, x in enumerate(listed) for y in listed[i + 1 :] if x > y)  # a listed first, b smaller
    probs[row, a] = probs[row, b] = probs[row].max() * 4
    bits[row, a] = bits[row, b] = 1  # the smallest noise: these two win, equal
    whole = torch.argmax(probs / noise_from_bits(bits, torch.device("cpu")), dim=-1)
    assert whole[row] == min(a, b)
    assert torch.equal(race(probs, bits, candidates), whole)
    outside = next(i for i in range(logits.shape[1]) if i not in candidates[1].tolist())
    bits[1, outside] = 0
    whole = torch.argmax(probs / noise_from_bits(bits, torch.device("cpu")), dim=-1)
    assert whole[1] == outside  # 0 / -0.0 is NaN: argmax takes it
    assert torch.equal(race(probs, bits, candidates), whole)
